"""The eager fast path (csrc/eager.cpp): normext.functional hands a plain call to
normext._C.layer_norm_eager / batch_norm_eager, which check the arguments and call the ops from
C++, or return None for anything else (functional.py's Python path then runs). These tests hold
it to that contract: the same results and running statistics as the Python path, bit for bit,
on CPU and CUDA, and None (never an exception, never a wrong answer) wherever the call is not
plain, so that the Python path's checks, messages and dispatch stay in charge there."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import CUDA_PARAM
from torch.overrides import TorchFunctionMode

import normext
from normext import _C
from normext import functional as NF

DEVICES = ["cpu", CUDA_PARAM]


# functional.py's _C with the fast path switched off: its *_eager answer None to everything.
_OFF = types.SimpleNamespace(layer_norm_eager=lambda *a: None, batch_norm_eager=lambda *a: None)


def _bn_state(device, dtype, c, affine=True, param_dtype=None):
    g = torch.Generator().manual_seed(c)
    pd = param_dtype or dtype
    w = (1 + 0.1 * torch.randn(c, generator=g)).to(device, pd).requires_grad_() if affine else None
    b = (0.1 * torch.randn(c, generator=g)).to(device, pd).requires_grad_() if affine else None
    rm = (0.1 * torch.randn(c, generator=g)).to(device, pd)
    rv = (1 + torch.rand(c, generator=g)).to(device, pd)
    return w, b, rm, rv


def _run_bn(device, dtype, shape, training, affine, cumulative, channels_last, param_dtype):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b, rm, rv = _bn_state(device, dtype, shape[1], affine, param_dtype)
    nbt = torch.tensor(3, device=device) if cumulative else None
    y = NF._batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, nbt)
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    return [y, rm, rv, *grads] + ([nbt] if cumulative else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 7), (3, 4, 5, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_same_as_python_path(device, dtype, shape, training, monkeypatch):
    keys = ("affine", "cumulative", "channels_last", "param_dtype")
    cases = [(True, False, False, None), (False, True, len(shape) == 4, None)]
    if dtype == torch.bfloat16:
        cases.append((True, False, False, torch.float32))  # float32 parameters
    cases = [dict(zip(keys, c)) for c in cases]
    for case in cases:
        fast = _run_bn(device, dtype, shape, training, **case)
        with monkeypatch.context() as m:
            m.setattr(NF, "_C", _OFF)
            slow = _run_bn(device, dtype, shape, training, **case)
        assert len(fast) == len(slow)
        for a, b in zip(fast, slow):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), case


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("normalized_shape", [7, (7,), [5, 7], torch.Size([3, 5, 7])])
def test_layer_norm_same_as_python_path(device, dtype, normalized_shape, monkeypatch):
    def run():
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 3, 5, 7, generator=g).to(device, dtype).requires_grad_()
        ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        w = (1 + torch.randn(ns, generator=g)).to(device, dtype).requires_grad_()
        b = torch.randn(ns, generator=g).to(device, dtype).requires_grad_()
        y = NF.layer_norm(x, normalized_shape, w, b, 1e-5)
        return [y, *torch.autograd.grad(y, [x, w, b], torch.randn(y.shape, generator=g).to(y))]

    fast = run()
    with monkeypatch.context() as m:
        m.setattr(NF, "_C", _OFF)
        slow = run()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_plain_calls_take_the_fast_path():
    x = torch.randn(4, 6)
    w = torch.nn.Parameter(torch.ones(6))
    assert _C.layer_norm_eager(x, 6, w, None, 1e-5) is not None
    assert _C.layer_norm_eager(x, [6], None, None, 1) is not None  # an int eps
    rm, rv = torch.zeros(6), torch.ones(6)
    y = _C.batch_norm_eager(x, rm, rv, w, None, True, 0.1, 1e-5, None)
    assert y is not None
    torch.testing.assert_close(rm, 0.1 * x.mean(0))
    torch.testing.assert_close(rv, 0.9 + 0.1 * x.var(0))
    assert _C.batch_norm_eager(x, None, None, None, None, True, 0.1, 1e-5, None) is not None


class _Sub(torch.Tensor):
    pass


def _not_plain_calls():
    x = torch.randn(4, 6)
    w, b = torch.ones(6), torch.zeros(6)
    rm, rv = torch.zeros(6), torch.ones(6)
    ln = [
        (x.as_subclass(_Sub), 6, w, b, 1e-5),  # a Tensor subclass: its __torch_function__
        (x.int(), 6, None, None, 1e-5),  # not floating
        (x, (), None, None, 1e-5),  # empty normalized_shape
        (x, 5, None, None, 1e-5),  # does not match the input
        (x, (4, 6, 1), None, None, 1e-5),  # more dims than the input
        (x, (2**70,), None, None, 1e-5),  # not an int64
        (x, (torch.tensor(6),), None, None, 1e-5),  # not a Python int
        (x, 6, torch.ones(5), None, 1e-5),  # weight of the wrong shape
        (x, 6, torch.ones(6, dtype=torch.float64), None, 1e-5),  # weight of another dtype
        (x, 6, torch.ones(6, device="meta"), None, 1e-5),  # another device
        (x, 6, w, b.double(), 1e-5),
        (x, 6, w, b, "1e-5"),  # eps not a number
        (x, 6, w, b, torch.tensor(1e-5)),
        (x, 6, [1.0] * 6, b, 1e-5),  # weight not a tensor
        (x.half(), 6, w.bfloat16(), b.bfloat16(), 1e-5),  # half input, bf16 weight
        (x.half(), 6, w, b.half(), 1e-5),  # mixed parameter dtypes
    ]
    bn = [
        (x.as_subclass(_Sub), rm, rv, w, b, True, 0.1, 1e-5, None),
        (x[0], rm, rv, w, b, True, 0.1, 1e-5, None),  # 1-D
        (x.int(), None, None, None, None, True, 0.1, 1e-5, None),
        (x, rm, None, w, b, True, 0.1, 1e-5, None),  # one running statistic
        (x, None, None, w, b, False, 0.1, 1e-5, None),  # eval without running statistics
        (x, rm, rv, w, b, True, 0.1, -1.0, None),  # negative eps
        (x, rm, rv, w, b, True, 0.1, float("nan"), None),
        (x, rm, rv, torch.ones(5), b, True, 0.1, 1e-5, None),  # C mismatch
        (x, rm.double(), rv.double(), w, b, True, 0.1, 1e-5, None),
        (x, rm, rv, w, b, 1, 0.1, 1e-5, None),  # training not a bool
        (x, rm, rv, w, b, True, None, 1e-5, None),  # momentum None
        (x, rm, rv, w, b, True, True, 1e-5, None),  # a bool momentum (the Python path decides)
        (torch.randn(1, 6), rm, rv, w, b, True, 0.1, 1e-5, None),  # one value per channel
        (x, rm.clone().requires_grad_(), rv, w, b, True, 0.1, 1e-5, None),
        (x, rm, rv, w, b, True, 0.1, 1e-5, 3),  # num_batches_tracked not a tensor
    ]
    return ln, bn


def test_anything_else_returns_none():
    ln, bn = _not_plain_calls()
    for args in ln:
        assert _C.layer_norm_eager(*args) is None, args
    for args in bn:
        assert _C.batch_norm_eager(*args) is None, args
    # nothing touched the running statistics on the way
    x = torch.randn(4, 6)
    rm, rv = torch.zeros(6), torch.ones(6)
    assert _C.batch_norm_eager(x, rm, rv, None, None, True, 0.1, -1.0, None) is None
    assert torch.equal(rm, torch.zeros(6)) and torch.equal(rv, torch.ones(6))


def test_wrong_argument_counts_return_none():
    x = torch.randn(4, 6)
    assert _C.layer_norm_eager(x, 6) is None
    assert _C.batch_norm_eager(x) is None


def test_torch_function_mode_sees_the_ops():
    """Under a TorchFunctionMode the fast path stands aside, so the mode sees the ops as before."""
    seen = []

    class Log(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 6)
    with Log():
        assert _C.layer_norm_eager(x, 6, None, None, 1e-5) is None
        NF.layer_norm(x, 6)
        NF.batch_norm(x, torch.zeros(6), torch.ones(6), training=True)
    assert any("layer_norm_fwd" in s for s in seen)
    assert any("batch_norm_fwd" in s for s in seen)
    assert any("batch_norm_update_stats_" in s for s in seen)


def test_tracing_takes_the_python_path():
    seen = []

    def f(x):
        seen.append((torch.jit.is_tracing(), _C.layer_norm_eager(x, 6, None, None, 1e-5)))
        return NF.layer_norm(x, 6)

    traced = torch.jit.trace(f, torch.randn(4, 6))
    # (trace runs f once more outside tracing, to check the trace)
    assert [r is None for tracing, r in seen] == [tracing for tracing, _ in seen]
    assert any(tracing for tracing, _ in seen)
    x = torch.randn(3, 6)
    torch.testing.assert_close(traced(x), torch.nn.functional.layer_norm(x, (6,)))


def test_vmap_takes_the_python_path():
    x = torch.randn(3, 4, 6)
    out = torch.func.vmap(lambda t: NF.layer_norm(t, 6))(x)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (6,)))


def test_errors_unchanged(monkeypatch):
    """Every call the fast path declines ends the same way with it on or off: the same
    exception type and message, or success."""
    ln, bn = _not_plain_calls()
    calls = [(NF.layer_norm, a) for a in ln] + [(NF._batch_norm, a) for a in bn]
    fast = [_outcome(fn, a) for fn, a in calls]
    with monkeypatch.context() as m:
        m.setattr(NF, "_C", _OFF)
        slow = [_outcome(fn, a) for fn, a in calls]
    assert fast == slow
    assert sum(o[0] != "ok" for o in fast) >= 20  # most of them are errors


def _outcome(fn, args):
    args = tuple(a.clone() if isinstance(a, torch.Tensor) and not a.requires_grad else a
                 for a in args)
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return "ok", ""


def test_modules_use_it():
    """A module's forward goes through functional, so through the fast path: same results as
    torch.nn, running statistics included."""
    torch.manual_seed(0)
    for ours, theirs, shape in ((normext.BatchNorm2d(5), torch.nn.BatchNorm2d(5), (4, 5, 3, 3)),
                                (normext.LayerNorm(7), torch.nn.LayerNorm(7), (4, 7))):
        x = torch.randn(shape)
        for _ in range(2):
            torch.testing.assert_close(ours(x), theirs(x))
        for (n, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            torch.testing.assert_close(a, b, msg=n)
