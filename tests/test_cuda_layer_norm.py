"""normext's CUDA LayerNorm (csrc/cuda/layer_norm.cu) against torch.nn.LayerNorm on CUDA.

Every test here is skipped without a CUDA device, or when normext was built without its CUDA
kernels (normext.with_cuda is False); the file still imports and collects on a CPU-only machine.

Hidden sizes cover every kernel of csrc/cuda/layer_norm_kernels.cuh: 16-byte vectors when the
size is a multiple of the vector width and the data is 16-byte aligned, single values otherwise;
rows held in registers (with vectors up to 16384 values forward and 8192 backward, half that for
float64; 4096 with single values) and the long-row kernels beyond (65536).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, HALF, REF_ERR_MULT, TOL

import normext
from normext import functional as NF
from normext import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        not normext.with_cuda,
        reason="normext was built without its CUDA kernels (NORMEXT_CUDA=0, or no CUDA toolkit "
        "or CUDA build of torch at build time)",
    ),
]

DEVICE = "cuda"

# ---- tolerances ---------------------------------------------------------------------------------
# conftest's table, applied LayerNorm-style: normext and torch are both measured against a float64
# reference computed from the same (already rounded) inputs; normext may be off by at most
# REF_ERR_MULT x torch's own largest error in that dtype, plus TOL[dtype][kind]["atol"] x
# max(1, max |reference|) (flash-attention style; float64 included, rtol unused).
# Backward is looser than forward: every gradient is a sum over a whole row (dx, through mean(g)
# and mean(g * xhat)) or over all rows (dweight, dbias), so rounding grows with the sizes, and
# dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) subtracts nearly equal terms.

# 1 and 7: shorter than a vector; 1023, 1025, 4097: single values (not a multiple of the vector
# width), in registers then long-row; 1024, 8192, 16384: vectors in registers at the class edges;
# 65536: long-row kernels.
HIDDEN = [1, 7, 1023, 1024, 1025, 4097, 8192, 16384, 65536]


def _rows_for(hidden: int) -> int:
    """Enough rows to fill several row groups (and a partial last one), in a small budget."""
    return max(3, min(67, (1 << 20) // hidden))


def check(name, actual, expected, ref, dtype, kind):
    """normext's ``actual`` against the float64 ``ref``, allowed REF_ERR_MULT x the error of
    torch's ``expected`` (same dtype, shape and device as ``actual``) plus the floor (see above).
    Unlike conftest.check, float64 is measured against the reference too, and the floor scales
    with the largest reference value rather than with each element."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.device == expected.device, f"{name}: device {actual.device} != {expected.device}"
    ref = ref.double()
    if ref.numel() == 0:
        return
    torch_err = (expected.double() - ref).abs().nan_to_num(0).max().item()
    scale = max(1.0, ref.abs().nan_to_num(0).max().item())
    atol = REF_ERR_MULT * torch_err + TOL[dtype][kind]["atol"] * scale
    torch.testing.assert_close(
        actual.double(),
        ref,
        atol=atol,
        rtol=0,
        equal_nan=True,
        msg=lambda m: f"{name} ({dtype}, torch's own error {torch_err:.3g}, atol {atol:.3g}): {m}",
    )


def make_params(hidden_shape, affine: bool, dtype, *, bias: bool = True, param_dtype=None):
    if not affine:
        return None, None
    param_dtype = param_dtype or dtype
    w = (1 + 0.5 * torch.randn(hidden_shape, dtype=torch.float64)).to(param_dtype).to(DEVICE)
    b = (
        (0.5 * torch.randn(hidden_shape, dtype=torch.float64)).to(param_dtype).to(DEVICE)
        if bias
        else None
    )
    return w, b


def make_x(shape, dtype, layout="contiguous", *, scale=1.0, offset=0.0):
    """A tensor of the given shape on the GPU: contiguous; sliced (every other element of a larger
    tensor); transposed (dims reversed in memory); misaligned (contiguous, but its data starts one
    element into its storage, so not on a 16-byte boundary)."""
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s

    def values(s):
        return (torch.randn(s, dtype=torch.float64) * scale + offset).to(dtype).to(DEVICE)

    if layout == "contiguous":
        return values(shape)
    if layout == "sliced":
        return values((*shape[:-1], 2 * shape[-1] + 1))[..., 1::2]
    if layout == "transposed":
        return values(shape[::-1]).permute(*reversed(range(len(shape))))
    if layout == "misaligned":
        return values((n + 1,))[1:].view(shape)
    raise ValueError(layout)


