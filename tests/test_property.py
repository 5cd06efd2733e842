"""Property-based tests (hypothesis): normext against torch.nn over random shapes (size-1 dims,
primes, empty batches), dtypes, strides (permutations, steps, offsets, broadcast dims,
channels_last), eps, momentum (None included), affine / track_running_stats / LayerNorm bias
flags, and train/eval sequences. Forward output, input/weight/bias grads and every buffer are
compared with conftest.check (tolerances: conftest.TOL). A second pair of tests puts NaN/Inf at
random places and checks that they propagate exactly where torch's do (BatchNorm: the channel;
LayerNorm: the row), in the output, the gradients and the running statistics.

CI runs a fixed, derandomized set of examples per test (EXAMPLES below, a few hundred per norm in
well under a minute). For a deeper search:
    NORMEXT_HYPOTHESIS_EXAMPLES=5000 pytest tests/test_property.py
(still derandomized, so a failure reproduces; hypothesis prints the failing example and a
@reproduce_failure blob)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, HALF, TOL, check, prefixed, same_strides
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from torch import nn

import normext
import normext.functional as NF

_ENV_EXAMPLES = int(os.environ.get("NORMEXT_HYPOTHESIS_EXAMPLES", "0") or 0)


def examples(ci: int):
    """Hypothesis settings: ``ci`` examples in CI, NORMEXT_HYPOTHESIS_EXAMPLES when that is set;
    derandomized (fixed examples, so CI is deterministic), no deadline (the machine is shared),
    no example database (nothing written into the checkout), the reproduce blob printed."""
    return settings(
        max_examples=_ENV_EXAMPLES or ci,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


MAX_NUMEL = 6000  # keeps one example to a few milliseconds

# ---- strategies ---------------------------------------------------------------------------------

# Sizes: 1, small primes, vector-width neighbours (8/16/32 floats per AVX2 step or tile), and
# anything up to 70; row sizes occasionally past kChunk (4096), where statistics merge pieces.
small_size = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13]), st.integers(1, 70))
batch_size = st.sampled_from([0, 1, 2, 3, 4, 7])


def numel(shape) -> int:
    return math.prod(shape)


@st.composite
def strided_input(draw, shape, dtype, *, channels_last_ok: bool = True):
    """(base, view, description): random values in a random memory layout. ``view(b)`` makes the
    input of ``shape`` from ``b`` (or a copy of it in another dtype), as conftest.make_input does,
    so gradients can be read from the base. The layout: contiguous; or the dims stored in a random
    order (transposes, channels_last-like), each possibly with a step and an offset (a strided
    slice of a larger tensor), and some size-1-stored dims broadcast (stride 0); or
    channels_last / channels_last_3d."""
    nd = len(shape)
    kind = draw(st.sampled_from(["contiguous", "strided", "strided", "channels_last"]))
    if kind == "channels_last" and not (channels_last_ok and nd in (4, 5)):
        kind = "contiguous"
    scale = draw(st.sampled_from([1.0, 1.0, 1e-2, 30.0]))
    offset = draw(st.sampled_from([0.0, 0.0, 1.0, -7.0, 100.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    def values(s):
        return (torch.randn(s, dtype=torch.float64, generator=gen) * scale + offset).to(dtype)

    if kind == "contiguous":
        return values(shape), lambda b: b, "contiguous"
    if kind == "channels_last":
        fmt = torch.channels_last if nd == 4 else torch.channels_last_3d
        return values(shape).contiguous(memory_format=fmt), lambda b: b, kind
    order = draw(st.permutations(range(nd)))  # order[j]: the dim stored j-th (outermost first)
    steps = [draw(st.sampled_from([1, 1, 1, 2, 3])) for _ in range(nd)]
    offs = [draw(st.sampled_from([0, 0, 1])) for _ in range(nd)]
    bcast = [shape[d] > 1 and draw(st.sampled_from([False, False, False, True])) for d in range(nd)]
    stored = [1 if bcast[d] else shape[d] * steps[d] + offs[d] for d in range(nd)]
    base = values([stored[d] for d in order])
    inverse = [order.index(d) for d in range(nd)]

    def view(b):
        b = b.permute(*inverse)  # back to the logical dim order
        idx = tuple(
            slice(0, 1) if bcast[d] else slice(offs[d], offs[d] + shape[d] * steps[d], steps[d])
            for d in range(nd)
        )
        return b[idx].expand(shape)

    desc = f"order={order} steps={steps} offsets={offs} broadcast={bcast}"
    assert view(base).shape == tuple(shape), (desc, view(base).shape, shape)
    return base, view, desc


@st.composite
def bn_shape(draw):
    ndim = draw(st.sampled_from([2, 3, 4, 5]))
    shape = [draw(batch_size), draw(small_size)]
    for _ in range(ndim - 2):
        spatial = {3: small_size, 4: st.sampled_from([1, 2, 3, 5, 7, 11])}.get(
            ndim, st.sampled_from([1, 2, 3, 5])
        )
        shape.append(draw(spatial))
    assume(numel(shape) <= MAX_NUMEL)
    return tuple(shape)


@st.composite
def ln_shape(draw):
    """(shape, normalized_shape)"""
    ndim = draw(st.sampled_from([1, 2, 2, 3, 4]))
    k = draw(st.integers(1, ndim))
    lead = [draw(st.sampled_from([0, 1, 2, 3, 5, 8, 17])) for _ in range(ndim - k)]
    if k == 1:
        norm = [draw(st.one_of(small_size, st.integers(1, 300), st.integers(4090, 4200)))]
    else:
        norm = [draw(small_size if i == k - 1 else st.sampled_from([1, 2, 3, 5])) for i in range(k)]
    shape = tuple(lead + norm)
    assume(numel(shape) <= 3 * MAX_NUMEL)
    return shape, tuple(norm)


dtypes = st.sampled_from(DTYPES)
TINY = torch.finfo(torch.float64).tiny


def forward_backward(fn, base, view, dy, params=(), buffers=(), dtype=None, contiguous=False):
    """conftest.forward_backward, except that the input grad is the grad of the input itself
    (view(base)), not of the base: a broadcast (stride-0) input's base grad sums the input grad
    over the broadcast dims, which cancels (a constant row's input grad sums to exactly 0 from
    terms of size rstd * |dy|, 300 for eps=1e-5) and would measure the rounding of that sum.
    contiguous=True: fn gets a contiguous copy of the input (same values, same grads). torch's
    own runs of BatchNorm use it: torch 2.13's CPU batch_norm backward returns wrong input grads
    for a channels_last input whose size-1 spatial dim has a non-canonical stride (e.g. a
    permuted (N, C, 1, W) tensor with strides (3W, 1, 3, 3)), off by O(1) against finite
    differences; normext gets them right."""

    def copy(t):
        if t is None:
            return None
        t = t.detach()
        return (t.to(dtype) if dtype is not None else t).clone()

    b = copy(base).requires_grad_(True)
    ps = [None if p is None else copy(p).requires_grad_(True) for p in params]
    bufs = [copy(t) for t in buffers]
    x = view(b)
    if contiguous:
        x = x.contiguous()
    x.retain_grad()
    y = fn(x, *ps, *bufs)
    y.backward(copy(dy))
    return y.detach(), x.grad, [None if p is None else p.grad for p in ps], bufs


# ---- comparison -----------------------------------------------------------------------------
# conftest.check measures float32/half results against a float64 reference, with a bound of
# twice torch's own error, so it adapts to how hard an input is. float64 results (and running
# statistics) are compared with torch's directly at TOL's fixed tolerance, which assumes a
# well-conditioned input; the random inputs here include groups with mean 100 and std 0.01,
# where both implementations lose about |mean| * rstd ulps in (x - mean) * rstd (torch's own
# float64 output is then ~2e-12 off; a constant group, rstd = 1 / sqrt(eps), is the extreme). So
# those direct comparisons get TOL scaled by the input's condition number
# kappa = 1 + |mean| / sqrt(var + eps), the largest over its groups (about 1 for randn input).


def condition(x: torch.Tensor, dims, eps: float) -> float:
    """kappa: the largest 1 + |mean| / sqrt(var + eps) over the groups (reduced over ``dims``)
    with finite statistics; 1 if there are none."""
    x = x.detach().double()
    if x.numel() == 0:
        return 1.0
    var = x.var(dim=dims, unbiased=False)
    mean = x.mean(dim=dims)
    ok = torch.isfinite(var) & torch.isfinite(mean) & (var + eps > 0)
    if not ok.any():
        return 1.0
    return 1.0 + (mean[ok].abs() / (var[ok] + eps).sqrt()).max().item()


def close(name, actual, expected, ref, dtype, kind, kappa: float = 1.0) -> None:
    """conftest.check, with the direct (no-reference) comparisons scaled by ``kappa``."""
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{name}: {actual} vs {expected}"
        return
    if (ref is not None and dtype != torch.float64) or not actual.is_floating_point():
        check(name, actual, expected, ref, dtype, kind)
        return
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    tol = dict(TOL[dtype][kind])
    if dtype in HALF:  # running statistics in half precision, updated in float: one ulp
        tol["rtol"] = torch.finfo(dtype).eps
    torch.testing.assert_close(
        actual,
        expected,
        atol=tol["atol"] * kappa,
        rtol=tol["rtol"] * kappa,
        equal_nan=True,
        msg=prefixed(f"{name} ({dtype}, condition number {kappa:.3g})"),
    )


def compare(ours, theirs, ref, dtype, kappa, names=("weight", "bias")) -> None:
    """conftest.compare_runs through ``close``: output, input grad, parameter grads, buffers."""
    y, gx, gp, bufs = ours
    ty, tgx, tgp, tbufs = theirs
    ry, rgx, rgp, _ = ref if ref is not None else (None, None, [None] * len(gp), None)
    close("output", y, ty, ry, dtype, "fwd", kappa)
    close("input grad", gx, tgx, rgx, dtype, "bwd", kappa)
    for name, g, tg, rg in zip(names, gp, tgp, rgp):
        close(f"{name} grad", g, tg, rg, dtype, "bwd", kappa)
    for i, (b, tb) in enumerate(zip(bufs, tbufs)):
        close(f"buffer {i}", b, tb, None, b.dtype, "fwd", kappa)


# ---- BatchNorm: modules over a random sequence of train/eval steps ------------------------------

BN_CLASSES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def _values_per_channel(shape) -> int:
    return shape[0] * numel(shape[2:])


@given(data=st.data())
@examples(400)
def test_batch_norm_modules_match_torch(data):
    """normext.BatchNorm1d/2d/3d and torch's, from the same random state, through 1-3 random
    train/eval steps on inputs of random shape, dtype and strides: outputs, input/weight/bias
    grads and running_mean/running_var/num_batches_tracked after every step. eps=0 in training
    is compared with torch at the smallest positive eps (torch refuses 0; DESIGN.md accepts it
    when the variance is nonzero)."""
    draw = data.draw
    shape = draw(bn_shape(), "shape")
    dtype = draw(dtypes, "dtype")
    module_dtype = draw(
        st.sampled_from([dtype, torch.float32]) if dtype in HALF else st.just(dtype)
    )
    affine = draw(st.booleans(), "affine")
    track = draw(st.booleans(), "track_running_stats")
    momentum = draw(st.sampled_from([None, 0.0, 0.1, 0.37, 1.0]), "momentum")
    eps = draw(st.sampled_from([1e-5, 1e-5, 1e-3, 0.5, 0.0]), "eps")
    steps = draw(st.lists(st.booleans(), min_size=1, max_size=3), "training per step")
    c = shape[1]
    cls = BN_CLASSES[len(shape)]
    kwargs = {"momentum": momentum, "affine": affine, "track_running_stats": track}
    theirs = getattr(nn, cls)(c, eps=eps or TINY, **kwargs).to(module_dtype)
    ours = getattr(normext, cls)(c, eps=eps, **kwargs).to(module_dtype)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    with torch.no_grad():
        if affine:
            theirs.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            theirs.bias.copy_(torch.randn(c, generator=gen))
        if track:
            theirs.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            theirs.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    ours.load_state_dict(theirs.state_dict())

    def params(m):
        return [m.weight, m.bias] if affine else []

    for i, training in enumerate(steps):
        # Each step starts from torch's state: the running statistics were compared after the
        # last step, but half-precision buffers may differ by an ulp (allowed), and an eval step
        # would amplify that into its output (a 1-ulp running_var moves y = 7 by 0.03).
        ours.load_state_dict(theirs.state_dict())
        ours.train(training)
        theirs.train(training)
        base, view, layout = draw(strided_input(shape, dtype), f"step {i} input")
        batch_stats = training or not track
        if batch_stats and _values_per_channel(shape) == 1:
            # torch's rule, with torch's message: more than one value per channel for batch
            # statistics (training, or eval without running statistics)
            for m in (ours, theirs):
                with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
                    m(view(base))
            continue
        if eps == 0 and batch_stats and numel(shape) > 0:
            dims = [0, *range(2, len(shape))]
            var = view(base).double().var(dim=dims, unbiased=False)
            assume(bool((var > 1e-6 * (1 + view(base).double().abs().amax(dim=dims) ** 2)).all()))
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        for m in (ours, theirs):
            m.zero_grad()
        ref_module = getattr(nn, cls)(c, eps=eps or TINY, **kwargs).double().train(training)
        ref_module.load_state_dict(
            {k: v.double() if v.is_floating_point() else v for k, v in theirs.state_dict().items()}
        )
        o = forward_backward(ours, base, view, dy)
        t = forward_backward(theirs, base, view, dy, contiguous=True)
        ref = None
        if dtype != torch.float64:
            r = forward_backward(ref_module, base, view, dy, dtype=torch.float64, contiguous=True)
            ref = (r[0], r[1], [p.grad for p in params(ref_module)], [])
        kappa = condition(view(base), [0, *range(2, len(shape))], eps)
        note(f"step {i}: training={training}, layout {layout}, condition number {kappa:.3g}")
        compare(
            (o[0], o[1], [p.grad for p in params(ours)], []),
            (t[0], t[1], [p.grad for p in params(theirs)], []),
            ref,
            dtype,
            kappa,
        )
        # The output keeps the input's memory format, as torch's does. Not checked for
        # (N, C, L): stored as (N, L, C), normext keeps that layout (its channels-last kernels
        # write it directly), while torch, which has no 3-d memory format, returns (N, C, L).
        if numel(shape) > 0 and len(shape) != 3:
            stats = (torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype))
            layout_like = F.batch_norm(view(base), *stats, training=False)
            assert same_strides(o[0], layout_like), (o[0].stride(), layout_like.stride())
        theirs_buffers = dict(theirs.named_buffers())
        for name, buf in ours.named_buffers():
            close(f"step {i}: {name}", buf, theirs_buffers[name], None, buf.dtype, "fwd", kappa)


# ---- LayerNorm: functional, every weight/bias combination ------------------------------------


@given(data=st.data())
@examples(400)
def test_layer_norm_matches_torch(data):
    """normext.functional.layer_norm and torch's on random shapes (1-4 dims, 1-4 normalized,
    empty leading dims, rows past 4096), dtypes, strides, weight/bias present or not (float32
    params with half inputs), and eps (0 and negative included where the variance keeps the
    result finite): output, input/weight/bias grads."""
    draw = data.draw
    shape, norm = draw(ln_shape(), "shape, normalized_shape")
    dtype = draw(dtypes, "dtype")
    pdt = draw(st.sampled_from([dtype, torch.float32]) if dtype in HALF else st.just(dtype))
    has_w, has_b = draw(st.booleans(), "weight"), draw(st.booleans(), "bias")
    eps = draw(st.sampled_from([1e-5, 1e-5, 1e-3, 1.0, 0.0, -1e-7]), "eps")
    base, view, layout = draw(strided_input(shape, dtype), "input")
    note(f"layout {layout}")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(norm, generator=gen).to(pdt) if has_w else None
    b = torch.randn(norm, generator=gen).to(pdt) if has_b else None
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if eps <= 0 and numel(shape) > 0:  # away from var + eps <= 0, where rounding decides
        dims = tuple(range(len(shape) - len(norm), len(shape)))
        x64 = view(base).double()
        var = x64.var(dim=dims, unbiased=False)
        assume(bool((var > 1e-5 * (1 + x64.abs().amax(dim=dims) ** 2)).all()))

    def ours_fn(x, w, b):
        return NF.layer_norm(x, norm, w, b, eps)

    def torch_fn(x, w, b):
        if w is None and b is not None:
            # torch's backward fails for a float32 bias without a weight on a half input
            # (conftest's run_ln): give it a weight of ones, which changes nothing.
            w = torch.ones_like(b)
        return F.layer_norm(x, norm, w, b, eps)

    ours = forward_backward(ours_fn, base, view, dy, (w, b))
    theirs = forward_backward(torch_fn, base, view, dy, (w, b))
    ref = None
    if dtype != torch.float64:
        ref = forward_backward(torch_fn, base, view, dy, (w, b), dtype=torch.float64)
    kappa = condition(view(base), tuple(range(len(shape) - len(norm), len(shape))), eps)
    note(f"condition number {kappa:.3g}")
    compare(ours, theirs, ref, dtype, kappa)


# ---- NaN and Inf ----------------------------------------------------------------------------

nonfinite = st.sampled_from([float("nan"), float("inf"), -float("inf")])


@st.composite
def poisoned(draw, shape, dtype, channels_last_ok=True):
    """A strided input with 1-3 NaN/Inf values written at random positions (through the view,
    so broadcast dims repeat them as a user's tensor would)."""
    base, view, layout = draw(strided_input(shape, dtype, channels_last_ok=channels_last_ok))
    for _ in range(draw(st.integers(1, 3))):
        idx = tuple(draw(st.integers(0, s - 1)) for s in shape)
        view(base)[idx].fill_(draw(nonfinite))
    return base, view, layout


def assert_same_nonfinite(name, actual, expected):
    """NaN exactly where torch has NaN; +-Inf exactly where torch has it (same sign)."""
    torch.testing.assert_close(
        torch.isnan(actual), torch.isnan(expected), msg=prefixed(f"{name}: NaN positions")
    )
    torch.testing.assert_close(
        torch.isposinf(actual), torch.isposinf(expected), msg=prefixed(f"{name}: +Inf")
    )
    torch.testing.assert_close(
        torch.isneginf(actual), torch.isneginf(expected), msg=prefixed(f"{name}: -Inf")
    )


def _clean(t, keep, dim_of_group):
    """The groups of ``t`` along ``dim_of_group`` (a bool per group) flagged in ``keep``."""
    return t.index_select(dim_of_group, keep.nonzero().flatten())


@given(data=st.data())
@examples(200)
def test_batch_norm_nonfinite_propagates_like_torch(data):
    """NaN/Inf at random places: the output, the input/weight/bias grads and the running
    statistics have NaN and Inf exactly where torch's have them (the poisoned channels in
    training; only the poisoned values' positions in eval), and the clean channels match torch
    within tolerance."""
    draw = data.draw
    shape = draw(bn_shape(), "shape")
    assume(_values_per_channel(shape) > 1)
    dtype = draw(dtypes, "dtype")
    training = draw(st.booleans(), "training")
    base, view, layout = draw(poisoned(shape, dtype), "input")
    note(f"layout {layout}")
    c = shape[1]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w, b = (torch.rand(c, generator=gen) + 0.5).to(dtype), torch.randn(c, generator=gen).to(dtype)
    stats = ((0.1 * torch.randn(c, generator=gen)).to(dtype), (0.5 + torch.rand(c)).to(dtype))
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    def fn(impl):
        return lambda x, w, b, rm, rv: impl(x, rm, rv, w, b, training, 0.1, 1e-5)

    y, dx, (dw, db), (rm, rv) = forward_backward(fn(NF.batch_norm), base, view, dy, (w, b), stats)
    ty, tdx, (tdw, tdb), (trm, trv) = forward_backward(
        fn(F.batch_norm), base, view, dy, (w, b), stats, contiguous=True
    )
    for name, a, e in [
        ("output", y, ty),
        ("input grad", dx, tdx),
        ("weight grad", dw, tdw),
        ("bias grad", db, tdb),
        ("running_mean", rm, trm),
        ("running_var", rv, trv),
    ]:
        assert_same_nonfinite(name, a, e)
    # Clean channels (no NaN/Inf in the input) are ordinary: compare them as usual.
    x = view(base)
    clean = torch.isfinite(x).transpose(0, 1).reshape(c, -1).all(dim=1)
    if not clean.any():
        return
    ref = None
    if dtype != torch.float64:
        ref = forward_backward(
            fn(F.batch_norm), base, view, dy, (w, b), stats, dtype=torch.float64, contiguous=True
        )
    r = ref or (None, None, [None, None], None)
    kappa = condition(_clean(x, clean, 1), [0, *range(2, len(shape))], 1e-5)
    sel = lambda t: None if t is None else _clean(t, clean, 1)
    pick = lambda t: None if t is None else _clean(t, clean, 0)
    close("output (clean channels)", sel(y), sel(ty), sel(r[0]), dtype, "fwd", kappa)
    close("weight grad (clean channels)", pick(dw), pick(tdw), pick(r[2][0]), dtype, "bwd", kappa)
    close("bias grad (clean channels)", pick(db), pick(tdb), pick(r[2][1]), dtype, "bwd", kappa)
    close("input grad (clean channels)", sel(dx), sel(tdx), sel(r[1]), dtype, "bwd", kappa)


@given(data=st.data())
@examples(200)
def test_layer_norm_nonfinite_propagates_like_torch(data):
    """NaN/Inf at random places: output and input/weight/bias grads have NaN and Inf exactly
    where torch's have them (the poisoned rows, and the weight/bias grads they feed), and the clean
    rows match torch within tolerance."""
    draw = data.draw
    shape, norm = draw(ln_shape(), "shape, normalized_shape")
    assume(numel(shape) > 0)
    dtype = draw(dtypes, "dtype")
    base, view, layout = draw(poisoned(shape, dtype), "input")
    note(f"layout {layout}")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w, b = torch.randn(norm, generator=gen).to(dtype), torch.randn(norm, generator=gen).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    def fn(impl):
        return lambda x, w, b: impl(x, norm, w, b, 1e-5)

    y, dx, (dw, db), _ = forward_backward(fn(NF.layer_norm), base, view, dy, (w, b))
    ty, tdx, (tdw, tdb), _ = forward_backward(fn(F.layer_norm), base, view, dy, (w, b))
    for name, a, e in [
        ("output", y, ty),
        ("input grad", dx, tdx),
        ("weight grad", dw, tdw),
        ("bias grad", db, tdb),
    ]:
        assert_same_nonfinite(name, a, e)
    x = view(base)
    rows = x.reshape(-1, numel(norm))
    clean = torch.isfinite(rows).all(dim=1)
    if not clean.any():
        return
    ref = None
    if dtype != torch.float64:
        ref = forward_backward(fn(F.layer_norm), base, view, dy, (w, b), dtype=torch.float64)
    r = ref or (None, None, [None, None], None)
    sel = lambda t: None if t is None else _clean(t.reshape(-1, numel(norm)), clean, 0)
    kappa = condition(sel(x), 1, 1e-5)
    close("output (clean rows)", sel(y), sel(ty), sel(r[0]), dtype, "fwd", kappa)
    close("input grad (clean rows)", sel(dx), sel(tdx), sel(r[1]), dtype, "bwd", kappa)
