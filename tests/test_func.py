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