def run_both(x, hidden_shape, w, b, eps=1e-5, *, backward=True):
    """Forward (and backward with a fixed random dy) of normext, of torch in x's dtype and of a
    float64 reference. Returns {name: (normext, torch, reference)} for y, dx, dweight, dbias.
    With float32 parameters and a half input, torch's result is computed from the input made
    float32 and rounded back to x's dtype (its rounding of the output is still measured)."""
    shape = tuple(hidden_shape)
    dy = torch.randn(x.shape, dtype=torch.float64, device=DEVICE).to(x.dtype) if backward else None
    mixed = w is not None and w.dtype != x.dtype

    def run(fn, cast, out_dtype):
        def leaf(t):
            return None if t is None else cast(t).detach().clone().requires_grad_(backward)

        xi, wi, bi = leaf(x), leaf(w), leaf(b)
        y = fn(xi, shape, wi, bi, eps)
        if backward:
            y.backward(cast(dy))
        dx = None if xi.grad is None else xi.grad.to(out_dtype)
        return (
            y.to(out_dtype),
            dx,
            None if wi is None else wi.grad,
            None if bi is None else bi.grad,
        )

    def keep(t):
        return t

    def to_float(t):
        return t.float() if t.dtype in HALF else t

    def to_double(t):
        return t.double()

    ours = run(NF.layer_norm, keep, x.dtype)
    theirs = run(F.layer_norm, to_float if mixed else keep, x.dtype)
    ref = run(F.layer_norm, to_double, torch.float64)
    names = ("y", "dx", "dweight", "dbias")
    return {n: (o, t, r) for n, o, t, r in zip(names, ours, theirs, ref) if o is not None}


def check_all(results, dtype):
    for name, (ours, theirs, ref) in results.items():
        check(name, ours, theirs, ref, dtype, "fwd" if name == "y" else "bwd")


# ---- parity with torch.nn.LayerNorm -------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(dtype, hidden, affine):
    x = make_x((_rows_for(hidden), hidden), dtype)
    w, b = make_params((hidden,), affine, dtype)
    check_all(run_both(x, (hidden,), w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 1024, 4096, 16384])
