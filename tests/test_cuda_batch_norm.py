"""The BatchNorm CUDA kernels (csrc/cuda/batch_norm.cu) against torch.nn on the GPU: outputs,
input/weight/bias grads and running statistics over BatchNorm1d/2d/3d shapes (C = 3 with millions
of values per channel, (N, 8192)), dtypes, NCHW / channels_last / strided layouts, train and eval
over several steps; plus opcheck, torch.compile(fullgraph=True), bitwise reproducibility, exact
zeros for constant channels, large offsets, agreement with normext's own CPU kernels, and errors.

Every test is skipped without a CUDA device, or when normext was built without its CUDA kernels
(normext.with_cuda is False, e.g. NORMEXT_CUDA=0 or no nvcc at build time)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPES,
    HALF,
    TOL,
    check,
    compare_runs,
    forward_backward,
    make_input,
    same_strides,
)
from torch import nn

import normext
import normext.functional as NF

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        not normext.with_cuda,
        reason="normext was built without CUDA kernels (normext.with_cuda is False)",
    ),
]

DEV = "cuda"

# conftest.make_input's layouts, plus the CUDA-specific ones: channels_last (channels_last_3d for
# 5-D, the (N, S, C) layout for 3-D) and misaligned (off a 16-byte boundary: scalar loads).
# Tolerances, the comparison with torch and a float64 reference, and the seed: conftest.
LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed", "broadcast", "misaligned"]


def run_bn(
    shape,
    dtype,
    layout="contiguous",
    *,
    training=True,
    affine=True,
    stats=True,
    param_dtype=None,
    momentum=0.1,
    eps=1e-5,
    scale=1.0,
    offset=0.0,
):
    """normext vs torch (and a float64 reference) on CUDA: output, grads, running statistics."""
    base, view = make_input(shape, dtype, layout, scale=scale, offset=offset, device=DEV)
    c = shape[1]
    pdt = param_dtype or dtype
    w = torch.randn(c, dtype=pdt, device=DEV) if affine else None
    b = torch.randn(c, dtype=pdt, device=DEV) if affine else None
    rm = (0.1 * torch.randn(c, device=DEV)).to(pdt) if stats else None
    rv = (0.5 + torch.rand(c, device=DEV)).to(pdt) if stats else None
    dy = torch.randn(shape, dtype=dtype, device=DEV)

    def fn(impl):
        return lambda x, w, b, rm, rv: impl(x, rm, rv, w, b, training, momentum, eps)

    ours = forward_backward(fn(NF.batch_norm), base, view, dy, (w, b), (rm, rv))
    theirs = forward_backward(fn(F.batch_norm), base, view, dy, (w, b), (rm, rv))
    ref = None
    if dtype != torch.float64:
        ref = forward_backward(
            fn(F.batch_norm), base, view, dy, (w, b), (rm, rv), dtype=torch.float64
        )
    compare_runs(ours, theirs, ref, dtype)
    assert ours[0].device.type == "cuda"
    if layout == "channels_last" and len(shape) == 3:
        # (N, C, L) stored as (N, L, C): normext keeps that layout (torch returns a contiguous
        # output, as it has no memory format for it)
        assert ours[0].stride() == view(base).stride()
    else:
        assert same_strides(ours[0], theirs[0]), (ours[0].stride(), theirs[0].stride())
    return ours, theirs, ref


# ---- shapes, dtypes, layouts --------------------------------------------------------------------

# (N, C, *): BatchNorm1d's (N, C) and (N, C, L), 2d, 3d; primes and non-powers of two; S % 8 != 0
# (scalar loads) and S % 8 == 0 (16-byte loads); C = 8192 in (N, C).
SHAPES = [
    (3, 7),
    (37, 5),
    (7, 1023),
    (64, 8192),
    (5, 3, 1),
    (1, 13, 37),
    (2, 5, 199),
    (2, 3, 1500),
    (4, 3, 7, 11),
    (3, 5, 6, 7),
    (8, 16, 14, 14),
    (3, 2, 1, 1),
    (2, 3, 5, 7, 9),
    (2, 4, 4, 8, 8),
]
# Many values per channel (several blocks per channel and the finalize kernel) and many channels.
LARGE = [
    (16, 3, 256, 256),
    (2, 3, 1024, 1024),
    (4, 64, 56, 56),
    (512, 8192),
    (3, 8192),
    (8, 2048, 7, 7),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(shape, training, dtype):
    run_bn(shape, dtype, training=training)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", LARGE, ids=str)
def test_large_shapes(shape, layout, dtype):
    """C = 3 with 1-2 million values per channel, and (N, C) with C = 8192, in both layouts."""
    run_bn(shape, dtype, layout)


LAYOUT_CASES = (
    [((6, 5, 37), layout) for layout in LAYOUTS]
    + [
        ((37, 5), layout)
        for layout in ["contiguous", "sliced", "transposed", "broadcast", "misaligned"]
    ]
    + [((4, 3, 5, 7), layout) for layout in LAYOUTS]
    + [((4, 16, 8, 8), layout) for layout in ["channels_last", "misaligned"]]
    + [
        ((4, 12, 3, 5), "channels_last"),
        ((5, 3, 1, 1), "channels_last"),
        ((3, 70, 2, 3), "channels_last"),
    ]
    + [((2, 3, 4, 5, 6), layout) for layout in ["transposed", "sliced", "channels_last"]]
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", LAYOUT_CASES, ids=str)
def test_layouts(shape, layout, training, dtype):
    """Any strides in; channels-last stays channels-last (natively, not copied), like torch."""
    (y, *_), _, _ = run_bn(shape, dtype, layout, training=training)
    if layout == "channels_last" and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("cudnn", [True, False], ids=["cudnn", "no-cudnn"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(6, 5, 37), (4, 3, 5, 7)], ids=str)
def test_permuted_input_output_strides(shape, dtype, affine, cudnn):
    """A permuted dense input: torch's CUDA output keeps its strides unless torch picks cuDNN
    (affine, float32/float64 or float32 params, cuDNN enabled), which returns a contiguous one;
    normext's output has the same strides in every case, in eager and in the fake kernel."""
    base, view = make_input(shape, dtype, "transposed", device=DEV)
    x = view(base)
    c = shape[1]
    pdt = torch.float32 if dtype in HALF else dtype
    w = torch.randn(c, device=DEV, dtype=pdt) if affine else None
    b = torch.randn(c, device=DEV, dtype=pdt) if affine else None
    with torch.backends.cudnn.flags(enabled=cudnn):
        theirs = F.batch_norm(x, None, None, w, b, True)
        ours = NF.batch_norm(x, None, None, w, b, True)
        fake = torch.library.opcheck(
            torch.ops.normext.batch_norm_fwd.default, (x, w, b, None, None, True, 1e-5)
        )
    assert ours.stride() == theirs.stride(), (ours.stride(), theirs.stride())
    assert fake["test_faketensor"] == "SUCCESS"
    check("y", ours, theirs, None, dtype, "fwd")


