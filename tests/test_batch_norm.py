"""normext.functional.batch_norm, the BatchNorm modules' training bookkeeping and the batch_norm
ops against torch.nn: forward output, input/weight/bias grads and running statistics over shapes,
dtypes, layouts (strided views, channels_last), affine/track_running_stats/momentum, train and
eval, plus DESIGN.md's edge cases (eps=0, constant channels, large offsets, empty batches, one
value per channel, NaN/Inf, saved statistics, determinism). Tolerances: conftest.TOL."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPES,
    HALF,
    LAYOUTS,
    REF_ERR_MULT,
    TOL,
    check,
    compare_runs,
    forward_backward,
    make_input,
    prefixed,
    same_strides,
)
from torch import nn

import normext
import normext.functional as NF

# (N, C, *): 1, primes, non-powers of two; BatchNorm1d's (N, C) and (N, C, L), 2d, 3d.
SHAPES = [
    (2, 1),
    (3, 7),
    (37, 5),
    (7, 1023),
    (5, 3, 1),
    (1, 13, 37),
    (2, 5, 199),
    (2, 3, 1500),
    (4, 3, 7, 11),
    (3, 2, 1, 1),
    (2, 3, 5, 7, 9),
    (1, 2, 3, 1, 1),
]
LARGE = [(16, 64, 32, 32), (4096, 1023), (3, 5, 70001)]


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
    """normext vs torch (and a float64 reference, conftest.check) for one configuration: output,
    grads of input/weight/bias, running statistics after the call. Returns the three runs."""
    base, view = make_input(shape, dtype, layout, scale=scale, offset=offset)
    c = shape[1]
    pdt = param_dtype or dtype
    w = torch.randn(c, dtype=pdt) if affine else None
    b = torch.randn(c, dtype=pdt) if affine else None
    rm = (0.1 * torch.randn(c)).to(pdt) if stats else None
    rv = (0.5 + torch.rand(c)).to(pdt) if stats else None
    dy = torch.randn(shape, dtype=dtype)

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
    if layout == "channels_last" and len(shape) == 3:
        # (N, C, L) stored as (N, L, C): normext computes in that layout and keeps it, as on CUDA
        # (torch returns a contiguous output: 3-D tensors have no channels-last format; copying
        # to it took normext's (64, 512, 256) fwd+bwd from 41 to 125 ms, torch's being 104-127)
        assert ours[0].stride() == view(base).stride() or ours[0].numel() == 0
    else:
        assert same_strides(ours[0], theirs[0]), (ours[0].stride(), theirs[0].stride())
    return ours, theirs, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(shape, training, dtype):
    run_bn(shape, dtype, training=training)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", LARGE, ids=str)
def test_large_shapes(shape, dtype):
    run_bn(shape, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_channels_last(dtype):
    run_bn((8, 96, 28, 28), dtype, "channels_last")


# Inputs past the size at which outputs are written with non-temporal stores (vec_utils.h's
# stream_output: 24 MB touched, long aligned runs), one per path: the fused NCHW forward and
# backward (64 channels of 8 planes of 16383 values, so planes start unaligned), the unfused
# NCHW walk over long planes, channels-last rows, and (N, C) rows.
STREAMED_CASES = [
    ((8, 64, 127, 129), "contiguous", torch.float32),
    ((8, 64, 127, 129), "contiguous", torch.bfloat16),
    ((4, 8, 509, 511), "contiguous", torch.float32),
    ((8, 64, 97, 101), "channels_last", torch.float32),
    ((8, 64, 97, 101), "channels_last", torch.float16),
    ((32768, 128), "contiguous", torch.float32),
    ((32768, 128), "contiguous", torch.float64),
]


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout,dtype", STREAMED_CASES, ids=str)
def test_streamed_outputs(shape, layout, dtype, training):
    run_bn(shape, dtype, layout, training=training)


# NCHW planes shorter than 4 KB with at least 64 channels: the backward's sums walk memory in
# order, in tasks with per-channel partials (planar_reduce); one task, several, and (10000
# channels) too many channels for the partials, so channel by channel again.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 96, 5, 7), (16, 128, 7, 7), (4, 10000, 3, 3)], ids=str)
def test_short_planes_many_channels(shape, training, dtype):
    run_bn(shape, dtype, training=training)


# Short NCHW planes are walked as one stream of whole vector steps (planes_map and
# planes_grad_sums in csrc/cpu/vec_utils.h): a step straddles two planes, and each of its lanes
# must take its own channel's constants and sums. Plane lengths about a step (16 values for
# float32 and bfloat16 on AVX2, 32 on AVX-512, 8 for float64); (41, 101, 17) has enough values
# for several tasks, which then start mid-sample (in the middle of a run of planes); (2, 9000, 17)
# has too many channels for per-task partials, so the backward's sums go channel by channel.
BOUNDARY_SHAPES = [
    (3, 70, 16),
    (5, 67, 17),
    (4, 65, 5, 5),
    (2, 131, 33),
    (6, 64, 7, 7),
    (2, 9, 14, 14),
    (3, 5, 31),
    (41, 101, 17),
    (2, 9000, 17),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", BOUNDARY_SHAPES, ids=str)
def test_short_plane_boundaries(shape, training, dtype):
    run_bn(shape, dtype, training=training)


# Rows of more channels than a tile (for_row_tiles in batch_norm.cpp: 1024-4096 columns at a
# time, by how many per-channel arrays the loop reads), not a multiple of a vector step, in
# blocks of 8 rows and a remainder: (N, C), (N, C, L) stored as (N, L, C), and channels_last.
TILE_CASES = [
    ((9, 4111), "contiguous"),
    ((3, 5000, 2), "channels_last"),
    ((2, 2053, 3, 1), "channels_last"),
    ((17, 9001), "contiguous"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, layout", TILE_CASES, ids=str)
def test_wide_rows_in_tiles(shape, layout, training, dtype):
    run_bn(shape, dtype, layout, training=training, offset=3.0)


def check_nonfinite_channel(x, dy, c):
    """Training forward and backward of x (a NaN or Inf placed in channel c of x or dy), random
    weight and bias: normext's y, dx, dw, db are NaN and Inf exactly where torch's are, and every
    channel but c is finite."""
    channels = x.shape[1]
    w, b = torch.randn(channels, dtype=x.dtype), torch.randn(channels, dtype=x.dtype)
    runs = []
    for fn in (NF.batch_norm, F.batch_norm):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = fn(xs, None, None, ws, bs, True)
        runs.append((y, *torch.autograd.grad(y, (xs, ws, bs), dy)))
    keep = torch.tensor([k for k in range(channels) if k != c])
    for name, ours, theirs in zip(["y", "dx", "dw", "db"], *runs):
        torch.testing.assert_close(torch.isnan(ours), torch.isnan(theirs), msg=name)
        torch.testing.assert_close(torch.isinf(ours), torch.isinf(theirs), msg=name)
        assert torch.isfinite(ours.index_select(1 if ours.dim() > 1 else 0, keep)).all(), name


# NCHW planes shorter than a vector step, taken as N rows of C * S values where S <= 4 or
# N >= S (Regroup in csrc/cpu/batch_norm.cpp), among them one row (N = 1) and a 5-D input;
# and (2, 300, 3, 3), which stays on the planar loops.
TINY_CASES = [(1, 64, 2, 2), (2, 2048, 2, 2), (16, 40, 3, 3), (32, 33, 3), (5, 7, 1, 2),
              (7, 19, 2, 1, 2), (2, 300, 3, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 50.0])  # 50: past the folded forms' range (kFoldOffset)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", TINY_CASES, ids=str)
def test_tiny_planes_as_rows(shape, training, offset, dtype):
    run_bn(shape, dtype, training=training, offset=offset)


# Channels-last rows narrower than a vector step, k rows taken as one (Regroup in
# csrc/cpu/batch_norm.cpp: k a power of two dividing the rows), (N, C) inputs among them; and
# (7, 5, 3, 3), whose 63 rows are odd (k = 1, the rows as they are).
NARROW_CASES = [((32, 3, 8, 8), "channels_last"), ((4, 8, 6, 6), "channels_last"),
                ((2, 2, 14, 14), "channels_last"), ((64, 10), "contiguous"),
                ((24, 1), "contiguous"), ((3, 5, 2, 2, 2), "channels_last"),
                ((7, 5, 3, 3), "channels_last")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0.0, 50.0])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, layout", NARROW_CASES, ids=str)
def test_narrow_rows_grouped(shape, layout, training, offset, dtype):
    run_bn(shape, dtype, layout, training=training, offset=offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "dy"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["tiny_planes", "narrow_rows"])
def test_nonfinite_tiny_planes(channels_last, where, bad, dtype):
    """NaN/Inf in x or dy of one channel of (16, 8, 3, 3), whose planes (NCHW) or rows (channels
    last) are regrouped as wider rows: its outputs and grads are NaN and Inf where torch's are (a
    channel's columns merge as a plain sum where a column's mean is not finite), the other
    channels are untouched."""
    shape, c = (16, 8, 3, 3), 5
    x, dy = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        (x if where == "x" else dy)[9, c, 1, 2] = bad
    check_nonfinite_channel(x, dy, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["first", "last"])
def test_nonfinite_at_plane_boundary(where, bad, dtype):
    """A NaN/Inf at the first or last value of a short plane: its channel's outputs and grads
    are NaN where torch's are, and the neighbouring channels (whose values share a vector step
    with it) are untouched."""
    shape, c = (41, 101, 17), 50
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        x[20, c, 0 if where == "first" else -1] = bad
    w, b = torch.randn(101, dtype=dtype), torch.randn(101, dtype=dtype)
    dy = torch.randn(shape, dtype=dtype)
    runs = []
    for fn in (NF.batch_norm, F.batch_norm):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = fn(xs, None, None, ws, bs, True)
        runs.append((y, *torch.autograd.grad(y, (xs, ws, bs), dy)))
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    yd = F.batch_norm(xd, None, None, wd, bd, True)
    ref = (yd, *torch.autograd.grad(yd, (xd, wd, bd), dy.double()))
    keep = torch.tensor([k for k in range(101) if k != c])

    def others(t):  # every channel but c (dim 1 of y and dx, dim 0 of dw and db)
        return t.index_select(1 if t.dim() > 1 else 0, keep)

    for name, ours, theirs, r in zip(["y", "dx", "dw", "db"], *runs, ref):
        torch.testing.assert_close(torch.isnan(ours), torch.isnan(theirs), msg=name)
        assert not torch.isnan(others(ours)).any(), name
        check(name, others(ours), others(theirs), others(r), dtype, "fwd" if name == "y" else "bwd")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["x", "dy"])
def test_nonfinite_fused(where, bad, dtype):
    """NaN/Inf in x or dy of one channel, on the fused NCHW path (planes of 2304 values): its
    outputs and grads are NaN and Inf where torch's are, the other channels are untouched. (The
    bfloat16 rounding skips its NaN check where the channel's constants are finite; NaNs made
    from bfloat16 inputs round right without it, so the check itself is covered by
    test_bfloat16_nan_payload_params.)"""
    shape, c = (3, 4, 48, 48), 2
    x, dy = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        (x if where == "x" else dy)[1, c, 7, 30] = bad
    check_nonfinite_channel(x, dy, c)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape, channels_last",  # fused NCHW, planes as one stream, channels-last rows, (N, C)
    [((3, 4, 48, 48), False), ((4, 3, 5, 7), False), ((4, 20, 5, 7), True), ((64, 40), False)],
    ids=str,
)
def test_bfloat16_nan_payload_params(shape, channels_last, training):
    """A float32 weight or bias that is a NaN with a nonzero low half (0x7fffffff, 0xffffffff)
    on bfloat16 input: its channel's y and dx are NaN, as torch's. Rounded as a number such a NaN
    turns into -0 or +0 (bf16_round_lanes), so the kernels keep the NaN check for any channel
    whose constants are not all finite (finite_all in csrc/cpu/vec_utils.h)."""
    g = torch.Generator().manual_seed(4)
    c = shape[1]
    x = torch.randn(shape, generator=g).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w, b = 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
    w.view(torch.int32)[1] = 0x7FFFFFFF
    b.view(torch.int32)[2] = -1  # 0xffffffff
    w, b = w.requires_grad_(), b.requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    dy = torch.randn(shape, generator=g).bfloat16()
    runs = []
    for fn in (NF.batch_norm, F.batch_norm):
        y = fn(x, rm.clone(), rv.clone(), w, b, training)
        runs.append((y, *torch.autograd.grad(y, (x,), dy)))
    for name, ours, theirs in zip(["y", "dx"], *runs):
        assert torch.isnan(theirs[:, 1]).all(), name
        torch.testing.assert_close(torch.isnan(ours), torch.isnan(theirs), msg=name)
        torch.testing.assert_close(torch.isinf(ours), torch.isinf(theirs), msg=name)


@pytest.mark.parametrize("shape", [(3, 4, 48, 48), (4, 3, 5, 7)], ids=str)
def test_bfloat16_overflow_to_inf(shape):
    """bfloat16 outputs past bfloat16's range round to +-Inf as torch's do, also where the NaN
    check is skipped (finite constants; the fused path for (3, 4, 48, 48)): a weight of 3e38
    takes outputs of |x_hat| = 1.4 past 3.39e38 and leaves those of 0.07 finite."""
    g = torch.Generator().manual_seed(3)
    levels = torch.tensor([-2.0, -0.1, 0.1, 2.0])
    x = levels[torch.randint(0, 4, shape, generator=g)].bfloat16()
    c = shape[1]
    w = torch.full((c,), 3e38).bfloat16()
    b = torch.zeros(c, dtype=torch.bfloat16)
    ours = NF.batch_norm(x, None, None, w, b, training=True)
    theirs = F.batch_norm(x, None, None, w, b, training=True)
    assert torch.isinf(theirs).float().mean() > 0.3
    torch.testing.assert_close(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(torch.sign(ours), torch.sign(theirs))
    fin = torch.isfinite(theirs)
    torch.testing.assert_close(ours[fin], theirs[fin], rtol=2 * 2**-8, atol=0)


LAYOUT_CASES = (
    [((6, 5, 37), layout) for layout in LAYOUTS + ["channels_last"]]
    + [((0, 5, 37), "channels_last"), ((6, 5, 1), "channels_last")]
    + [((37, 5), layout) for layout in LAYOUTS]
    + [((4, 3, 5, 7), layout) for layout in LAYOUTS + ["channels_last"]]
    + [
        ((5, 3, 1, 1), "channels_last"),
        ((4, 1, 3, 3), "channels_last"),
        ((3, 70, 2, 3), "channels_last"),
    ]
    + [((2, 3, 4, 5, 6), layout) for layout in ["transposed", "sliced", "channels_last_3d"]]
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", LAYOUT_CASES, ids=str)
def test_layouts(shape, layout, training, dtype):
    """Any strides in; the output keeps the input's memory format exactly as torch's does."""
    (y, *_), _, _ = run_bn(shape, dtype, layout, training=training)
    if layout.startswith("channels_last") and len(shape) in (4, 5):
        fmt = torch.channels_last if layout == "channels_last" else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)


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
def test_affine_and_statistics(training, affine, stats, dtype, param_dtype):
    """affine=False (no weight/bias), no running statistics (track_running_stats=False), and
    float32 params/statistics with a bfloat16/float16 input."""
    run_bn(
        (5, 4, 3, 6), dtype, training=training, affine=affine, stats=stats, param_dtype=param_dtype
    )


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_momentum(momentum, dtype):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance."""
    run_bn((6, 3, 9), dtype, momentum=momentum)


