"""normext.functional.layer_norm and the layer_norm ops against torch.nn.functional.layer_norm:
forward output, input/weight/bias grads over shapes, dtypes, layouts and affine modes, plus
DESIGN.md's edge cases (constant rows, large offsets, empty inputs, NaN/Inf, saved statistics,
determinism). Tolerances: conftest.TOL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CUDA_PARAM,
    DTYPES,
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

import normext.functional as NF

# (input shape, normalized_shape): 1, primes, non-powers of two, 1-3 normalized dims.
SHAPES = [
    ((1, 1), (1,)),
    ((7, 1), (1,)),
    ((3, 2), (2,)),
    ((5, 37), (37,)),
    ((13, 199), (199,)),
    ((3, 1023), (1023,)),
    ((2, 1500), (1500,)),
    ((2, 3, 5), (3, 5)),
    ((11, 7, 13), (7, 13)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((37,), (37,)),  # no leading dims: one row
    ((2, 3, 4, 17), (17,)),  # several leading dims
]
LARGE = [((4096, 1024), (1024,)), ((64, 65537), (65537,)), ((1000, 3, 257), (3, 257))]


def run_ln(
    shape,
    normalized_shape,
    dtype,
    layout="contiguous",
    affine="both",
    param_dtype=None,
    eps=1e-5,
    *,
    scale=1.0,
    offset=0.0,
):
    """normext vs torch (and a float64 reference, conftest.check) for one configuration; returns
    the three runs, each (y, dx, [dw, db], [])."""
    base, view = make_input(shape, dtype, layout, scale=scale, offset=offset)
    pdt = param_dtype or dtype
    w = torch.randn(normalized_shape, dtype=pdt) if affine in ("both", "weight") else None
    b = torch.randn(normalized_shape, dtype=pdt) if affine in ("both", "bias") else None
    dy = torch.randn(shape, dtype=dtype)

    def ours_fn(x, w, b):
        return NF.layer_norm(x, normalized_shape, w, b, eps)

    def torch_fn(x, w, b):
        if w is None and b is not None:
            # torch's backward fails for a float32 bias without a weight on a half input
            # ("expected scalar type Half but found Float"): give it a constant weight of ones.
            w = torch.ones_like(b)
        return F.layer_norm(x, normalized_shape, w, b, eps)

    ours = forward_backward(ours_fn, base, view, dy, (w, b))
    theirs = forward_backward(torch_fn, base, view, dy, (w, b))
    ref = None
    if dtype != torch.float64:
        ref = forward_backward(torch_fn, base, view, dy, (w, b), dtype=torch.float64)
    compare_runs(ours, theirs, ref, dtype)
    assert same_strides(ours[0], theirs[0]), (ours[0].stride(), theirs[0].stride())
    return ours, theirs, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,normalized_shape", SHAPES, ids=str)
def test_shapes(shape, normalized_shape, dtype):
    run_ln(shape, normalized_shape, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,normalized_shape", LARGE, ids=str)
def test_large_shapes(shape, normalized_shape, dtype):
    run_ln(shape, normalized_shape, dtype)


# Past the size at which outputs are written with non-temporal stores (vec_utils.h's
# stream_output: 24 MB touched, rows a multiple of 64 bytes): forward and backward, with and
# without the affine parameters (the unweighted forward takes span_affine).
@pytest.mark.slow
@pytest.mark.parametrize("affine", ["both", "none"])
@pytest.mark.parametrize(
    "shape,dtype", [((1536, 2048), torch.float32), ((3072, 2048), torch.bfloat16)], ids=str
)
def test_streamed_outputs(shape, dtype, affine):
    run_ln(shape, shape[-1:], dtype, affine=affine)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS + ["channels_last"])
@pytest.mark.parametrize("normalized_ndim", [1, 2])
def test_layouts(layout, normalized_ndim, dtype):
    shape = (3, 5, 7, 37)
    run_ln(shape, shape[4 - normalized_ndim :], dtype, layout)


@pytest.mark.parametrize(
    "dtype,param_dtype",
    [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
    ids=str,
)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_affine(affine, dtype, param_dtype):
    """elementwise_affine=False (none), bias=False (weight only), a bias without a weight (the
    functional API allows it), and float32 params with a bfloat16/float16 input (their grads come
    back float32, as torch's)."""
    run_ln((6, 4, 37), (4, 37), dtype, affine=affine, param_dtype=param_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("eps", [0.0, 1.0, -0.5, 1e-12])
def test_eps(eps, dtype):
    """Any eps, as in torch (negative eps included: torch's OpInfo samples use eps=-0.5)."""
    run_ln((9, 33), (33,), dtype, eps=eps, scale=3.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.1, -3.7, 1e4, 0.0])
@pytest.mark.parametrize("n", [1, 5, 37, 1023])
def test_constant_row_is_exactly_zero(n, value, dtype):
    """A constant row normalizes to exactly 0 (never NaN, never a rounding residue), and its
    input gradient is finite."""
    x = torch.full((4, n), value, dtype=dtype)
    x[1] = torch.randn(n, dtype=dtype)  # one ordinary row beside the constant ones
    y = NF.layer_norm(x, (n,))
    const = [0, 2, 3] if n > 1 else [0, 1, 2, 3]
    torch.testing.assert_close(y[const], torch.zeros_like(y[const]), atol=0, rtol=0)
    xr = x.clone().requires_grad_(True)
    NF.layer_norm(
        xr, (n,), torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    ).sum().backward()
    assert torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("n", [37, 4099])
def test_large_offset_is_stable(n):
    """float32 rows with mean 1e4 and std 1e-2: statistics must not cancel (no E[x^2] - E[x]^2).
    Compared with a float64 reference from the same float32 inputs: rstd to 1e-3 relative; the
    output to what rounding the mean to float32 costs (half an ulp of 1e4, times rstd)."""
    x = (1e4 + 1e-2 * torch.randn(8, n, dtype=torch.float64)).float()
    y, mean, rstd = torch.ops.normext.layer_norm_fwd(x, 1, None, None, 1e-5)
    x64 = x.double()
    ref_var = x64.var(dim=1, unbiased=False)
    torch.testing.assert_close(rstd.double(), (ref_var + 1e-5).rsqrt(), rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), x64.mean(dim=1), rtol=0, atol=1e-3)
    ref = F.layer_norm(x64, (n,), eps=1e-5)
    bound = 0.5 * torch.finfo(torch.float32).eps * 1e4 * rstd.max().item() + 1e-4
    torch.testing.assert_close(y.double(), ref, atol=bound, rtol=0)
    torch_err = (F.layer_norm(x, (n,), eps=1e-5).double() - ref).abs().max().item()
    assert (y.double() - ref).abs().max().item() <= REF_ERR_MULT * torch_err + 1e-4


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("n", [37, 1000, 4099])
def test_output_accuracy_across_offsets(n, affine):
    """A row whose mean lies within a few standard deviations of 0 is normalized as x * rstd +
    beta (csrc/cpu/layer_norm.cpp, kFoldOffset), others as (x - mean) * rstd + lo. Either way
    each row's output error stays within a few units in the last place of the output's scale,
    against float64, for row means from 0 to 1e4 standard deviations."""
    gen = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0.0, 1.0, -4.0, 7.5, 8.5, 20.0, -1e3, 1e4], dtype=torch.float64)
    std = 1e-2
    x = ((torch.randn(len(offsets), n, generator=gen, dtype=torch.float64) + offsets[:, None])
         * std).float()
    w = (torch.rand(n, generator=gen) + 0.5) if affine else None
    b = torch.randn(n, generator=gen) if affine else None
    y = NF.layer_norm(x, (n,), w, b, eps=1e-5)
    ref = F.layer_norm(x.double(), (n,), None if w is None else w.double(),
                       None if b is None else b.double(), eps=1e-5)
    scale = ref.abs().amax(dim=1) + (1.0 if w is None else w.double().abs().max())
    err = (y.double() - ref).abs().amax(dim=1) / scale
    assert (err <= 32 * torch.finfo(torch.float32).eps).all(), err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,normalized_shape",
    [((0, 5), (5,)), ((2, 0, 5), (5,)), ((3, 0), (0,)), ((0, 4, 3), (4, 3))],
    ids=str,
)
def test_empty(shape, normalized_shape, dtype):
    """Empty leading dims give an empty output (and zero weight/bias grads), as in torch."""
    run_ln(shape, normalized_shape, dtype)


