"""normext under torch.func: grad, jvp, jacfwd, jacrev, hessian and vmap (per-sample gradients),
against torch.nn.functional, and the running statistics under grad (normext/_func.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normext
import normext.functional as NF

F64 = torch.float64


def _case(name, lib):
    """f(x, w, b) and its arguments; lib: torch.nn.functional or normext.functional."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, dtype=F64, generator=g)
    rm, rv = rnd(3), torch.rand(3, dtype=F64, generator=g) + 0.5
    if name == "layer_norm":
        return (lambda x, w, b: lib.layer_norm(x, (2, 5), w, b)), (rnd(3, 2, 5), rnd(2, 5), rnd(2, 5))
    if name == "layer_norm_bias_only":
        return (lambda x, w, b: lib.layer_norm(x, (5,), None, b)), (rnd(3, 5), rnd(5), rnd(5))
    args = (rnd(4, 3, 2), rnd(3), rnd(3))
    if name == "batch_norm_train":
        return (lambda x, w, b: lib.batch_norm(x, None, None, w, b, True)), args
    return (lambda x, w, b: lib.batch_norm(x, rm, rv, w, b, False)), args


TRANSFORMS = {
    "grad": lambda f, a: torch.func.grad(lambda *t: (f(*t) ** 3).sum(), argnums=(0, 1, 2))(*a),
    "jvp": lambda f, a: torch.func.jvp(f, a, tuple(torch.ones_like(t) for t in a))[1],
    "jacfwd": lambda f, a: torch.func.jacfwd(f, argnums=(0, 1, 2))(*a),
    "jacrev": lambda f, a: torch.func.jacrev(f, argnums=(0, 1, 2))(*a),
    "hessian": lambda f, a: torch.func.hessian(lambda x: (f(x, *a[1:]) ** 3).sum())(a[0]),
    "vmap_grad": lambda f, a: torch.vmap(
        torch.func.grad(lambda x: (f(x, *a[1:]) ** 2).sum()), in_dims=0
    )(torch.stack([a[0], 2 * a[0]])),
}
CASES = ["layer_norm", "layer_norm_bias_only", "batch_norm_train", "batch_norm_eval"]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("case", CASES)
def test_transforms_match_torch(case, transform):
    ours = TRANSFORMS[transform](*_case(case, NF))
    theirs = TRANSFORMS[transform](*_case(case, F))
    torch.testing.assert_close(ours, theirs)


def _fd_hessian(f, args, h=1e-5):
    """Central differences of torch's first-order gradients (eager autograd), block by block."""

    def grads(*a):
        a = [t.detach().requires_grad_() for t in a]
        out = torch.autograd.grad((f(*a) ** 3).sum(), a, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(a, out)]

    blocks = [[None] * len(args) for _ in args]
    for j, arg in enumerate(args):
        cols = []
        for k in range(arg.numel()):
            step = torch.zeros_like(arg).view(-1)
            step[k] = h
            plus = list(args)
            minus = list(args)
            plus[j] = arg + step.view_as(arg)
            minus[j] = arg - step.view_as(arg)
            cols.append([(p - m) / (2 * h) for p, m in zip(grads(*plus), grads(*minus))])
        for i in range(len(args)):
            blocks[i][j] = torch.stack([c[i] for c in cols], dim=-1).reshape(
                *args[i].shape, *arg.shape
            )
    return blocks


@pytest.mark.parametrize("case", CASES)
def test_mixed_hessian(case):
    """The Hessian over (x, w, b) together, against central differences of torch's gradients.
    (In torch 2.13, torch.func.hessian of torch's own layer_norm and batch_norm gets the
    d(grad w)/dx block wrong, and torch.autograd.functional.hessian the d(grad b)/dx block of a
    layer_norm without weight, by several units in these cases; normext's agree with the
    differences.)"""
    f, args = _case(case, NF)
    ours = torch.func.hessian(lambda *a: (f(*a) ** 3).sum(), argnums=(0, 1, 2))(*args)
    g, _ = _case(case, F)
    ref = _fd_hessian(g, args)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(
                ours[i][j], ref[i][j], atol=1e-5, rtol=1e-5, msg=f"block {i}, {j}"
            )