# ---- modules over several training steps, then eval --------------------------------------------

MODULE_CASES = [
    ("BatchNorm1d", (8, 5)),
    ("BatchNorm1d", (4, 5, 7)),
    ("BatchNorm2d", (4, 5, 3, 6)),
    ("BatchNorm3d", (2, 5, 3, 4, 3)),
]


def run_module_steps(
    cls_name, shape, dtype=torch.float32, module_dtype=None, layout="contiguous", steps=3, **kwargs
):
    """The normext module and torch's, from the same state, through `steps` training steps
    (forward, backward) and then eval (forward, backward): outputs, grads and every buffer,
    num_batches_tracked included, after each step."""
    c = shape[1]
    theirs = getattr(nn, cls_name)(c, **kwargs).to(module_dtype or dtype)
    if theirs.weight is not None:  # not the init values, so that weight/bias matter
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    ours = getattr(normext, cls_name)(c, **kwargs).to(module_dtype or dtype)
    ours.load_state_dict(theirs.state_dict())
    assert type(ours) is not type(theirs)
    params = lambda m: [m.weight, m.bias] if m.weight is not None else []
    for step in range(steps + 1):
        training = step < steps
        ours.train(training)
        theirs.train(training)
        base, view = make_input(shape, dtype, layout, scale=1 + step, offset=step - 1.0)
        dy = torch.randn(shape, dtype=dtype)
        for m in (ours, theirs):
            m.zero_grad()
        o, t = forward_backward(ours, base, view, dy), forward_backward(theirs, base, view, dy)
        ref = None
        if dtype != torch.float64:
            # theirs' state after its call: its output never depends on what the call changed
            ref_module = getattr(nn, cls_name)(c, **kwargs).double().train(training)
            ref_module.load_state_dict(
                {
                    k: v.double() if v.is_floating_point() else v
                    for k, v in theirs.state_dict().items()
                }
            )
            ref = forward_backward(ref_module, base, view, dy, dtype=torch.float64)
            ref = (ref[0], ref[1], [p.grad for p in params(ref_module)], [])
        o = (o[0], o[1], [p.grad for p in params(ours)], [])
        t = (t[0], t[1], [p.grad for p in params(theirs)], [])
        compare_runs(o, t, ref, dtype)
        assert same_strides(o[0], t[0])
        ours_buffers, their_buffers = dict(ours.named_buffers()), dict(theirs.named_buffers())
        assert ours_buffers.keys() == their_buffers.keys()
        for name, buf in ours_buffers.items():
            check(f"step {step}: {name}", buf, their_buffers[name], None, buf.dtype, "fwd")
    return ours, theirs


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("momentum", [0.1, None, 1.0], ids=str)
@pytest.mark.parametrize("cls_name,shape", MODULE_CASES, ids=str)
def test_module_training_steps(cls_name, shape, momentum, track, affine):
    """momentum=None is the cumulative average (factor 1/num_batches_tracked);
    num_batches_tracked counts training calls; track_running_stats=False uses batch statistics in
    eval too."""
    run_module_steps(cls_name, shape, momentum=momentum, track_running_stats=track, affine=affine)


