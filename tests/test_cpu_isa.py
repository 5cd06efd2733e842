"""The CPU kernels' two ISA copies (csrc/cpu/kernels.h) both match torch.nn.

Where the AVX-512 copy is built and the CPU runs it, half and bfloat16 inputs take it in this
process; with ATEN_CPU_CAPABILITY=avx2 (torch's own switch, which normext follows) they take the
AVX2 copy. The half and bfloat16 tests of the LayerNorm and BatchNorm suites run again in a child
process with that setting.
"""

import os
import subprocess
import sys

import pytest
import torch

import normext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_copy = pytest.mark.skipif(
    not normext._C.cpu_avx512_copy or torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="no AVX-512 copy of the kernels in this build, or a CPU without AVX-512",
)


@needs_copy
def test_avx2_copy_matches_torch():
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "AVX2"
    tests = [os.path.join(ROOT, "tests", f) for f in ("test_layer_norm.py", "test_batch_norm.py")]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests,
         "-k", "bfloat16 or float16"],
        env=env, capture_output=True, text=True, cwd=ROOT, check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


@needs_copy
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_copies_agree(dtype, tmp_path):
    # The same inputs through both copies (this process: AVX-512; the child: AVX2) agree to
    # within rounding of the output dtype.
    script = (
        "import sys, torch, normext\n"
        "d = torch.load(sys.argv[1])\n"
        "x, w, b = d['x'], d['w'], d['b']\n"
        "ln = torch.ops.normext.layer_norm_fwd(x.flatten(1), 1, w, b, 1e-5)[0]\n"
        "bn = torch.ops.normext.batch_norm_fwd(x, None, None, None, None, True, 1e-5)[0]\n"
        "torch.save({'ln': ln, 'bn': bn}, sys.argv[2])\n"
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 37, 19, 17, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    n = 37 * 19 * 17
    w, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    src, dst = str(tmp_path / "in.pt"), str(tmp_path / "out.pt")
    torch.save({"x": x, "w": w, "b": b}, src)
    subprocess.run([sys.executable, "-c", script, src, dst], check=True,
                   env=dict(os.environ, ATEN_CPU_CAPABILITY="avx2"), cwd=ROOT)
    other = torch.load(dst)
    ln = torch.ops.normext.layer_norm_fwd(x.flatten(1), 1, w, b, 1e-5)[0]
    bn = torch.ops.normext.batch_norm_fwd(x, None, None, None, None, True, 1e-5)[0]
    tol = {"atol": 1e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {"atol": 2e-3, "rtol": 2e-3}
    torch.testing.assert_close(ln, other["ln"], **tol)
    torch.testing.assert_close(bn, other["bn"], **tol)