def test_functional_call_running_statistics():
    """torch.func.grad over torch.func.functional_call of a converted net, the buffers passed in
    (a transform refuses to mutate captured ones, torch's modules too): the gradients and the
    updated running statistics are torch.nn's."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(16))
    ref = ref.double()
    ours = normext.convert(copy.deepcopy(ref))
    x = torch.randn(5, 3, 4, 4, dtype=F64)
    grads, buffers = {}, {}
    for name, net in (("ours", ours), ("torch", ref)):
        params = dict(net.named_parameters())
        buffers[name] = {k: v.clone() for k, v in net.named_buffers()}

        def loss(p, b, net=net):
            return (torch.func.functional_call(net, (p, b), (x,)) ** 2).sum()

        grads[name] = torch.func.grad(loss)(params, buffers[name])
    for k in grads["torch"]:
        torch.testing.assert_close(grads["ours"][k], grads["torch"][k], msg=k)
    for k in buffers["torch"]:
        torch.testing.assert_close(buffers["ours"][k], buffers["torch"][k], msg=k)
    assert buffers["ours"]["1.num_batches_tracked"].item() == 1
    assert not torch.equal(buffers["ours"]["1.running_mean"], torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_vmap_ensemble_running_statistics(momentum):
    """torch.func's model ensembling (stack_module_state, then vmap of functional_call) in
    training: each model's running statistics, stacked, are updated in place as each torch.nn
    model's own are (the update runs in torch ops there; the custom op has no batching rule).
    The reference runs the models one by one: torch's module reads num_batches_tracked with
    .item() for momentum=None, which vmap refuses (ours does not read it on the host)."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4, 5, 5, dtype=F64)  # one batch of 6 per model
    ref = [nn.BatchNorm2d(4, momentum=momentum).double() for _ in range(3)]
    for i, m in enumerate(ref):
        m.weight.data.fill_(1.0 + i)
    ours = [normext.convert(copy.deepcopy(m)) for m in ref]
    params, buffers = torch.func.stack_module_state(ours)
    base = copy.deepcopy(ours[0]).to("meta")
    call = lambda p, b, xi: torch.func.functional_call(base, (p, b), (xi,))
    for _ in range(2):
        y = torch.vmap(call)(params, buffers, x)
        y_ref = torch.stack([m(xi) for m, xi in zip(ref, x)])
    torch.testing.assert_close(y, y_ref)
    for k, v in buffers.items():
        torch.testing.assert_close(v, torch.stack([m.get_buffer(k) for m in ref]), msg=k)
    assert buffers["num_batches_tracked"].tolist() == [2, 2, 2]


# ---- forward-mode AD (torch.autograd.forward_ad) ----------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_forward_ad_tangents_match_torch(case):
    """Dual tensors: the C++ autograd Function has no forward derivative, so inside a dual level
    normext computes in torch ops (_func.active), as torch's layer_norm and batch_norm support
    forward AD. The tangent (and the primal) match torch's; after the level, the kernels again."""
    import torch.autograd.forward_ad as fwAD

    results = {}
    for name, lib in (("ours", NF), ("torch", F)):
        f, args = _case(case, lib)
        tangents = [torch.ones_like(a) * (i + 1) for i, a in enumerate(args)]
        with fwAD.dual_level():
            y = f(*[fwAD.make_dual(a, t) for a, t in zip(args, tangents)])
            results[name] = fwAD.unpack_dual(y)
    torch.testing.assert_close(results["ours"].primal, results["torch"].primal)
    torch.testing.assert_close(results["ours"].tangent, results["torch"].tangent)
    assert not normext._func.active()


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_forward_ad(case):
    """torch's OpInfo tests for layer_norm/batch_norm (supports_forward_ad, supports_fwgrad_bwgrad):
    forward-mode gradcheck, batched forward grads, and forward-over-reverse."""
    f, args = _case(case, NF)
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(
        f, args, check_forward_ad=True, check_batched_forward_grad=True
    )
    assert torch.autograd.gradgradcheck(f, args, check_fwd_over_rev=True)


def test_forward_ad_modules_update_running_statistics():
    """A BatchNorm module in training under forward AD: output tangent as torch.nn's, and the
    running statistics updated as torch.nn's (without a tangent)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    x, t = torch.randn(5, 3, 4, dtype=F64), torch.randn(5, 3, 4, dtype=F64)
    res = {}
    for name, lib in (("ours", normext), ("torch", nn)):
        m = lib.BatchNorm1d(3).double()
        with fwAD.dual_level():
            y = m(fwAD.make_dual(x, t))
            res[name] = (fwAD.unpack_dual(y), m.running_mean.clone(), m.running_var.clone())
            assert fwAD.unpack_dual(m.running_mean).tangent is None
    for a, b in zip(res["ours"][0], res["torch"][0]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(res["ours"][1], res["torch"][1])
    torch.testing.assert_close(res["ours"][2], res["torch"][2])