@pytest.mark.parametrize(
    "dtype,module_dtype",
    [
        (torch.float64, None),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, None),
        (torch.float16, None),
    ],
    ids=str,
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_dtypes(dtype, module_dtype, momentum):
    """Modules in float64, in bfloat16/float16, and float32 modules fed bfloat16/float16 inputs
    (autocast-style mixed precision: running statistics stay float32)."""
    run_module_steps("BatchNorm2d", (4, 5, 3, 6), dtype, module_dtype, momentum=momentum)


@pytest.mark.parametrize(
    "cls_name,shape,layout",
    [
        ("BatchNorm2d", (4, 5, 3, 6), "channels_last"),
        ("BatchNorm3d", (2, 5, 3, 4, 3), "channels_last_3d"),
        ("BatchNorm1d", (6, 5, 11), "transposed"),
    ],
)
def test_module_layouts(cls_name, shape, layout):
    run_module_steps(cls_name, shape, layout=layout)


# ---- DESIGN.md's edge cases --------------------------------------------------------------------


def test_eps_zero_accepted_in_training():
    """normext accepts eps=0 in training (torch refuses it). BatchNorm1d(4, eps=0, momentum=1)
    on arange(60).reshape(3, 4, 5): channel c holds 20 n + 5 c + l (n < 3, l < 5), so its running
    variance is the unbiased variance of those 15 values, 287.857142..., and the output divides
    by the biased one exactly."""
    m = normext.BatchNorm1d(4, eps=0.0, momentum=1.0, affine=False).double()
    x = torch.arange(60.0, dtype=torch.float64).reshape(3, 4, 5)
    y = m(x)
    values = [[20 * n + 5 * c + l for n in range(3) for l in range(5)] for c in range(4)]
    expected_var = torch.tensor([statistics.variance(v) for v in values], dtype=torch.float64)
    torch.testing.assert_close(expected_var, torch.full((4,), 287.857142857, dtype=torch.float64))
    torch.testing.assert_close(m.running_var, expected_var, atol=0, rtol=1e-12)
    torch.testing.assert_close(
        m.running_mean,
        torch.tensor([statistics.mean(v) for v in values], dtype=torch.float64),
        atol=0,
        rtol=1e-12,
    )
    expected_y = torch.tensor(
        [
            [
                [
                    (20 * n + 5 * c + l - statistics.mean(values[c])) / statistics.pstdev(values[c])
                    for l in range(5)
                ]
                for c in range(4)
            ]
            for n in range(3)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(y, expected_y, atol=1e-12, rtol=1e-12)
    # float32, with the default affine parameters, gives the same within float32 rounding
    m32 = normext.BatchNorm1d(4, eps=0.0, momentum=1.0)
    y32 = m32(x.float())
    torch.testing.assert_close(m32.running_var, torch.full((4,), 287.8571, dtype=torch.float32))
    torch.testing.assert_close(y32, expected_y.float())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("eps", [-1e-5, -1.0])
def test_negative_eps_raises(eps, training):
    """torch's ValueError and message (its ModuleInfo error inputs match "eps must be positive"
    in training); the op itself says non-negative, as eps=0 passes it."""
    x = torch.randn(4, 3)
    msg = "eps must be positive during training" if training else "eps must be non-negative"
    for lib in (torch.nn.functional, NF):
        with pytest.raises(ValueError, match=msg):
            lib.batch_norm(x, torch.zeros(3), torch.ones(3), training=training, eps=eps)
    for mod in (torch.nn, normext):
        m = mod.BatchNorm1d(3, eps=eps).train(training)
        with pytest.raises(ValueError, match=msg):
            m(x)
    with pytest.raises(RuntimeError, match="eps must be non-negative"):
        torch.ops.normext.batch_norm_fwd(
            x, None, None, torch.zeros(3), torch.ones(3), training, eps
        )


CONSTANT_CASES = [
    ((6, 3), "contiguous"),
    ((4, 3, 37), "contiguous"),
    ((3, 2, 1030), "contiguous"),
    ((4, 5, 3, 3), "channels_last"),
    ((1, 4, 2, 2, 3), "channels_last_3d"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.1, -3.7, 1e4, 0.0])
@pytest.mark.parametrize("shape,layout", CONSTANT_CASES, ids=str)
def test_constant_channel_is_exactly_zero(shape, layout, value, dtype):
    """A constant channel normalizes to exactly 0 (with eps > 0), never NaN; its grads are finite."""
    base, view = make_input(shape, dtype, layout)
    with torch.no_grad():
        base[:, 1] = value
    y = NF.batch_norm(view(base), None, None, training=True)
    torch.testing.assert_close(y[:, 1], torch.zeros_like(y[:, 1]), atol=0, rtol=0)
    b = torch.randn(shape[1], dtype=dtype)
    x = view(base).detach().requires_grad_(True)
    w = torch.randn(shape[1], dtype=dtype, requires_grad=True)
    y = NF.batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(y[:, 1], b[1].expand_as(y[:, 1]), atol=0, rtol=0)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize(
    "shape,layout",
    [((8, 3, 37), "contiguous"), ((4, 3, 5, 7), "channels_last"), ((4099, 3), "contiguous")],
    ids=str,
)
def test_large_offset_is_stable(shape, layout):
    """float32 channels with mean 1e4 and std 1e-2: statistics must not cancel (no E[x^2] -
    E[x]^2). Against a float64 reference from the same float32 inputs: invstd and the running
    variance to 1e-3 relative; the output to what rounding the mean to float32 costs."""
    base, view = make_input(shape, torch.float32, layout, scale=1e-2, offset=1e4)
    x = view(base)
    y, mean, invstd, var = torch.ops.normext.batch_norm_fwd(x, None, None, None, None, True, 1e-5)
    x64 = x.double()
    dims = [0, *range(2, x.dim())]
    ref_var = x64.var(dim=dims, unbiased=False)
    torch.testing.assert_close(invstd.double(), (ref_var + 1e-5).rsqrt(), rtol=1e-3, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), x64.mean(dim=dims), rtol=0, atol=1e-3)
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    NF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rv.double(), x64.var(dim=dims, unbiased=True), rtol=1e-3, atol=0)
    ref = F.batch_norm(x64, None, None, training=True, eps=1e-5)
    bound = 0.5 * torch.finfo(torch.float32).eps * 1e4 * invstd.max().item() + 1e-4
    torch.testing.assert_close(y.double(), ref, atol=bound, rtol=0)
    torch_err = (F.batch_norm(x, None, None, training=True).double() - ref).abs().max().item()
    assert (y.double() - ref).abs().max().item() <= REF_ERR_MULT * torch_err + 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0), (0, 2, 3, 4)], ids=str)