@pytest.mark.parametrize(
    "dtype,param_dtype",
    [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
    ids=str,
)
@pytest.mark.parametrize(
    "training,affine,stats",
    [
        (True, True, True),
        (True, False, True),
        (True, True, False),
        (True, False, False),
        (False, True, True),
        (False, False, True),
    ],
    ids=["train-affine-stats", "train-stats", "train-affine", "train", "eval-affine", "eval"],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_affine_and_statistics(layout, training, affine, stats, dtype, param_dtype):
    """affine=False, no running statistics, and float32 params with a half input."""
    run_bn(
        (5, 8, 3, 6),
        dtype,
        layout,
        training=training,
        affine=affine,
        stats=stats,
        param_dtype=param_dtype,
    )


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_momentum(momentum):
    run_bn((6, 3, 9), torch.float32, momentum=momentum)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("cumulative", [False, True], ids=["momentum", "cumulative"])
@pytest.mark.parametrize(
    "running_dtype,batch_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
    ],
    ids=str,
)
def test_update_stats_op(running_dtype, batch_dtype, cumulative, strided):
    """batch_norm_update_stats_ on CUDA (a kernel; strided buffers take the generic path) gives
    the CPU loop's results: both compute in float64, then round to the buffers' dtype. With
    num_batches_tracked (on the device) the factor 1 / count is read there."""
    c = 1000
    g = torch.Generator().manual_seed(3)

    def make(dtype, lo=0.0):
        t = (torch.rand(2 * c if strided else c, generator=g, dtype=torch.float64) + lo).to(dtype)
        return t[::2] if strided else t

    rm, rv = make(running_dtype, -0.5), make(running_dtype, 0.5)
    bm, bv = make(batch_dtype, -0.5), make(batch_dtype, 0.5)
    nbt = torch.tensor(7) if cumulative else None
    cpu = [rm.clone(), rv.clone()]
    dev = [rm.to(DEV), rv.to(DEV)]
    torch.ops.normext.batch_norm_update_stats_(*cpu, bm, bv, 0.1, 37, nbt)
    torch.ops.normext.batch_norm_update_stats_(
        *dev, bm.to(DEV), bv.to(DEV), 0.1, 37, None if nbt is None else nbt.to(DEV)
    )
    # the same double expression on both; a fused multiply-add on the GPU may move the double
    # result by an ulp, which survives rounding to the buffer's dtype only at a tie
    tol = 1e-12 if running_dtype == torch.float64 else torch.finfo(running_dtype).eps
    for name, a, b in zip(("running_mean", "running_var"), dev, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.equal(dev[0].cpu(), rm)  # it did update


# ---- modules over several training steps, then eval --------------------------------------------

MODULE_CASES = [
    ("BatchNorm1d", (8, 5), "contiguous"),
    ("BatchNorm1d", (4, 5, 7), "contiguous"),
    ("BatchNorm2d", (4, 5, 3, 6), "contiguous"),
    ("BatchNorm2d", (4, 16, 8, 8), "channels_last"),
    ("BatchNorm3d", (2, 5, 3, 4, 3), "contiguous"),
    ("BatchNorm3d", (2, 8, 3, 4, 4), "channels_last"),
]


@pytest.mark.parametrize("momentum", [0.1, None], ids=str)
@pytest.mark.parametrize(
    "dtype,module_dtype",
    [
        (torch.float32, None),
        (torch.float64, None),
        (torch.bfloat16, torch.float32),
        (torch.float16, None),
    ],
    ids=str,
)
@pytest.mark.parametrize("cls_name,shape,layout", MODULE_CASES, ids=str)
def test_module_training_steps(cls_name, shape, layout, dtype, module_dtype, momentum, steps=3):
    """The normext module and torch's on CUDA, from the same state, through `steps` training steps
    and then eval: outputs, grads and every buffer (num_batches_tracked included) after each."""
    c = shape[1]
    theirs = getattr(nn, cls_name)(c, momentum=momentum).to(DEV, module_dtype or dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours = getattr(normext, cls_name)(c, momentum=momentum).to(DEV, module_dtype or dtype)
    ours.load_state_dict(theirs.state_dict())
    for step in range(steps + 1):
        training = step < steps
        ours.train(training)
        theirs.train(training)
        base, view = make_input(shape, dtype, layout, scale=1 + step, offset=step - 1.0, device=DEV)
        dy = torch.randn(shape, dtype=dtype, device=DEV)
        for m in (ours, theirs):
            m.zero_grad()
        o = forward_backward(ours, base, view, dy)
        t = forward_backward(theirs, base, view, dy)
        ref = None
        if dtype != torch.float64:
            ref_module = (
                getattr(nn, cls_name)(c, momentum=momentum).to(DEV, torch.float64).train(training)
            )
            ref_module.load_state_dict(
                {
                    k: v.double() if v.is_floating_point() else v
                    for k, v in theirs.state_dict().items()
                }
            )
            r = forward_backward(ref_module, base, view, dy, dtype=torch.float64)
            ref = (r[0], r[1], [ref_module.weight.grad, ref_module.bias.grad], [])
        o = (o[0], o[1], [ours.weight.grad, ours.bias.grad], [])
        t = (t[0], t[1], [theirs.weight.grad, theirs.bias.grad], [])
        compare_runs(o, t, ref, dtype)
        assert same_strides(o[0], t[0])
        theirs_buffers = dict(theirs.named_buffers())
        for name, buf in ours.named_buffers():
            check(f"step {step}: {name}", buf, theirs_buffers[name], None, buf.dtype, "fwd")


# ---- registration: opcheck, torch.compile -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_opcheck(layout, dtype):
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) on CUDA."""
    base, view = make_input((4, 6, 5, 3), dtype, layout, device=DEV)
    x = view(base).detach().requires_grad_(True)
    acc = torch.float32
    w = torch.randn(6, device=DEV, dtype=acc if dtype in HALF else dtype, requires_grad=True)
    b = torch.randn(6, device=DEV, dtype=w.dtype, requires_grad=True)
    rm, rv = torch.zeros(6, device=DEV, dtype=w.dtype), torch.ones(6, device=DEV, dtype=w.dtype)
    fwd = torch.ops.normext.batch_norm_fwd.default
    torch.library.opcheck(fwd, (x, w, b, None, None, True, 1e-5))
    torch.library.opcheck(fwd, (x, w, b, rm, rv, False, 1e-5))
    torch.library.opcheck(fwd, (x, None, None, None, None, True, 0.1))
    _, mean, invstd, _ = fwd(x.detach(), w.detach(), b.detach(), None, None, True, 1e-5)
    dy = torch.randn_like(x)
    bwd = torch.ops.normext.batch_norm_bwd.default
    for training in (True, False):
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(bwd, (dy, x.detach(), w.detach(), mean, invstd, training, mask))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=str)
def test_compile_fullgraph(momentum, layout):
    """torch.compile(fullgraph=True) of a module with normext BatchNorm2d on CUDA: same outputs,
    grads and buffers as eager, in training and eval."""
    torch._dynamo.reset()

    def model():
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), normext.BatchNorm2d(8, momentum=momentum), nn.ReLU()
        ).to(DEV)

    eager, compiled_model = model(), model()
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(3):
        training = step < 2
        eager.train(training)
        compiled_model.train(training)
        base, view = make_input((4, 3, 9, 10), torch.float32, layout, device=DEV)
        x = view(base)
        ye = eager(x)
        yc = compiled(x)
        torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
        ye.sum().backward()
        yc.sum().backward()
        for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, atol=1e-4, rtol=1e-4, msg=name)
        for (name, be), bc in zip(eager.named_buffers(), compiled_model.buffers()):
            torch.testing.assert_close(bc, be, atol=1e-5, rtol=1e-5, msg=name)


# ---- DESIGN.md's edge cases ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((64, 33, 129), "contiguous"),
        ((4096, 37), "contiguous"),
        ((16, 70, 9, 11), "channels_last"),
        ((8, 3, 512, 512), "contiguous"),
        ((16, 3, 128, 128), "channels_last"),
        ((256, 8192), "contiguous"),
    ],
    ids=str,
)
def test_deterministic(shape, layout, dtype):
    """Two runs give bitwise-equal outputs, saved statistics, grads and running statistics (no
    floating-point atomics; the merge order depends only on the shape and the device)."""
    base, view = make_input(shape, dtype, layout, device=DEV)
    c = shape[1]
    w, b = torch.randn(c, dtype=dtype, device=DEV), torch.randn(c, dtype=dtype, device=DEV)
    stats = (torch.zeros(c, dtype=dtype, device=DEV), torch.ones(c, dtype=dtype, device=DEV))
    dy = torch.randn(shape, dtype=dtype, device=DEV)
    fn = lambda x, w, b, rm, rv: NF.batch_norm(x, rm, rv, w, b, True)
    flat = lambda r: [r[0], r[1], *r[2], *r[3]]
    first = flat(forward_backward(fn, base, view, dy, (w, b), stats))
    again = flat(forward_backward(fn, base, view, dy, (w, b), stats))
    for a, e in zip(first, again):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    x = view(base)
    out1 = torch.ops.normext.batch_norm_fwd(x, w, b, None, None, True, 1e-5)
    out2 = torch.ops.normext.batch_norm_fwd(x, w, b, None, None, True, 1e-5)
    for a, e in zip(out1, out2):
        torch.testing.assert_close(a, e, atol=0, rtol=0)


CONSTANT_CASES = [
    ((6, 3), "contiguous"),
    ((4, 3, 37), "contiguous"),
    ((3, 2, 1030), "contiguous"),
    ((4, 5, 3, 3), "channels_last"),
    ((1, 4, 2, 2, 3), "channels_last"),
    ((8, 3, 256, 256), "contiguous"),
    ((8, 3, 256, 256), "channels_last"),
    ((1024, 16), "contiguous"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.1, -3.7, 1e4, 0.0])
@pytest.mark.parametrize("shape,layout", CONSTANT_CASES, ids=str)
def test_constant_channel_is_exactly_zero(shape, layout, value, dtype):
    """A constant channel normalizes to exactly 0 (exactly bias with affine), never NaN, also when
    its values are spread over many blocks; its grads are finite."""
    base, view = make_input(shape, dtype, layout, device=DEV)
    with torch.no_grad():
        base[:, 1] = value
    y = NF.batch_norm(view(base), None, None, training=True)
    torch.testing.assert_close(y[:, 1], torch.zeros_like(y[:, 1]), atol=0, rtol=0)
    _, mean, _, var = torch.ops.normext.batch_norm_fwd(
        view(base), None, None, None, None, True, 1e-5
    )
    assert mean[1].item() == torch.tensor(value, dtype=dtype).item() and var[1].item() == 0
    b = torch.randn(shape[1], dtype=dtype, device=DEV)
    x = view(base).detach().requires_grad_(True)
    w = torch.randn(shape[1], dtype=dtype, device=DEV, requires_grad=True)
    y = NF.batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(y[:, 1], b[1].expand_as(y[:, 1]), atol=0, rtol=0)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((8, 3, 37), "contiguous"),
        ((4, 3, 5, 7), "channels_last"),
        ((4099, 3), "contiguous"),
        ((8, 3, 512, 512), "contiguous"),
        ((64, 3, 128, 128), "channels_last"),
    ],
    ids=str,
)
def test_large_offset_is_stable(shape, layout):
    """float32 channels with mean 1e4 and std 1e-2 (up to 2 million values per channel): the
    statistics do not cancel. Against a float64 reference from the same float32 inputs: var and
    invstd to 1e-4 relative; the mean and the output to what rounding the mean to float32 costs."""
    base, view = make_input(shape, torch.float32, layout, scale=1e-2, offset=1e4, device=DEV)
    x = view(base)
    y, mean, invstd, var = torch.ops.normext.batch_norm_fwd(x, None, None, None, None, True, 1e-5)
    x64 = x.double()
    dims = [0, *range(2, x.dim())]
    ref_var = x64.var(dim=dims, unbiased=False)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(invstd.double(), (ref_var + 1e-5).rsqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), x64.mean(dim=dims), rtol=0, atol=1e-3)
    ref = F.batch_norm(x64, None, None, training=True, eps=1e-5)
    bound = 0.5 * torch.finfo(torch.float32).eps * 1e4 * invstd.max().item() + 1e-4
    torch.testing.assert_close(y.double(), ref, atol=bound, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0), (0, 2, 3, 4)], ids=str)
def test_empty(shape, training, dtype):
    """An empty batch gives an empty output and zero weight/bias grads, and
    leaves the running statistics unchanged, as in torch."""
    run_bn(shape, dtype, training=training)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_saved_statistics(layout, dtype):
    """save_mean/save_invstd/batch_var are (C,) and float32 for half inputs (float64 for float64);
    batch_var is empty in eval; weight/bias grads are (C,) in that dtype, or empty when not asked."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    base, view = make_input((4, 3, 5, 7), dtype, layout, device=DEV)
    x = view(base)
    w = torch.randn(3, dtype=dtype, device=DEV)
    y, mean, invstd, var = torch.ops.normext.batch_norm_fwd(x, w, None, None, None, True, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    for t in (mean, invstd, var):
        assert t.dtype == acc and t.shape == (3,)
    xa = x.to(acc)
    torch.testing.assert_close(mean, xa.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, xa.var(dim=(0, 2, 3), unbiased=False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(invstd, (var + 1e-5).rsqrt(), atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(x)
    dx, dw, db = torch.ops.normext.batch_norm_bwd(dy, x, w, mean, invstd, True, [True, True, True])
    assert dx.dtype == dtype and dx.shape == x.shape
    assert dw.dtype == acc and dw.shape == (3,) and db.dtype == acc and db.shape == (3,)
    _, dw0, db0 = torch.ops.normext.batch_norm_bwd(
        dy, x, w, mean, invstd, True, [True, False, False]
    )
    assert dw0.numel() == 0 and db0.numel() == 0
    rm, rv = torch.zeros(3, dtype=acc, device=DEV), torch.ones(3, dtype=acc, device=DEV)
    _, emean, einvstd, evar = torch.ops.normext.batch_norm_fwd(x, w, None, rm, rv, False, 1e-5)
    assert emean.shape == (3,) and einvstd.shape == (3,) and evar.shape == (0,)
    torch.testing.assert_close(einvstd, torch.full((3,), (1 + 1e-5) ** -0.5, dtype=acc, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "mask",
    [
        [True, True, True],
        [True, False, False],
        [False, True, False],
        [False, False, True],
        [True, False, True],
    ],
    ids=str,
)
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((6, 5, 37), "contiguous"),
        ((4, 8, 5, 7), "channels_last"),
        ((300, 24), "contiguous"),
        ((2, 3, 70001), "contiguous"),
    ],
    ids=str,
)
def test_ops_match_cpu(shape, layout, mask, training, dtype):
    """The CUDA ops against normext's CPU ops (the same formulas, computed independently): every
    output of batch_norm_fwd, and batch_norm_bwd for every output_mask, in train and eval."""
    base, view = make_input(shape, dtype, layout, device=DEV)
    x = view(base)
    c = shape[1]
    pdt = torch.float32 if dtype in HALF else dtype
    w, b = torch.randn(c, dtype=pdt, device=DEV), torch.randn(c, dtype=pdt, device=DEV)
    rm, rv = 0.1 * torch.randn(c, dtype=pdt, device=DEV), 0.5 + torch.rand(c, dtype=pdt, device=DEV)
    dy = torch.randn_like(x)
    args = (w, b, None if training else rm, None if training else rv, training, 1e-5)
    gpu = torch.ops.normext.batch_norm_fwd(x, *args)
    cpu = torch.ops.normext.batch_norm_fwd(
        x.cpu(), *[a.cpu() if torch.is_tensor(a) else a for a in args]
    )
    # Both sides round the same float32 (float64) results: a last-bit difference in float32
    # becomes at most one ulp of a half output, eps * |value|.
    tol = {
        torch.float32: {"atol": 1e-5, "rtol": 1e-5},
        torch.float64: TOL[torch.float64]["fwd"],
    }.get(dtype, {"atol": 1e-5, "rtol": torch.finfo(dtype).eps})
    for name, g, h in zip(("y", "save_mean", "save_invstd", "batch_var"), gpu, cpu):
        assert g.dtype == h.dtype and g.shape == h.shape, name
        torch.testing.assert_close(g.cpu(), h, **tol, msg=lambda m, name=name: f"{name}: {m}")
    _, mean, invstd, _ = gpu
    gpu = torch.ops.normext.batch_norm_bwd(dy, x, w, mean, invstd, training, mask)
    cpu = torch.ops.normext.batch_norm_bwd(
        dy.cpu(), x.cpu(), w.cpu(), mean.cpu(), invstd.cpu(), training, mask
    )
    tol = {
        torch.float32: {"atol": 1e-4, "rtol": 1e-4},
        torch.float64: TOL[torch.float64]["bwd"],
    }.get(dtype, {"atol": 1e-4, "rtol": torch.finfo(dtype).eps})
    for name, g, h in zip(("dx", "dweight", "dbias"), gpu, cpu):
        assert g.dtype == h.dtype and g.shape == h.shape, name
        scale = max(1.0, h.abs().max().item()) if h.numel() else 1.0
        torch.testing.assert_close(
            g.cpu(),
            h,
            atol=tol["atol"] * scale,
            rtol=tol["rtol"],
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nonfinite_propagates(layout, training, bad, dtype):
    """NaN/Inf in one channel: NaN/Inf where torch has them; the other channels untouched."""
    base, view = make_input((4, 3, 5, 8), dtype, layout, device=DEV)
    with torch.no_grad():
        base[2, 1, 3, 4] = bad
    x = view(base).detach()
    w, b = torch.randn(3, dtype=dtype, device=DEV), torch.randn(3, dtype=dtype, device=DEV)
    stats = [
        (0.1 * torch.randn(3, device=DEV)).to(dtype),
        (0.5 + torch.rand(3, device=DEV)).to(dtype),
    ]
    y = NF.batch_norm(x, *[s.clone() for s in stats], w, b, training)
    expected = F.batch_norm(x, *[s.clone() for s in stats], w, b, training)
    torch.testing.assert_close(torch.isnan(y), torch.isnan(expected))
    torch.testing.assert_close(torch.isinf(y), torch.isinf(expected))
    ref = F.batch_norm(x.double(), *[s.double() for s in stats], w.double(), b.double(), training)
    check("finite channels", y[:, [0, 2]], expected[:, [0, 2]], ref[:, [0, 2]], dtype, "fwd")


def test_device_errors():
    """Mismatched devices give a clear error, not a crash."""
    x = torch.randn(4, 3, 5, device=DEV)
    w = torch.randn(3, device=DEV)
    with pytest.raises(RuntimeError, match="weight is on cpu"):
        torch.ops.normext.batch_norm_fwd(x, w.cpu(), None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.normext.batch_norm_fwd(x.cpu(), w, None, None, None, True, 1e-5)
    _, mean, invstd, _ = torch.ops.normext.batch_norm_fwd(x, w, None, None, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="grad_out is on"):
        torch.ops.normext.batch_norm_bwd(torch.randn(4, 3, 5), x, w, mean, invstd, True, [True] * 3)
    with pytest.raises(RuntimeError, match="save_mean/save_invstd"):
        torch.ops.normext.batch_norm_bwd(
            torch.randn_like(x), x, w, mean.cpu(), invstd, True, [True] * 3
        )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Inputs on cuda:1 run there (device guard), whatever the current device."""
    x = torch.randn(8, 4, 5, 5, device="cuda:1")
    y = NF.batch_norm(x, None, None, training=True)
    assert y.device == x.device
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), atol=1e-5, rtol=1e-5)