@pytest.mark.parametrize("which", ["weight", "bias", "none"])
@pytest.mark.parametrize("n", [40, 3000], ids=str)
def test_bfloat16_nan_payload_params(n, which):
    """A float32 weight or bias element that is a NaN with a nonzero low half (0x7fffffff,
    0xffffffff) on bfloat16 input: y and dx are NaN where torch's are. Rounded as a number such
    a NaN turns into -0 or +0 (bf16_round_lanes), so rows keep the NaN check unless the weight,
    bias and the row's constants are all finite (finite_all in csrc/cpu/vec_utils.h). "none":
    a bfloat16 NaN in x alone, which rounds right without the check."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, n, generator=g).bfloat16()
    w, b = 1 + 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g)
    if which == "weight":
        w.view(torch.int32)[3] = 0x7FFFFFFF
    elif which == "bias":
        b.view(torch.int32)[5] = -1  # 0xffffffff
    else:
        x[2, 7] = float("nan")
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    dy = torch.randn(6, n, generator=g).bfloat16()
    runs = []
    for fn in (NF.layer_norm, F.layer_norm):
        y = fn(x, (n,), w, b)
        runs.append((y, *torch.autograd.grad(y, (x,), dy)))
    for name, ours, theirs in zip(["y", "dx"], *runs):
        assert torch.isnan(theirs).any() or (name, which) == ("dx", "bias"), name
        torch.testing.assert_close(torch.isnan(ours), torch.isnan(theirs), msg=name)
        torch.testing.assert_close(torch.isinf(ours), torch.isinf(theirs), msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_propagates(bad, dtype):
    """NaN/Inf in a row: that row's outputs are what torch gives (NaN), other rows are untouched."""
    x = torch.randn(4, 37, dtype=dtype)
    x[2, 5] = bad
    w, b = torch.randn(37, dtype=dtype), torch.randn(37, dtype=dtype)
    y = NF.layer_norm(x, (37,), w, b)
    expected = F.layer_norm(x, (37,), w, b)
    torch.testing.assert_close(torch.isnan(y), torch.isnan(expected))
    torch.testing.assert_close(torch.isinf(y), torch.isinf(expected))
    check(
        "finite rows",
        y[[0, 1, 3]],
        expected[[0, 1, 3]],
        F.layer_norm(x.double(), (37,), w.double(), b.double())[[0, 1, 3]],
        dtype,
        "fwd",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalized_ndim", [1, 2, 3])
def test_saved_statistics(normalized_ndim, dtype):
    """layer_norm_fwd's mean/rstd have shape x.shape[:-normalized_ndim] and are float32 for half
    inputs (float64 for float64); layer_norm_bwd's weight/bias grads are in that dtype too."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(2, 3, 4, 5, dtype=dtype)
    pshape = x.shape[4 - normalized_ndim :]
    w, b = torch.randn(pshape, dtype=dtype), torch.randn(pshape, dtype=dtype)
    y, mean, rstd = torch.ops.normext.layer_norm_fwd(x, normalized_ndim, w, b, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    for t in (mean, rstd):
        assert t.dtype == acc and t.shape == x.shape[: 4 - normalized_ndim]
    dims = tuple(range(4 - normalized_ndim, 4))
    torch.testing.assert_close(mean, x.to(acc).mean(dim=dims), **TOL_STATS)
    torch.testing.assert_close(
        rstd, (x.to(acc).var(dim=dims, unbiased=False) + 1e-5).rsqrt(), **TOL_STATS
    )
    dx, dw, db = torch.ops.normext.layer_norm_bwd(
        torch.randn_like(x), x, normalized_ndim, mean, rstd, w, [True, True, True]
    )
    assert dx.dtype == dtype and dx.shape == x.shape
    assert dw.dtype == acc and dw.shape == pshape and db.dtype == acc and db.shape == pshape
    _, dw0, db0 = torch.ops.normext.layer_norm_bwd(
        torch.randn_like(x), x, normalized_ndim, mean, rstd, w, [True, False, False]
    )
    assert dw0.numel() == 0 and db0.numel() == 0


TOL_STATS = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 1023), (4096, 37), (2, 70001)], ids=str)
def test_deterministic(shape, dtype):
    """Two runs give bitwise-equal outputs and grads, whatever the number of threads."""
    base, view = make_input(shape, dtype)
    n = shape[-1]
    w, b = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    dy = torch.randn(shape, dtype=dtype)
    fn = lambda x, w, b: NF.layer_norm(x, (n,), w, b)
    first = forward_backward(fn, base, view, dy, (w, b))
    threads = torch.get_num_threads()
    try:
        for t in {1, max(2, threads)}:
            torch.set_num_threads(t)
            again = forward_backward(fn, base, view, dy, (w, b))
            for a, e in zip([first[0], first[1], *first[2]], [again[0], again[1], *again[2]]):
                torch.testing.assert_close(a, e, atol=0, rtol=0, msg=prefixed(f"{t} threads"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backward_output_masks(dtype):
    """Every output_mask of layer_norm_bwd, against torch's native_layer_norm_backward, on shapes
    with many row blocks; calls alternate shapes, so a block-sum buffer reused from an earlier
    call (csrc/cpu/layer_norm.cpp keeps it) holds stale values: the results must not see them."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for m, n in [(256, 640), (97, 1500), (512, 64)]:
        x = torch.randn(m, n, generator=gen, dtype=dtype)
        w = torch.randn(n, generator=gen, dtype=dtype)
        dy = torch.randn(m, n, generator=gen, dtype=dtype)
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, [n], w, None, 1e-5)
        cases.append((x, w, dy, mean, rstd))
    masks = [[a, b, c] for a in (True, False) for b in (True, False) for c in (True, False)]
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    for mask in masks:
        for x, w, dy, mean, rstd in cases:
            n = x.shape[-1]
            ours = torch.ops.normext.layer_norm_bwd(dy, x, 1, mean, rstd, w, mask)
            # (torch's op needs a bias tensor to return grad_bias; its value is not used)
            ref = torch.ops.aten.native_layer_norm_backward(
                dy, x, [n], mean, rstd, w, torch.zeros_like(w), mask)
            for k in range(3):
                if mask[k]:
                    torch.testing.assert_close(ours[k], ref[k], **tol, msg=prefixed(f"{mask} {k}"))


