"""The CPU output cache (csrc/cpu/output_cache.h): outputs of 1 MB or more reuse the blocks of
dead outputs of the same size, up to a limit (NORMEXT_CPU_CACHE_MB), and normext.empty_cache()
gives them back. The outputs stay ordinary tensors: right values and strides, independent
memory while alive, resizable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import normext
import normext.functional as NF

ops = torch.ops.normext
BIG = (8, 32, 64, 64)  # 4 MB of float32: cached, and 2 MB aligned


def _bn(x):
    return ops.batch_norm_fwd(x, None, None, None, None, True, 1e-5)[0]


def test_dead_output_block_is_reused():
    x = torch.randn(BIG)
    normext.empty_cache()
    before = normext.cpu_cache_stats()
    y = _bn(x)
    ptr = y.data_ptr()
    assert ptr % (2 << 20) == 0
    expected = F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, expected)
    del y
    assert normext.cpu_cache_stats()["cached_bytes"] >= x.numel() * 4
    y = _bn(x)
    assert y.data_ptr() == ptr
    torch.testing.assert_close(y, expected)
    after = normext.cpu_cache_stats()
    assert after["hits"] == before["hits"] + 1
    assert after["misses"] == before["misses"] + 1


def test_live_outputs_do_not_share_memory():
    x = torch.randn(BIG)
    a, b = _bn(x), _bn(x)
    assert a.data_ptr() != b.data_ptr()
    assert torch.equal(a, b)  # deterministic
    a.zero_()
    torch.testing.assert_close(b, F.batch_norm(x, None, None, training=True))


def test_small_outputs_are_not_cached():
    normext.empty_cache()
    x = torch.randn(4, 8, 16, 16)  # 32 KB
    y = _bn(x)
    del y
    assert normext.cpu_cache_stats()["cached_bytes"] == 0


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cached_outputs_match_torch_strides(fmt):
    x = torch.randn(BIG).contiguous(memory_format=fmt).requires_grad_()
    for _ in range(2):  # the second time from a cached block
        y = NF.batch_norm(x, None, None, training=True)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        ref = F.batch_norm(x, None, None, training=True)
        assert y.stride() == ref.stride() and dx.stride() == x.stride()
        torch.testing.assert_close(y, ref)
    ln = NF.layer_norm(x, BIG[1:])
    assert ln.is_contiguous()
    torch.testing.assert_close(ln, F.layer_norm(x, BIG[1:]))


def test_cached_output_resizes():
    x = torch.randn(BIG)
    y = _bn(x)
    head = y.flatten()[:100].clone()
    y.resize_(2 * x.numel())
    assert torch.equal(y[:100], head)
    y.fill_(1.0)
    assert y.sum().item() == 2 * x.numel()


def test_empty_cache_returns_blocks():
    y = _bn(torch.randn(BIG))
    del y
    held = normext.cpu_cache_stats()["cached_bytes"]
    assert held > 0
    assert normext.empty_cache() == held
    assert normext.cpu_cache_stats()["cached_bytes"] == 0


def _child(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env}, capture_output=True, text=True, check=False,
    )


LIMIT_SCRIPT = """
    import torch, normext
    x = torch.randn(8, 32, 64, 64)  # 4 MB outputs
    ys = [torch.ops.normext.batch_norm_fwd(x, None, None, None, None, True, 1e-5)[0]
          for _ in range(3)]
    del ys
    s = normext.cpu_cache_stats()
    print(s["cached_bytes"], s["limit_bytes"])
"""


@pytest.mark.parametrize("mb, held", [("0", 0), ("9", 2 * (4 << 20)), ("256", 3 * (4 << 20))])
def test_limit(mb, held):
    run = _child(LIMIT_SCRIPT, NORMEXT_CPU_CACHE_MB=mb)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(held), str(int(mb) << 20)]


def test_bad_limit_is_a_clear_error():
    run = _child(LIMIT_SCRIPT, NORMEXT_CPU_CACHE_MB="lots")
    assert run.returncode != 0
    assert "NORMEXT_CPU_CACHE_MB must be a whole number of megabytes" in run.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_uses_its_own_cache():
    # The child starts with an empty cache (output_cache.cpp's atfork handler) and works.
    x = torch.randn(BIG)
    y = _bn(x)
    del y
    assert normext.cpu_cache_stats()["cached_bytes"] > 0
    pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        torch.set_num_threads(1)  # GNU OpenMP's pool does not survive a fork
        ok = normext.cpu_cache_stats()["cached_bytes"] == 0
        z = _bn(x)
        ok = ok and torch.allclose(z, F.batch_norm(x, None, None, training=True), atol=1e-5)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert normext.cpu_cache_stats()["cached_bytes"] > 0  # the parent's blocks stay