def test_saved_statistics(dtype, hidden):
    """mean/rstd: float32 for half inputs (float64 for float64), the leading shape, and the
    values of torch's native_layer_norm."""
    x = make_x((2, 5, hidden), dtype)
    _, mean, rstd = ops.layer_norm_fwd(x, 1, None, None, 1e-5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == acc and rstd.dtype == acc
    assert mean.shape == (2, 5) and rstd.shape == (2, 5)
    assert mean.device == x.device and rstd.device == x.device
    _, tmean, trstd = torch.ops.aten.native_layer_norm(x, [hidden], None, None, 1e-5)
    xd = x.double()
    rmean = xd.mean(-1)
    rrstd = torch.rsqrt(xd.var(-1, unbiased=False) + 1e-5)
    stat_dtype = torch.float32 if dtype in HALF else dtype
    check("mean", mean, tmean.reshape(2, 5).to(acc), rmean, stat_dtype, "fwd")
    check("rstd", rstd, trstd.reshape(2, 5).to(acc), rrstd, stat_dtype, "fwd")


@pytest.mark.parametrize("layout", ["sliced", "transposed", "misaligned"])
@pytest.mark.parametrize("hidden", [7, 1024, 4097, 8192, 65536])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_and_misaligned(dtype, hidden, layout):
    x = make_x((3, hidden), dtype, layout)
    w, b = make_params((hidden,), True, dtype)
    check_all(run_both(x, (hidden,), w, b), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_misaligned_parameters(dtype):
    """Weight/bias views that start off a 16-byte boundary take the single-value kernels."""
    hidden = 1024
    x = make_x((9, hidden), dtype)
    w = (1 + torch.randn(hidden + 1, dtype=dtype, device=DEVICE))[1:]
    b = torch.randn(hidden + 1, dtype=dtype, device=DEVICE)[1:]
    check_all(run_both(x, (hidden,), w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_dim_normalized_shape(dtype):
    x = make_x((3, 5, 4, 8), dtype)
    w, b = make_params((4, 8), True, dtype)
    check_all(run_both(x, (4, 8), w, b), dtype)


@pytest.mark.parametrize("hidden", [7, 1024, 8192, 65536])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_float32_params_with_half_input(dtype, hidden):
    x = make_x((5, hidden), dtype)
    w, b = make_params((hidden,), True, dtype, param_dtype=torch.float32)
    res = run_both(x, (hidden,), w, b)
    assert res["y"][0].dtype == dtype
    assert res["dweight"][0].dtype == torch.float32 and res["dbias"][0].dtype == torch.float32
    check_all(res, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_only_and_weight_only(dtype):
    hidden = 1024
    x = make_x((6, hidden), dtype)
    w, b = make_params((hidden,), True, dtype)
    check_all(run_both(x, (hidden,), w, None), dtype)
    check_all(run_both(x, (hidden,), None, b), dtype)


@pytest.mark.parametrize("hidden", [32, 1024])
def test_many_rows(hidden):
    """More rows than the device runs at once: blocks loop over rows, and the backward's partial
    sums span many row groups."""
    dtype = torch.bfloat16
    x = make_x((40000, hidden), dtype)
    w, b = make_params((hidden,), True, dtype)
    check_all(run_both(x, (hidden,), w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_modules_match_torch(dtype):
    for kwargs in ({}, {"elementwise_affine": False}, {"bias": False}):
        ref = torch.nn.LayerNorm((4, 32), **kwargs).to(DEVICE, dtype)
        mod = normext.LayerNorm((4, 32), **kwargs).to(DEVICE, dtype)
        mod.load_state_dict(ref.state_dict())
        x = make_x((7, 4, 32), dtype)
        check(
            "module",
            mod(x),
            ref(x),
            F.layer_norm(
                x.double(),
                (4, 32),
                None if ref.weight is None else ref.weight.double(),
                None if ref.bias is None else ref.bias.double(),
                ref.eps,
            ),
            dtype,
            "fwd",
        )


@pytest.mark.parametrize("hidden", [4096, 65536])
def test_large_offset(hidden):
    """mean 1e4, std 1e-2 in float32: no cancellation (never E[x^2] - E[x]^2), and y computed
    from the differences to the shift, so not even the rounding of the mean to float32 (half a
    unit in the last place of 1e4 is 5% of the std) shows. Forward only: the backward gets the
    rounded mean, as in torch."""
    x = make_x((16, hidden), torch.float32, scale=1e-2, offset=1e4)
    res = run_both(x, (hidden,), None, None, backward=False)
    check_all(res, torch.float32)
    ours, _, ref = res["y"]
    torch.testing.assert_close(ours.double(), ref, atol=1e-3, rtol=0)


# ---- special values -----------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_rows_are_exactly_zero(dtype, hidden):
    values = torch.tensor([0.1, -3.7, 1e4 + 0.3, 0.0, 7.0, 1 / 3], dtype=torch.float64)
    x = values.to(dtype).to(DEVICE)[:, None].expand(len(values), hidden).contiguous()
    y, mean, _ = ops.layer_norm_fwd(x, 1, None, None, 1e-5)
    assert torch.count_nonzero(y).item() == 0, f"constant rows gave {y[y != 0][:8].tolist()}"
    assert torch.equal(mean, x[:, 0].to(mean.dtype)), "the mean of a constant row is its value"
    w, b = make_params((hidden,), True, dtype)
    y, _, _ = ops.layer_norm_fwd(x, 1, w, b, 1e-5)
    assert torch.equal(y, b.expand_as(y)), "a constant row gives exactly the bias"


@pytest.mark.parametrize("hidden", [7, 1024, 65536])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate(dtype, hidden):
    x = make_x((4, hidden), dtype)
    x[1, hidden // 2] = float("nan")
    x[2, 0] = float("inf")
    y = NF.layer_norm(x, (hidden,))
    expected = F.layer_norm(x, (hidden,))
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all(), "a NaN or inf spoils its row"
    assert torch.isnan(expected[1]).all()
    check(
        "finite rows",
        y[[0, 3]],
        expected[[0, 3]],
        F.layer_norm(x[[0, 3]].double(), (hidden,)),
        dtype,
        "fwd",
    )


def test_eps_zero():
    x = make_x((4, 1024), torch.float32)
    check_all(run_both(x, (1024,), None, None, eps=0.0), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty(dtype):
    """Empty leading dims: empty output, statistics of shape (0,), zero dweight/dbias."""
    x = torch.empty((0, 3, 16), dtype=dtype, device=DEVICE, requires_grad=True)
    w = torch.ones(16, dtype=dtype, device=DEVICE, requires_grad=True)
    b = torch.zeros(16, dtype=dtype, device=DEVICE, requires_grad=True)
    y, mean, rstd = ops.layer_norm_fwd(x, 1, w, b, 1e-5)
    assert y.shape == (0, 3, 16) and mean.shape == (0, 3) and rstd.shape == (0, 3)
    NF.layer_norm(x, (16,), w, b).sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# ---- determinism, registration, compile ---------------------------------------------------------


@pytest.mark.parametrize("hidden", [7, 1024, 4097, 16384, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_runs_bitwise_equal(dtype, hidden):
    rows = max(8, (1 << 22) // hidden)
    x = make_x((rows, hidden), dtype)
    w, b = make_params((hidden,), True, dtype)
    dy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        y, mean, rstd = ops.layer_norm_fwd(x, 1, w, b, 1e-5)
        dx, dw, db = ops.layer_norm_bwd(dy, x, 1, mean, rstd, w, [True, True, True])
        runs.append((y, mean, rstd, dx, dw, db))
    for name, a, c in zip(("y", "mean", "rstd", "dx", "dweight", "dbias"), *runs):
        assert torch.equal(a, c), f"{name} differs between two runs"


@pytest.mark.parametrize(
    "mask",
    [
        [True, False, False],
        [False, True, False],
        [False, False, True],
        [False, True, True],
        [True, True, True],
    ],
)
@pytest.mark.parametrize("hidden", [1024, 65536])
def test_backward_output_mask(mask, hidden):
    dtype = torch.float32
    x = make_x((5, hidden), dtype)
    w, b = make_params((hidden,), True, dtype)
    dy = torch.randn_like(x)
    _, mean, rstd = ops.layer_norm_fwd(x, 1, w, b, 1e-5)
    full = ops.layer_norm_bwd(dy, x, 1, mean, rstd, w, [True, True, True])
    part = ops.layer_norm_bwd(dy, x, 1, mean, rstd, w, mask)
    for i, (want, f, p) in enumerate(zip(mask, full, part)):
        if want:
            assert torch.equal(f, p), f"output {i} depends on the mask"
        else:
            assert p.shape == (0,), f"output {i} should be empty when not asked for"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    x = make_x((3, 5, 64), dtype)
    w, b = make_params((64,), True, dtype)
    torch.library.opcheck(torch.ops.normext.layer_norm_fwd.default, (x, 1, w, b, 1e-5))
    torch.library.opcheck(torch.ops.normext.layer_norm_fwd.default, (x, 2, None, None, 1e-5))
    y, mean, rstd = ops.layer_norm_fwd(x, 1, w, b, 1e-5)
    dy = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.normext.layer_norm_bwd.default, (dy, x, 1, mean, rstd, w, [True, True, True])
    )
    torch.library.opcheck(
        torch.ops.normext.layer_norm_bwd.default, (dy, x, 1, mean, rstd, None, [True, False, False])
    )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    dtype = torch.bfloat16
    x = make_x((8, 1024), dtype).requires_grad_(True)
    w, b = make_params((1024,), True, dtype, param_dtype=torch.float32)
    w.requires_grad_(True)
    b.requires_grad_(True)

    def f(x, w, b):
        return NF.layer_norm(x, (1024,), w, b, 1e-5).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    eager_grads = torch.autograd.grad(f(x, w, b), (x, w, b))
    compiled_out = compiled(x, w, b)
    compiled_grads = torch.autograd.grad(compiled_out, (x, w, b))
    torch.testing.assert_close(compiled_out, f(x, w, b))
    for name, e, c in zip(("dx", "dweight", "dbias"), eager_grads, compiled_grads):
        torch.testing.assert_close(c, e, msg=lambda m, name=name: f"{name}: {m}")


def test_errors():
    x = make_x((4, 8), torch.float32)
    with pytest.raises(RuntimeError, match="weight"):
        ops.layer_norm_fwd(x, 1, torch.ones(8, device="cpu"), None, 1e-5)
    with pytest.raises(RuntimeError, match="elements"):
        ops.layer_norm_fwd(x, 1, torch.ones(7, device=DEVICE), None, 1e-5)
    with pytest.raises(RuntimeError, match="normalized_ndim"):
        ops.layer_norm_fwd(x, 3, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.layer_norm_fwd(x.to(torch.int32), 1, None, None, 1e-5)
