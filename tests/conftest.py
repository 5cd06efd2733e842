"""Shared pieces of the test suite (the CPU tests and the CUDA ones): the tolerance table, input
layouts and the comparison against torch.nn. Test files import them with
``from conftest import ...``."""

from __future__ import annotations

import math

import pytest
import torch

import normext  # registers torch.ops.normext.*

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)

# A "device" parameter value for the tests that run on the CPU and, where there is one, on CUDA.
CUDA_PARAM = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(
            not (torch.cuda.is_available() and normext.with_cuda),
            reason="needs a CUDA device and normext's CUDA kernels",
        ),
    ],
)

# ---- tolerances ---------------------------------------------------------------------------------
# float64: normext is compared with torch.nn in float64, with these atol/rtol.
# float32, bfloat16, float16: normext and torch.nn are both compared with a float64 reference
#   computed from the same (already rounded) inputs, and normext may be off by at most
#   REF_ERR_MULT x torch's own largest error in that dtype, plus atol + rtol * |reference|
#   (flash-attention style: the bound means "no worse than torch", with a floor for the cases
#   where torch happens to be exact). A plain comparison with torch in float32 would be bounded
#   by torch's error, not ours: on (4096, 1024) torch's float32 bias grad is off by 2.4e-4 from
#   the exact sum, normext's by 3e-5.
# Backward is looser than forward: every gradient is a sum over the whole normalized group (dx
# through mean(g) and mean(g * xhat), dweight/dbias over all rows or all N x spatial values), so
# rounding grows with the group size, and dx = r * (g - mean(g) - xhat * mean(g * xhat)) subtracts
# nearly equal terms, which turns small absolute errors into large relative ones.
TOL = {
    torch.float32: {"fwd": {"atol": 1e-5, "rtol": 1e-5}, "bwd": {"atol": 1e-4, "rtol": 1e-4}},
    torch.float64: {"fwd": {"atol": 1e-12, "rtol": 1e-12}, "bwd": {"atol": 1e-10, "rtol": 1e-10}},
    torch.bfloat16: {"fwd": {"atol": 1e-2, "rtol": 0}, "bwd": {"atol": 5e-2, "rtol": 0}},
    torch.float16: {"fwd": {"atol": 2e-3, "rtol": 0}, "bwd": {"atol": 1e-2, "rtol": 0}},
}
REF_ERR_MULT = 2.0


def prefixed(prefix: str):
    """An assert_close ``msg`` callable that puts ``prefix`` before torch's own message."""
    return lambda message: f"{prefix}: {message}"


