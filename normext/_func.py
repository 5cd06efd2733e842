"""normext under torch.func (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap) and forward-mode AD.

The ops' autograd is a C++ torch::autograd::Function (csrc/autograd.cpp: a few us per call,
where a Python one costs tens), and functorch's transforms refuse C++ autograd Functions. While
a transform is active, normext.functional computes the same math (DESIGN.md) in differentiable
torch ops instead, so that every transform and every composition of them (hessian is jacfwd of
jacrev; per-sample gradients are vmap of grad) differentiates it exactly, with torch's own
batching rules under vmap. The values agree with the kernels' within rounding; the kernels do
not run under a transform. (A Python autograd.Function around the kernels, with derivative
formulas, also works, but under vmap its forward, a custom op without a batching rule, runs
once per sample.)

Outside transforms nothing here runs."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad as _forward_ad

from .ops import _acc_dtype


def active() -> bool:
    """Whether a torch.func transform is running (functorch has a current level), or forward-mode
    AD (torch.autograd.forward_ad) has a dual level open: a C++ autograd Function has no forward
    derivative ("jvp is not implemented for the c++ API of custom Function yet"), so dual inputs
    take the torch ops here too, as they would torch's layer_norm and batch_norm, which support
    forward AD (gradcheck's check_forward_ad, forward-over-reverse). Inside a dual level every
    call does, with or without a tangent: one attribute read decides, not a look at each input.

    Not peek_interpreter_stack(): torch.compile's tracer answers that with a non-None value even
    where no transform runs, which sent every compiled call through the torch ops here instead
    of normext's kernels (and let Inductor fuse away the output's rounding to its dtype).
    maybe_current_level() is right in eager and under torch.compile, with or without a transform."""
    return torch._C._functorch.maybe_current_level() is not None or _forward_ad._current_level >= 0


def _moments(xa, dims):
    """Mean and biased variance of xa over dims (kept as size-1 dims)."""
    mean = xa.mean(dims, keepdim=True)
    return mean, (xa - mean).square().mean(dims, keepdim=True)


def _affine(xhat, weight, bias, pview, dtype):
    """xhat * weight + bias (either may be None), in dtype."""
    if weight is not None:
        xhat = xhat * weight.to(xhat.dtype).reshape(pview)
    if bias is not None:
        xhat = xhat + bias.to(xhat.dtype).reshape(pview)
    return xhat.to(dtype)


def layer_norm(x, normalized_ndim: int, weight, bias, eps: float):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the trailing normalized_ndim dims."""
    xa = x.to(_acc_dtype(x.dtype))
    mean, var = _moments(xa, tuple(range(x.dim() - normalized_ndim, x.dim())))
    xhat = (xa - mean) * (var + eps).rsqrt()
    return _affine(xhat, weight, bias, x.shape[x.dim() - normalized_ndim:], x.dtype)


def batch_norm(x, weight, bias, running_mean, running_var, training: bool, eps: float):
    """(y, mean, var): with training, the batch's mean and biased variance per channel (for the
    running statistics); otherwise normalized with running_mean/running_var, and those returned."""
    pview = (1, x.shape[1], *([1] * (x.dim() - 2)))
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    if training:
        mean, var = _moments(xa, (0, *range(2, x.dim())))
    else:
        mean = running_mean.to(acc).reshape(pview)
        var = running_var.to(acc).reshape(pview)
    xhat = (xa - mean) * (var + eps).rsqrt()
    y = _affine(xhat, weight, bias, pview, x.dtype)
    return y, mean.reshape(-1), var.reshape(-1)


def update_stats(running_mean, running_var, mean, var, momentum: float, count: int,
                 num_batches_tracked) -> None:
    """ops.batch_norm_update_stats_ in torch ops (csrc/batch_norm_update.cpp's formula, in
    float64), so that vmap batches it too: running statistics stacked per model
    (torch.func.stack_module_state), updated in place. Not differentiated."""
    if count == 0:  # an empty batch leaves them unchanged, as torch does
        return
    with torch.no_grad():
        f = momentum if num_batches_tracked is None else 1.0 / num_batches_tracked.double()
        unbias = count / (count - 1) if count > 1 else 1.0
        for running, batch, scale in ((running_mean, mean, 1.0), (running_var, var, unbias)):
            new = running.double() * (1 - f) + batch.detach().double().reshape(running.shape) * (
                f * scale
            )
            running.copy_(new)
