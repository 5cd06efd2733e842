"""Large CPU outputs are advised into transparent huge pages (csrc/cpu/huge_pages.h): the whole
2 MB pages inside each output of 4 MB or more carry the kernel's "hg" flag (MADV_HUGEPAGE) in
/proc/self/smaps, and NORMEXT_HUGE_PAGES=0 turns that off. Only the advice is checked here: what
the kernel makes of it depends on the system, and what it saves is measured in benchmarks/."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

THP = "/sys/kernel/mm/transparent_hugepage/enabled"
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists(THP),
    reason="transparent huge pages are a Linux feature",
)

# Each case prints, per output tensor, whether the mapping holding the tensor's middle byte has
# the "hg" flag. The middle of a tensor of 4 MB or more always lies in one of its whole 2 MB pages.
SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import normext

    def advised(t):
        mid = t.data_ptr() + t.numel() * t.element_size() // 2
        lo = hi = None
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()[0]
                if "-" in head and all(c in "0123456789abcdef-" for c in head):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                elif line.startswith("VmFlags:") and lo <= mid < hi:
                    return "hg" in line.split()[1:]
        raise AssertionError("no mapping holds the tensor")

    ops = torch.ops.normext
    torch.manual_seed(0)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        # BatchNorm, NCHW and channels-last: 8 MB of float32, 4 MB of bfloat16.
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(8, 16, 128, 128).to(dtype=dtype, memory_format=fmt)
            w, b = torch.randn(16), torch.randn(16)
            y, mean, invstd, _ = ops.batch_norm_fwd(x, w, b, None, None, True, 1e-5)
            dx, _, _ = ops.batch_norm_bwd(y, x, w, mean, invstd, True, [True, True, True])
            results += [advised(y), advised(dx)]
        # LayerNorm rows.
        x = torch.randn(2048, 1024, dtype=dtype)
        w, b = torch.randn(1024, dtype=dtype), torch.randn(1024, dtype=dtype)
        y, mean, rstd = ops.layer_norm_fwd(x, 1, w, b, 1e-5)
        dx, _, _ = ops.layer_norm_bwd(y, x, 1, mean, rstd, w, [True, True, True])
        results += [advised(y), advised(dx)]
    # Small outputs are left alone: one 2 MB page at most, and usually recycled heap memory.
    small = ops.layer_norm_fwd(torch.randn(256, 1024), 1, None, None, 1e-5)[0]
    print(results, advised(small))
    """
)


def run(env_value):
    env = dict(os.environ)
    env.pop("NORMEXT_HUGE_PAGES", None)
    if env_value is not None:
        env["NORMEXT_HUGE_PAGES"] = env_value
    # Every large allocation its own mapping, so that no earlier advice on the heap is seen.
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_large_outputs_are_advised():
    assert run(None) == f"{[True] * 12} False"


def test_huge_pages_off():
    assert run("0") == f"{[False] * 12} False"