def check(name: str, actual, expected, ref, dtype: torch.dtype, kind: str) -> None:
    """Assert that normext's ``actual`` matches torch's ``expected`` (same dtype and shape; values
    within TOL[dtype][kind], kind "fwd" or "bwd"). ``dtype`` is the input's dtype; ``ref`` is the
    float64 reference that float32/half results are measured against (None: compare with torch)."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if not actual.is_floating_point():  # num_batches_tracked
        torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=prefixed(f"{name}"))
        return
    tol = TOL[dtype][kind]
    if dtype == torch.float64 or ref is None:
        if dtype in HALF:  # e.g. half running statistics, updated in float: allow one ulp
            tol = {"atol": tol["atol"], "rtol": torch.finfo(dtype).eps}
        torch.testing.assert_close(
            actual, expected, **tol, equal_nan=True, msg=prefixed(f"{name} ({dtype})")
        )
        return
    ref = ref.double()
    diff = (expected.double() - ref).abs().nan_to_num(0)
    torch_err = diff.max().item() if diff.numel() else 0.0
    torch.testing.assert_close(
        actual.double(),
        ref,
        atol=REF_ERR_MULT * torch_err + tol["atol"],
        rtol=tol["rtol"],
        equal_nan=True,
        msg=prefixed(f"{name} ({dtype}, torch's own error {torch_err:.3g})"),
    )



def backward_with_seeded_dy(y: torch.Tensor, seed: int) -> None:
    """y.backward(dy) with dy random from a fixed seed: the same values in any dtype and on any
    device, so two implementations (or a float64 reference run) get the same dy."""
    gen = torch.Generator().manual_seed(seed)
    y.backward(torch.randn(y.shape, generator=gen).to(y.device, y.dtype))


def compare_sample(where: str, dtype: torch.dtype, expected, actual, reference) -> bool:
    """One of torch's sample inputs (OpInfo or ModuleInfo) run by torch (``expected``) and by
    normext (``actual``), each (output, {name: tensor after the call, or a grad}) or (the
    exception raised, {}): normext raises wherever torch does, and otherwise matches it with
    ``check``, float32 and half measured against ``reference()``, torch's float64 run (on a
    one-element row torch's float32 input grad is 1.2e-4 off the exact 0). Returns whether
    values were compared (False where both raised)."""
    (out, state), (ours, our_state) = expected, actual
    if isinstance(out, Exception):
        assert isinstance(ours, Exception), f"{where}: torch raised {out!r}, normext did not"
        return False
    assert not isinstance(ours, Exception), f"{where}: normext raised {ours!r}"
    ref, ref_state = reference() if dtype != torch.float64 else (None, {})
    check(f"{where}, output", ours, out, ref, dtype, "fwd")
    assert our_state.keys() == state.keys(), where
    for key, t in state.items():
        check(f"{where}, {key}", our_state[key], t, ref_state.get(key), dtype, "bwd")
    return True

# ---- input layouts ------------------------------------------------------------------------------
LAYOUTS = ["contiguous", "sliced", "transposed", "broadcast"]


def make_input(
    shape,
    dtype,
    layout: str = "contiguous",
    *,
    scale: float = 1.0,
    offset: float = 0.0,
    device: torch.device | str = "cpu",
):
    """Returns (base, view): a tensor ``base`` of random values on ``device`` and a function
    ``view`` that makes from it (or from a copy of it in another dtype) an input of the given shape
    and layout: contiguous; sliced (every other element of a larger tensor, at an offset);
    transposed (all dims reversed in memory); broadcast (stride 0 along dim 0); channels_last
    (channels_last for 4-D, channels_last_3d for 5-D, the (N, L, C) memory order for 3-D; 2-D is
    contiguous, already channels-last); channels_last_3d; misaligned (contiguous, starting one
    element past the start of its storage, so off a 16-byte boundary). Gradients are read from
    the base."""
    shape = tuple(shape)
    views = {
        "contiguous": (shape, lambda b: b),
        "sliced": ((shape[0] + 1, *shape[1:-1], 2 * shape[-1] + 1), lambda b: b[1:, ..., 1::2]),
        "transposed": (shape[::-1], lambda b: b.permute(*reversed(range(b.dim())))),
        "broadcast": ((1, *shape[1:]), lambda b: b.expand(shape)),
        "channels_last": (shape, lambda b: b),
        "channels_last_3d": (shape, lambda b: b),
        "misaligned": ((math.prod(shape) + 1,), lambda b: b[1:].view(shape)),
    }
    base_shape, view = views[layout]
    base = (torch.randn(base_shape, dtype=torch.float64, device=device) * scale + offset).to(dtype)
    if layout == "channels_last_3d" or (layout == "channels_last" and len(shape) == 5):
        base = base.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "channels_last" and len(shape) == 4:
        base = base.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last" and len(shape) == 3:
        base = base.transpose(1, 2).contiguous().transpose(1, 2)
    assert view(base).shape == shape
    return base, view


def forward_backward(fn, base, view, dy, params=(), buffers=(), dtype=None):
    """y = fn(view(base'), *params', *buffers') on fresh copies (cast to ``dtype`` when given, e.g.
    float64 for the reference), then y.backward(dy'). Returns (y, base'.grad, [param'.grad],
    [buffer' after the call]); None params/buffers stay None."""

    def copy(t):
        if t is None:
            return None
        t = t.detach()
        return (t.to(dtype) if dtype is not None else t).clone()

    b = copy(base).requires_grad_(True)
    ps = [None if p is None else copy(p).requires_grad_(True) for p in params]
    bufs = [copy(t) for t in buffers]
    y = fn(view(b), *ps, *bufs)
    y.backward(copy(dy))
    return y.detach(), b.grad, [None if p is None else p.grad for p in ps], bufs


def compare_runs(ours, theirs, ref, dtype, names=("weight", "bias")):
    """Compares two forward_backward results (normext, torch) in the input's ``dtype``, with the
    float64 run ``ref`` (None for float64 inputs). Buffers are float32 for half inputs, and are compared
    with torch's in their own dtype."""
    y, gx, gp, bufs = ours
    ty, tgx, tgp, tbufs = theirs
    ry, rgx, rgp, _ = ref if ref is not None else (None, None, [None] * len(gp), None)
    check("output", y, ty, ry, dtype, "fwd")
    check("input grad", gx, tgx, rgx, dtype, "bwd")
    for name, g, tg, rg in zip(names, gp, tgp, rgp):
        assert (g is None) == (tg is None), name
        if g is not None:
            check(f"{name} grad", g, tg, rg, dtype, "bwd")
    for i, (b, tb) in enumerate(zip(bufs, tbufs)):
        if b is not None:
            check(f"buffer {i}", b, tb, None, b.dtype, "fwd")


def same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Strides equal on every dim of size > 1 (a size-1 dim's stride carries no layout)."""
    return a.shape == b.shape and all(
        sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