def test_empty_batch(shape, training, dtype):
    """An empty batch gives an empty output and zero weight/bias grads, and leaves the running
    statistics unchanged, as in torch."""
    (_, _, _, (_rm, _rv)), _, _ = run_bn(shape, dtype, training=training)


@pytest.mark.parametrize("cls_name,shape", [("BatchNorm1d", (0, 3)), ("BatchNorm2d", (0, 3, 2, 2))])
def test_empty_batch_module(cls_name, shape):
    """num_batches_tracked still counts an empty training batch, as torch's does."""
    ours, theirs = getattr(normext, cls_name)(3), getattr(nn, cls_name)(3)
    inputs = [torch.randn(shape), torch.randn(2, *shape[1:]), torch.randn(shape)]
    for m in (ours, theirs):
        for x in inputs:
            torch.testing.assert_close(m(x).shape, x.shape)
    for (name, a), (_, e) in zip(ours.named_buffers(), theirs.named_buffers()):
        check(name, a, e, None, a.dtype, "fwd")
    assert ours.num_batches_tracked.item() == 3


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1), (1, 4, 1, 1, 1)], ids=str)
def test_one_value_per_channel_in_training(shape):
    """More than one value per channel is required in training, with torch's message; eval is fine."""
    x = torch.randn(shape)
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    msg = "Expected more than 1 value per channel when training"
    with pytest.raises(ValueError, match=msg):
        getattr(nn, cls)(4)(x)  # torch's own behaviour, which we copy
    with pytest.raises(ValueError, match=msg):
        getattr(normext, cls)(4)(x)
    with pytest.raises(ValueError, match=msg):
        NF.batch_norm(x, None, None, training=True)
    ours, theirs = getattr(normext, cls)(4).eval(), getattr(nn, cls)(4).eval()
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nonfinite_propagates(layout, training, bad, dtype):
    """NaN/Inf in one channel: outputs and running statistics are what torch gives (NaN where
    torch has NaN); other channels are untouched."""
    base, view = make_input((4, 3, 5, 7), dtype, layout)
    with torch.no_grad():
        base[2, 1, 3, 4] = bad
    x = view(base).detach()
    w, b = torch.randn(3, dtype=dtype), torch.randn(3, dtype=dtype)
    stats = [(0.1 * torch.randn(3)).to(dtype), (0.5 + torch.rand(3)).to(dtype)]
    ours_stats, their_stats = [s.clone() for s in stats], [s.clone() for s in stats]
    y = NF.batch_norm(x, *ours_stats, w, b, training)
    expected = F.batch_norm(x, *their_stats, w, b, training)
    torch.testing.assert_close(torch.isnan(y), torch.isnan(expected))
    torch.testing.assert_close(torch.isinf(y), torch.isinf(expected))
    for name, a, e in zip(["running_mean", "running_var"], ours_stats, their_stats):
        check(name, a, e, None, dtype, "fwd")
    if training:  # the batch statistics themselves: Inf gives an Inf mean and a NaN variance
        _, mean, invstd, _ = torch.ops.normext.batch_norm_fwd(x, w, b, None, None, True, 1e-5)
        _, tmean, tinvstd = torch.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
        check("save_mean", mean, tmean.to(mean.dtype), None, dtype, "fwd")
        check("save_invstd", invstd, tinvstd.to(invstd.dtype), None, dtype, "fwd")
    ref = F.batch_norm(x.double(), *[s.double() for s in stats], w.double(), b.double(), training)
    check("finite channels", y[:, [0, 2]], expected[:, [0, 2]], ref[:, [0, 2]], dtype, "fwd")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_saved_statistics(layout, dtype):
    """batch_norm_fwd's save_mean/save_invstd/batch_var are (C,) and float32 for half inputs
    (float64 for float64); batch_var is empty in eval; batch_norm_bwd's weight/bias grads are
    (C,) in that dtype, or empty when not asked for."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    base, view = make_input((4, 3, 5, 7), dtype, layout)
    x = view(base)
    w = torch.randn(3, dtype=dtype)
    y, mean, invstd, var = torch.ops.normext.batch_norm_fwd(x, w, None, None, None, True, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
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
    rm, rv = torch.zeros(3, dtype=acc), torch.ones(3, dtype=acc)
    _, emean, einvstd, evar = torch.ops.normext.batch_norm_fwd(x, w, None, rm, rv, False, 1e-5)
    assert emean.dtype == acc and einvstd.dtype == acc and evar.dtype == acc
    assert emean.shape == (3,) and einvstd.shape == (3,) and evar.shape == (0,)
    torch.testing.assert_close(einvstd, torch.full((3,), (1 + 1e-5) ** -0.5, dtype=acc))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("count", [0, 1, 2, 7])
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
def test_update_stats_op(momentum, count, dtype):
    """batch_norm_update_stats_: running = (1 - m) running + m batch, the variance made unbiased
    by count / (count - 1); nothing changes for count == 0; the buffers keep their dtype."""
    rm, rv = torch.randn(5).to(dtype), torch.rand(5).to(dtype)
    bm, bv = torch.randn(5), torch.rand(5)
    if dtype == torch.float64:
        bm, bv = bm.double(), bv.double()
    nm, nv = rm.clone(), rv.clone()
    torch.ops.normext.batch_norm_update_stats_(nm, nv, bm, bv, momentum, count)
    assert nm.dtype == dtype and nv.dtype == dtype
    if count == 0:
        torch.testing.assert_close(nm, rm, atol=0, rtol=0)
        torch.testing.assert_close(nv, rv, atol=0, rtol=0)
        return
    unbias = count / (count - 1) if count > 1 else 1.0
    em = (1 - momentum) * rm.double() + momentum * bm.double()
    ev = (1 - momentum) * rv.double() + momentum * bv.double() * unbias
    tol = TOL[torch.float64 if dtype == torch.float64 else torch.float32]["fwd"]
    if dtype == torch.bfloat16:
        tol = {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(nm, em.to(dtype), **tol)
    torch.testing.assert_close(nv, ev.to(dtype), **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((64, 33, 129), "contiguous"),
        ((4096, 37), "contiguous"),
        ((16, 70, 9, 11), "channels_last"),
        ((2, 3, 70001), "contiguous"),
        ((16, 128, 7, 7), "contiguous"),
    ],
    ids=str,
)
def test_deterministic(shape, layout, dtype):
    """Two runs give bitwise-equal outputs, grads and running statistics, whatever the number of
    threads."""
    base, view = make_input(shape, dtype, layout)
    c = shape[1]
    w, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    stats = (torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype))
    dy = torch.randn(shape, dtype=dtype)
    fn = lambda x, w, b, rm, rv: NF.batch_norm(x, rm, rv, w, b, True)
    first = forward_backward(fn, base, view, dy, (w, b), stats)
    flat = lambda r: [r[0], r[1], *r[2], *r[3]]
    threads = torch.get_num_threads()
    try:
        for t in {1, max(2, threads)}:
            torch.set_num_threads(t)
            again = forward_backward(fn, base, view, dy, (w, b), stats)
            for a, e in zip(flat(first), flat(again)):
                torch.testing.assert_close(a, e, atol=0, rtol=0, msg=prefixed(f"{t} threads"))
    finally:
        torch.set_num_threads(threads)


# The fused NCHW passes (planes of 4 KB and more, a channel's inputs at most 1 MB, any number of
# channels) cut each channel into parts that different threads take, meeting once a channel
# (csrc/cpu/batch_norm.cpp: fuse_parts, fused_channels). Here 1 to 8 parts, over 1 to 8 threads:
# more threads than parts (several teams of threads), fewer (threads with several parts), more
# threads than cores; and parts of planes over 65536 values (two segments a plane).
FUSED_SPLIT = [
    ((16, 64, 33, 64), torch.float32),  # forward 2 parts, backward 4
    ((16, 64, 33, 64), torch.bfloat16),  # forward 1 part, backward 2
    ((16, 64, 33, 64), torch.float64),  # forward 4 parts, backward 8
    ((2, 64, 70001), torch.float32),  # forward 2 parts of one plane of two segments
    ((16, 5, 33, 64), torch.float32),  # few channels: forward 2 parts, backward 4
    ((3, 1, 40, 128), torch.bfloat16),  # one channel, one part
    # planes of 28004 bytes (not whole 64-byte lines, so each output plane starts at another
    # offset in its line) and over kChunk values: each written in the loop that sums the next
    # channel's plane (Sidecar), but a thread's first channel summed alone, so which channels
    # are summed which way depends on the thread count: the results must not
    ((16, 3, 7001), torch.float32),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,dtype", FUSED_SPLIT, ids=str)
def test_fused_parts_any_thread_count(shape, dtype, training):
    """Right against torch and float64, and bitwise the same for every thread count."""
    run_bn(shape, dtype, training=training)
    base, view = make_input(shape, dtype)
    c = shape[1]
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(c, generator=g, dtype=dtype), torch.randn(c, generator=g, dtype=dtype)
    stats = (torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype))
    dy = torch.randn(shape, generator=g, dtype=dtype)
    fn = lambda x, w, b, rm, rv: NF.batch_norm(x, rm, rv, w, b, training)
    flat = lambda r: [r[0], r[1], *r[2], *r[3]]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = flat(forward_backward(fn, base, view, dy, (w, b), stats))
        for t in (2, 3, 4, 8):
            torch.set_num_threads(t)
            again = flat(forward_backward(fn, base, view, dy, (w, b), stats))
            for a, e in zip(again, first):
                torch.testing.assert_close(a, e, atol=0, rtol=0, msg=prefixed(f"{t} threads"))
    finally:
        torch.set_num_threads(threads)


def test_half_reference_is_meaningful():
    """The half-dtype tolerance is anchored on torch's own error: make sure that error is real
    (nonzero) and that a deliberately perturbed result fails the check."""
    (y, *_), (ty, *_), (ry, *_) = run_bn((8, 3, 37), torch.bfloat16)
    assert (ty.double() - ry).abs().max() > 0
    with pytest.raises(AssertionError):
        check("perturbed", y + 0.1, ty, ry, torch.bfloat16, "fwd")
    assert HALF == (torch.bfloat16, torch.float16)


# ---- statistics when the first piece is unlike the rest -------------------------------------------
# After a group's first piece (a plane, a block of channels-last rows, a 4096-value chunk of a
# LayerNorm row), the statistics use the group's running mean as the shift and read each piece
# once. These inputs put the first piece far from the others (0 or 1e4 against 1e3 +- 1), so the
# early shifts are far from most values; mean and variance must still match a float64
# reference to a few float roundings.


def _stats64(x: torch.Tensor, dims: tuple[int, ...]):
    x64 = x.double()
    return x64.mean(dims), x64.var(dims, unbiased=False)


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((6, 64, 20, 20), "nchw"),  # >= 64 channels: channel by channel (fused)
        ((6, 3, 20, 20), "nchw"),  # few channels: planes go to tasks
        ((600, 8, 20, 20), "channels_last"),  # many row blocks per task
        ((40000, 24), "2d"),  # (N, C): channels-last rows
    ],
)
@pytest.mark.parametrize("first", [0.0, 1e4])
def test_batch_norm_statistics_with_an_outlying_first_piece(shape, layout, first):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) + 1e3
    x[0] = first  # the first sample (every channel's first plane / rows) far from the rest
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _, mean, _, var = normext.ops.batch_norm_fwd(x, None, None, None, None, True, 1e-5)
    dims = (0,) + tuple(range(2, x.dim()))
    m64, v64 = _stats64(x, dims)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(var.double(), v64, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("first", [0.0, 1e4])
def test_layer_norm_statistics_with_an_outlying_first_chunk(first):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3 * 4096 + 17, generator=g) + 1e3
    x[:, :4096] = first + torch.randn(3, 4096, generator=g)  # the first chunk of every row
    _, mean, rstd = normext.ops.layer_norm_fwd(x, 1, None, None, 1e-5)
    m64, v64 = _stats64(x, (1,))
    torch.testing.assert_close(mean.double(), m64, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(rstd.double(), (v64 + 1e-5).rsqrt(), rtol=2e-5, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nc", "channels_last", "nchw", "nchw_fused"])
def test_output_accuracy_across_offsets(layout, training):
    """float32 outputs take y = x * alpha + beta where a channel's mean lies within a few
    standard deviations of 0 (csrc/cpu/batch_norm.cpp, kFoldOffset), else (x - mean) * scale +
    shift: per channel in the fused NCHW training path ("nchw_fused": 64 channels, planes of 4 KB
    and more), for all channels at once elsewhere. Either way each channel's output error stays
    within a few units in the last place of the output's scale, against float64: with channel
    means from 0 to 1e4 standard deviations, and with all of them small (the folded form)."""
    gen = torch.Generator().manual_seed(0)
    for offsets in ([0.0, 1.0, -4.0, 7.5], [0.0, 7.5, 20.0, -1e3, 1e4]):
        if layout == "nchw_fused":
            offsets = (offsets * 16)[:64]
        c = len(offsets)
        shape = {"nc": (2048, c), "nchw_fused": (2, c, 32, 33)}.get(layout, (16, c, 9, 13))
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        view = x.transpose(0, 1)  # view[k]: channel k
        std = 1e-2
        for k, off in enumerate(offsets):
            view[k] = view[k] * std + off * std
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x32 = x.float()
        w = torch.rand(c, generator=gen) + 0.5
        b = torch.randn(c, generator=gen)
        dims = [0, *range(2, x.dim())]
        rm = x32.double().mean(dim=dims).float()
        rv = x32.double().var(dim=dims, unbiased=False).float()
        y = NF.batch_norm(x32, rm.clone(), rv.clone(), w, b, training=training, momentum=0.0)
        ref = F.batch_norm(x32.double(), rm.double(), rv.double(), w.double(), b.double(),
                           training=training, eps=1e-5)
        scale = (ref.abs().amax(dim=dims) + w.double()).view(1, c, *[1] * (x.dim() - 2))
        err = ((y.double() - ref).abs() / scale).amax(dim=dims)
        assert (err <= 32 * torch.finfo(torch.float32).eps).all(), (offsets, err)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("layout", ["nc", "channels_last", "nchw", "nchw_fused"])
def test_backward_accuracy_across_offsets(layout, dtype):
    """bfloat16 and float16 training backwards fold (csrc/cpu/batch_norm.cpp, kFoldBackward)
    where every channel's mean lies within a few standard deviations of 0: the sums take
    dy * x, less mean * sum(dy), and dx = a * dy + b * x + (k - b * mean). Planar layouts only
    ("nc" and "nchw": planes of 1 and 117 values; "nchw_fused": planes of 2304, the fused path);
    channels_last never folds. Folded or not (a channel 20 and more deviations out turns it off),
    each channel's dx, dweight and dbias stay within two units in the last place of the dtype at
    that grad's scale of float64 run on the same inputs, or within twice torch's own error where
    that is larger (channels 1e3 and 1e4 deviations out, whose values the dtype barely holds)."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.finfo(dtype).eps

    def per_channel(t):  # max |t| per channel: dx over dims 0, 2, ...; dweight, dbias as they are
        return t.abs().amax(dim=[0, *range(2, t.dim())]) if t.dim() > 1 else t.abs()

    for offsets in ([0.0, 1.0, -4.0, 7.5], [0.0, 7.5, 20.0, -1e3, 1e4]):
        c = len(offsets)
        shape = {"nc": (2048, c), "nchw_fused": (2, c, 48, 48)}.get(layout, (16, c, 9, 13))
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        view = x.transpose(0, 1)  # view[k]: channel k
        for k, off in enumerate(offsets):
            view[k] += off
        x = x.to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=gen).to(dtype)
        w = (torch.rand(c, generator=gen) + 0.5).to(dtype)
        b = torch.randn(c, generator=gen).to(dtype)
        runs = []
        for fn, cast in ((NF.batch_norm, dtype), (F.batch_norm, dtype),
                         (F.batch_norm, torch.float64)):
            xs, ws, bs = (t.to(cast).requires_grad_() for t in (x, w, b))
            y = fn(xs, None, None, ws, bs, True)
            runs.append(torch.autograd.grad(y, (xs, ws, bs), dy.to(cast)))
        for i, name in enumerate(["dx", "dweight", "dbias"]):
            ours, theirs, ref = (r[i].double() for r in runs)
            err, torch_err = per_channel(ours - ref), per_channel(theirs - ref)
            bound = torch.maximum(2 * eps * per_channel(ref), 2 * torch_err)
            assert (err <= bound).all(), (name, offsets, err, bound)


