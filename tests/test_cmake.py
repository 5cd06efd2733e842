"""CMakeLists.txt builds the same kernels into a library that torch.ops.load_library loads."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: normext's own extension registers the same namespace, so the
# library must be the only one defining normext ops in that process.
CHECK = textwrap.dedent(
    """
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    x = torch.randn(6, 37, dtype=torch.float64)
    w, b = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    y, mean, rstd = torch.ops.normext.layer_norm_fwd(x, 1, w, b, 1e-5)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (37,), w, b, 1e-5))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    y, *_ = torch.ops.normext.batch_norm_fwd(x, None, None, None, None, True, 1e-5)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    print("cmake library ok")
    """
)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_library_loads_and_runs(tmp_path):
    build = tmp_path / "build"
    cfg = ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    subprocess.run(cfg, check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)], check=True,
                   capture_output=True, text=True)
    lib = build / "libnormext_ops.so"
    assert lib.exists()
    assert (build / "compile_commands.json").exists()
    out = subprocess.run([sys.executable, "-c", CHECK, str(lib)], check=True, capture_output=True,
                         text=True)
    assert "cmake library ok" in out.stdout