@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "param_dtypes", ["own,own", "own,fp32", "fp32,own", "fp32,fp32", "own,none", "none,own"]
)
def test_op_half_params_any_dtype(param_dtypes, dtype, device):
    """The ops take each of a half input's weight and bias in the input's dtype or float32,
    independently (the Python layer refuses a mix, as torch does; the op itself accepts it), and
    read each in its own dtype: forward and backward match float64 on the same rounded values."""
    torch.manual_seed(0)
    x = torch.randn(37, 520, device=device).to(dtype)
    kinds = param_dtypes.split(",")
    params = [
        None if k == "none" else (torch.randn(520, device=device) * (i + 1)).to(
            dtype if k == "own" else torch.float32
        )
        for i, k in enumerate(kinds)
    ]
    w, b = params
    y, mean, rstd = torch.ops.normext.layer_norm_fwd(x, 1, w, b, 1e-5)
    dbl = lambda t: None if t is None else t.double()
    ref = F.layer_norm(x.double(), (520,), dbl(w), dbl(b), 1e-5)
    torch.testing.assert_close(y.double(), ref, atol=TOL[dtype]["fwd"]["atol"], rtol=0.01)
    dy = torch.randn_like(x)
    mask = [True, w is not None, False]
    dx, dw, _db = torch.ops.normext.layer_norm_bwd(dy, x, 1, mean, rstd, w, mask)
    xd = x.double().requires_grad_()
    wd = None if w is None else w.double().requires_grad_()
    (F.layer_norm(xd, (520,), wd, dbl(b), 1e-5) * dy.double()).sum().backward()
    torch.testing.assert_close(dx.double(), xd.grad, atol=TOL[dtype]["bwd"]["atol"], rtol=0.02)
    if w is not None:
        torch.testing.assert_close(dw.double(), wd.grad, atol=0.5, rtol=0.02)