@pytest.mark.parametrize(
    "shape, channels_last",
    [((3, 8, 37), False), ((2, 16, 7, 7), False), ((2, 16, 7, 7), True), ((2, 24, 5, 5), False),
     ((2, 24, 5, 5), True), ((4, 40), False)],
)
def test_bfloat16_rounding_exact(shape, channels_last):
    """bfloat16 outputs are the float results rounded to nearest, ties to even, bit for bit as
    torch rounds them (with NaN as NaN, overflow to Inf, denormals kept). The CPU kernels round
    with their own vector code (csrc/cpu/vec_utils.h: bf16_round_lanes on AVX2, bf16_pack on
    AVX-512). Eval mode with mean 0, var 1 and eps 0 makes invstd exactly 1, so y = x * weight
    in float (plus the zero shift), and dx = dy * weight: weights of 1 + k * 2**-9 put many products on ties."""
    g = torch.Generator().manual_seed(11)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 4).bfloat16()
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.3895e38, -3.3895e38,
                            1e-38, -2e-39, 0.0, -0.0, 1.0, 2.0, 0.5])
    flat = x.view(-1)
    flat[: min(flat.numel(), 12)] = special[: min(flat.numel(), 12)].bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    steps = torch.tensor([1, 3, -1, 5, 7, -3, 255, 2])
    w = 1 + steps[torch.arange(c) % len(steps)].float() * 2.0**-9
    w[c // 2 :] = torch.rand(c - c // 2, generator=g) * 3 - 1.5  # arbitrary float weights
    view = (1, c) + (1,) * (x.dim() - 2)
    rm, rv = torch.zeros(c), torch.ones(c)

    def bits(t):  # NaN as one pattern: NaN payloads differ between torch's own conversions
        t = t.contiguous()
        return torch.where(t.isnan(), torch.full_like(t, float("nan")), t).view(torch.int16)

    xr = x.detach().clone().requires_grad_()
    y = NF.batch_norm(xr, rm, rv, w, torch.zeros(c), training=False, eps=0.0)
    # + 0: the forward adds the (zero) shift, which turns -0 into +0 as torch's does
    assert torch.equal(bits(y), bits((x.float() * w.view(view) + 0).bfloat16()))
    dy = (torch.randn(shape, generator=g) * 4).bfloat16()
    (dx,) = torch.autograd.grad(y, xr, dy)
    assert torch.equal(bits(dx), bits((dy.float() * w.view(view)).bfloat16()))


@pytest.mark.parametrize(
    "op, shape", [("batch_norm", (8, 16, 12, 12)), ("batch_norm", (64, 40)), ("layer_norm", (64, 96))]
)
def test_bfloat16_denormal_outputs(op, shape):
    """bfloat16 outputs below float's smallest normal (2**-126) stay denormal, as torch rounds
    them: the AVX-512 kernels round with vcvtne2ps2bf16 (csrc/cpu/vec_utils.h, bf16_pack), which
    flushes denormal inputs to zero unless the kernel falls back for them. A weight of 2e-38
    makes many outputs denormal, most of them far above the tolerance (a few of bfloat16's
    smallest steps, 2**-133, as float's own denormal arithmetic differs by that much between
    the kernels' formulas), so a flushed one fails."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g).bfloat16()
    n = shape[-1] if op == "layer_norm" else shape[1]
    w = torch.full((n,), 2e-38, dtype=torch.bfloat16)
    b = torch.zeros(n, dtype=torch.bfloat16)
    if op == "layer_norm":
        ours = NF.layer_norm(x, (n,), w, b)
        theirs = F.layer_norm(x, (n,), w, b)
    else:
        ours = NF.batch_norm(x, None, None, w, b, training=True)
        theirs = F.batch_norm(x, None, None, w, b, training=True)
    tiny, atol = torch.finfo(torch.float32).tiny, 4 * 2.0**-133
    denormal = (theirs.abs() > 8 * atol) & (theirs.abs() < tiny)
    assert denormal.float().mean() > 0.3
    torch.testing.assert_close(ours, theirs, rtol=2 * 2**-8, atol=atol)
