"""Double backward (the gradient of a gradient) through normext: the autograd registrations of
the backward ops layer_norm_bwd/batch_norm_bwd (normext/ops.py). float64 gradgradcheck through
normext.functional, second-order gradients of a gradient penalty equal to torch.nn's, triple
backward, and opcheck of the backward ops with inputs that require grad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, prefixed

import normext.functional as NF

ops = torch.ops.normext
f64 = {"dtype": torch.float64}


def _ln_fn(normalized_shape, has_weight, has_bias):
    def fn(x, *ps):
        it = iter(ps)
        w = next(it) if has_weight else None
        b = next(it) if has_bias else None
        return NF.layer_norm(x, normalized_shape, w, b, eps=1e-5)

    return fn


def _bn_fn(lib, mode, c, affine):
    rm, rv = 0.1 * torch.randn(c, **f64), 0.5 + torch.rand(c, **f64)

    def fn(x, *ps):
        w, b = ps if affine else (None, None)
        if mode == "train":
            return lib.batch_norm(x, None, None, w, b, training=True)
        # the statistics in the parameters' dtype: torch refuses a mix (float32 with bfloat16)
        sd = w.dtype if w is not None else x.dtype
        return lib.batch_norm(x, rm.to(sd), rv.to(sd), w, b, training=False)

    return fn


# ---- gradgradcheck ------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("normalized_shape", [(5,), (2, 3)], ids=str)
def test_gradgradcheck_layer_norm(normalized_shape, affine):
    if normalized_shape == (5,):
        x = torch.randn(5, 3, **f64).t()  # (3, 5), not contiguous
    else:
        x = torch.randn(3, *normalized_shape, **f64)
    x.requires_grad_(True)
    params = [
        torch.randn(normalized_shape, **f64, requires_grad=True)
        for _ in range({"both": 2, "weight": 1, "none": 0}[affine])
    ]
    fn = _ln_fn(normalized_shape, affine != "none", affine == "both")
    assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_gradgradcheck_layer_norm_no_leading_dims():
    """x of exactly normalized_shape: one row, and the weight's gradient sums over nothing."""
    x, w, b = (torch.randn(2, 3, **f64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradgradcheck(_ln_fn((2, 3), True, True), (x, w, b))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "shape,layout", [((5, 3), "contiguous"), ((3, 2, 2, 3), "channels_last")], ids=str
)
def test_gradgradcheck_batch_norm(shape, layout, mode, affine):
    x = torch.randn(shape, **f64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    c = shape[1]
    params = [torch.randn(c, **f64, requires_grad=True) for _ in range(2 if affine else 0)]
    assert torch.autograd.gradgradcheck(_bn_fn(NF, mode, c, affine), (x, *params))


def _first_order(fn):
    """(x, w) -> the gradient of sum(fn(x, w)^3) wrt (x, w), differentiable (create_graph)."""

    def grads(x, w):
        return torch.autograd.grad(fn(x, w).pow(3).sum(), (x, w), create_graph=True)

    return grads


@pytest.mark.parametrize("fn", ["layer_norm", "batch_norm-train", "batch_norm-eval"])
def test_triple_backward(fn):
    """gradgradcheck of a first-order gradient checks the third derivative: the double-backward
    formulas are differentiable torch ops, with the statistics rebuilt from x (training)."""
    if fn == "layer_norm":
        x, w = torch.randn(3, 5, **f64), torch.randn(5, **f64)
        f = _ln_fn((5,), True, False)
    else:
        x, w = torch.randn(4, 2, 3, **f64), torch.randn(2, **f64)
        base = _bn_fn(NF, fn.split("-")[1], 2, True)
        b = torch.randn(2, **f64)

        def f(x, w):
            return base(x, w, b)

    inputs = (x.requires_grad_(True), w.requires_grad_(True))
    assert torch.autograd.gradgradcheck(_first_order(f), inputs, fast_mode=True)


# ---- second-order gradients equal to torch's -----------------------------------------------------


def _penalty_grads(fn, x, params, wrt):
    """Gradient-penalty loss: |d L / d (wrt)|^2 with L = sum(fn(x, *params)^3 * t), then its
    gradient wrt every input that requires grad."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *params)]
    y = fn(*leaves)
    t = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    targets = [leaves[i] for i in wrt]
    firsts = torch.autograd.grad((y.pow(3) * t).sum(), targets, create_graph=True)
    penalty = sum((g.pow(2) * (i + 1)).sum() for i, g in enumerate(firsts))
    penalty = penalty + (y * t).sum()  # a first-order term too
    return torch.autograd.grad(penalty, leaves, materialize_grads=True)


CASES = [
    ("layer_norm", (4, 3, 5), (5,)),
    ("layer_norm", (4, 3, 5), (3, 5)),
    ("batch_norm-train", (6, 3), None),
    ("batch_norm-train", (3, 4, 2, 3), "channels_last"),
    ("batch_norm-eval", (3, 4, 5), None),
]


@pytest.mark.parametrize("wrt", ["x", "weight", "bias", "x+weight+bias"])
@pytest.mark.parametrize("fn,shape,extra", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_gradient_penalty_matches_torch(fn, shape, extra, wrt):
    """The gradient of a gradient penalty (penalty on the grad wrt x, weight, bias or all) wrt
    x, weight and bias, as torch.nn.functional gives it, in float64."""
    x = torch.randn(shape, **f64) * 2 + 0.5
    if extra == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    pshape = extra if fn == "layer_norm" else (shape[1],)
    params = [torch.randn(pshape, **f64), torch.randn(pshape, **f64)]
    idx = {"x": 0, "weight": 1, "bias": 2}
    wrt_idx = [idx[k] for k in wrt.split("+")]
    results = []
    for lib in (F, NF):
        torch.manual_seed(0)  # the same running statistics for both
        if fn == "layer_norm":
            f = lambda x, w, b, lib=lib: lib.layer_norm(x, pshape, w, b)
        else:
            f = _bn_fn(lib, fn.split("-")[1], shape[1], True)
        results.append(_penalty_grads(f, x, params, wrt_idx))
    for name, ours, theirs in zip(("x", "weight", "bias"), results[1], results[0]):
        torch.testing.assert_close(
            ours, theirs, **TOL[torch.float64]["bwd"], msg=prefixed(f"grad {name}")
        )
    assert results[0][0].abs().max() > 0


@pytest.mark.parametrize("fn", ["layer_norm", "batch_norm-train", "batch_norm-eval"])
def test_double_backward_params_only(fn):
    """x does not require grad (the backward op computes dweight/dbias only): the gradient of a
    penalty on the weight's gradient wrt the weight and bias, as torch gives it."""
    x = torch.randn(4, 3, 5, **f64)
    pshape = (5,) if fn == "layer_norm" else (3,)
    params = [torch.randn(pshape, **f64, requires_grad=True) for _ in range(2)]
    results = []
    for lib in (F, NF):
        torch.manual_seed(0)
        if fn == "layer_norm":
            f = lambda x, w, b, lib=lib: lib.layer_norm(x, pshape, w, b)
        else:
            f = _bn_fn(lib, fn.split("-")[1], 3, True)
        ps = [p.detach().clone().requires_grad_(True) for p in params]
        y = f(x, *ps)
        (gw,) = torch.autograd.grad((y.pow(3)).sum(), ps[0], create_graph=True)
        results.append(torch.autograd.grad(gw.pow(2).sum(), ps, materialize_grads=True))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, **TOL[torch.float64]["bwd"])


@pytest.mark.parametrize("fn", ["layer_norm", "batch_norm-train", "batch_norm-eval"])
def test_double_backward_mixed_precision(fn):
    """bfloat16 input with float32 parameters: second-order grads come back in the inputs'
    dtypes and agree with a float64 computation from the same values."""
    x = torch.randn(4, 3, 8).to(torch.bfloat16)
    pshape = (8,) if fn == "layer_norm" else (3,)
    w, b = torch.randn(pshape), torch.randn(pshape)
    results = []
    for dtype, pdtype in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        torch.manual_seed(0)
        if fn == "layer_norm":
            f = lambda x, w, b: NF.layer_norm(x, pshape, w, b)
        else:
            f = _bn_fn(NF, fn.split("-")[1], 3, True)
        xs = x.to(dtype).requires_grad_(True)
        ps = [p.to(pdtype).requires_grad_(True) for p in (w, b)]
        (gx,) = torch.autograd.grad(f(xs, *ps).pow(3).sum(), xs, create_graph=True)
        results.append(torch.autograd.grad(gx.float().pow(2).sum(), (xs, *ps)))
    for ours, ref, dtype in zip(results[0], results[1], (torch.bfloat16, torch.float32)):
        assert ours.dtype == dtype
        scale = ref.abs().max().item()
        torch.testing.assert_close(ours.double(), ref, atol=0.1 * scale, rtol=0)


# ---- opcheck with inputs that require grad -------------------------------------------------------


def _bwd_grad_samples():
    rg = lambda t: t.requires_grad_(True)
    x, w = torch.randn(3, 4, 5), torch.randn(4, 5)
    _, m, r = ops.layer_norm_fwd(x, 2, w, None, 1e-5)
    xb, wb = torch.randn(4, 6, dtype=torch.bfloat16), torch.randn(6)
    _, mb, rb = ops.layer_norm_fwd(xb, 1, wb, None, 1e-5)
    xc = torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    wc = torch.randn(3)
    _, mt, it, _ = ops.batch_norm_fwd(xc, wc, None, None, None, True, 1e-5)
    _, me, ie, _ = ops.batch_norm_fwd(xc, wc, None, torch.zeros(3), torch.ones(3), False, 1e-5)
    return [
        (ops.layer_norm_bwd, (rg(torch.randn_like(x)), rg(x), 2, m, r, rg(w), [True] * 3)),
        (
            ops.layer_norm_bwd,
            (rg(torch.randn_like(xb)), rg(xb), 1, mb, rb, None, [True, False, True]),
        ),
        (ops.batch_norm_bwd, (rg(torch.randn_like(xc)), rg(xc), rg(wc), mt, it, True, [True] * 3)),
        (
            ops.batch_norm_bwd,
            (rg(torch.randn_like(xc)), xc, None, me, ie, False, [True, True, True]),
        ),
    ]


def test_opcheck_backward_ops_with_grad():
    """opcheck (schema, fake, autograd registration, AOT dispatch, which traces the double
    backward) on the backward ops with inputs that require grad."""
    for i, (op, args) in enumerate(_bwd_grad_samples()):
        try:
            torch.library.opcheck(op.default, args)
        except Exception as e:
            raise AssertionError(f"{op} sample {i}: {e}") from e
