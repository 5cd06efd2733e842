"""Typed wrappers over ``torch.ops.normext.*``, with their fake (shape-only) and autograd
registrations. Importing this module loads the compiled library, which registers the ops."""

from __future__ import annotations

import torch
import torch._prims_common

from . import _C  # noqa: F401  (loads the library: runs TORCH_LIBRARY registrations)

__all__ = [
    "batch_norm_bwd",
    "batch_norm_fwd",
    "batch_norm_update_stats_",
    "layer_norm_bwd",
    "layer_norm_fwd",
]

_ops = torch.ops.normext


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_same_device(op: str, x, x_name: str = "input", **tensors) -> None:
    """The fake impls' device check. They also serve as the ops' Meta kernels, so a call that mixes
    a meta tensor with a CPU (or CUDA) one lands here, not in a backend's TORCH_CHECK: without
    this check it would return meta tensors (or, for the in-place update, do nothing) silently."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(
                t.device == x.device,
                lambda name=name, t=t: f"{op}: {name} is on {t.device} but {x_name} is on {x.device}",
            )


# ---- LayerNorm ----------------------------------------------------------------------------------


def layer_norm_fwd(x, normalized_ndim: int, weight, bias, eps: float):
    """Returns (y, mean, rstd); mean/rstd have shape x.shape[:-normalized_ndim]."""
    return _ops.layer_norm_fwd.default(x, normalized_ndim, weight, bias, eps)


def layer_norm_bwd(dy, x, normalized_ndim: int, mean, rstd, weight, output_mask):
    """Returns (dx, dweight, dbias); dweight/dbias in the statistics' dtype, empty if not asked."""
    return _ops.layer_norm_bwd.default(dy, x, normalized_ndim, mean, rstd, weight, output_mask)


@torch.library.register_fake("normext::layer_norm_fwd")
def _layer_norm_fwd_fake(x, normalized_ndim, weight, bias, eps):
    torch._check(1 <= normalized_ndim <= x.dim(), lambda: "normalized_ndim out of range")
    _check_same_device("normext::layer_norm_fwd", x, weight=weight, bias=bias)
    lead = x.shape[: x.dim() - normalized_ndim]
    acc = _acc_dtype(x.dtype)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(lead, dtype=acc), x.new_empty(lead, dtype=acc)


@torch.library.register_fake("normext::layer_norm_bwd")
def _layer_norm_bwd_fake(dy, x, normalized_ndim, mean, rstd, weight, output_mask):
    _check_same_device("normext::layer_norm_bwd", x, grad_out=dy, mean=mean, rstd=rstd, weight=weight)
    acc = _acc_dtype(x.dtype)
    pshape = x.shape[x.dim() - normalized_ndim :]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else x.new_empty((0,))
    dw = x.new_empty(pshape if output_mask[1] else (0,), dtype=acc)
    db = x.new_empty(pshape if output_mask[2] else (0,), dtype=acc)
    return dx, dw, db


# The forward ops' autograd (backward = the *_bwd op) is registered in C++: csrc/autograd.cpp.


# ---- BatchNorm ----------------------------------------------------------------------------------


def batch_norm_fwd(x, weight, bias, running_mean, running_var, training: bool, eps: float):
    """Returns (y, save_mean, save_invstd, batch_var); batch_var is empty in eval."""
    return _ops.batch_norm_fwd.default(x, weight, bias, running_mean, running_var, training, eps)


def batch_norm_bwd(dy, x, weight, save_mean, save_invstd, training: bool, output_mask):
    """Returns (dx, dweight, dbias); dweight/dbias in the statistics' dtype, empty if not asked."""
    return _ops.batch_norm_bwd.default(dy, x, weight, save_mean, save_invstd, training, output_mask)


def batch_norm_update_stats_(
    running_mean, running_var, batch_mean, batch_var, momentum: float, count, num_batches_tracked=None
):
    """In-place running-statistics update (no autograd). With num_batches_tracked, the factor is
    1 / num_batches_tracked (momentum=None) and momentum is ignored."""
    _ops.batch_norm_update_stats_.default(
        running_mean, running_var, batch_mean, batch_var, momentum, count, num_batches_tracked
    )


def _is_channels_last_like(x) -> bool:
    """(N, C, *) stored as (N, *, C): the layout csrc/common.h calls channels-last."""
    expected = 1
    for d in [1, *range(x.dim() - 1, 1, -1), 0]:
        if x.shape[d] != 1 and x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return True


def _bn_like(x):
    """An empty tensor laid out as the kernels lay out BatchNorm's output (csrc/common.h)."""
    spatial = 1
    for s in x.shape[2:]:
        spatial *= s
    if (spatial == 1 or not x.is_contiguous() or x.numel() == 0) and _is_channels_last_like(x):
        return torch.empty_like(x)
    if x.dim() >= 4 and not x.is_contiguous():
        fmt = torch._prims_common.suggest_memory_format(x)
        if fmt != torch.contiguous_format:
            return x.new_empty(x.shape).contiguous(memory_format=fmt)
    return x.new_empty(x.shape)


def _torch_uses_cudnn(x, weight, bias, running_mean, running_var, training, eps) -> bool:
    """Whether torch's batch_norm would run x through cuDNN: the conditions of
    at::native::_select_batch_norm_backend, as csrc/cuda/batch_norm.cu's torch_uses_cudnn.
    (cuDNN 8 and later accept any eps >= 0: CUDNN_BN_MIN_EPSILON is 0.)"""
    if weight is None or bias is None:
        return False
    xt, wt = x.dtype, weight.dtype
    stats = running_mean is not None and running_var is not None
    no_stats = running_mean is None and running_var is None
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return (
        xt != torch.bfloat16
        and wt != torch.bfloat16
        and (xt != torch.float16 or wt == torch.float32)
        and (stats or (no_stats and training))
        and x.dim() >= 3
        and x.shape[0] <= (880801 if training else 65535)
        and torch.backends.cudnn.enabled
        and version is not None
        and version >= 5110
        and eps >= (0.0 if version >= 8000 else 1e-5)
        and x.numel() < 2**31 - 1
    )


def _dense(x) -> bool:
    pc = torch._prims_common
    check = getattr(pc, "is_non_overlapping_and_dense_or_false", None)
    return check(x) if check is not None else pc.is_non_overlapping_and_dense(x)


def _bn_fwd_like(x, weight, bias, running_mean, running_var, training, eps):
    """The forward's output: on CUDA, a dense input's strides where torch keeps them (see
    csrc/cuda/batch_norm.cu, torch_uses_cudnn); elsewhere the kernels' layout (_bn_like)."""
    y = _bn_like(x)
    if (
        x.device.type == "cuda"
        and y.stride() != x.stride()
        and _dense(x)
        and not _torch_uses_cudnn(x, weight, bias, running_mean, running_var, training, eps)
    ):
        return torch.empty_like(x)
    return y


@torch.library.register_fake("normext::batch_norm_fwd")
def _batch_norm_fwd_fake(x, weight, bias, running_mean, running_var, training, eps):
    torch._check(x.dim() >= 2, lambda: "batch_norm expects an input with at least 2 dims")
    _check_same_device("normext::batch_norm_fwd", x, weight=weight, bias=bias,
                       running_mean=running_mean, running_var=running_var)
    c = x.shape[1]
    acc = _acc_dtype(x.dtype)
    return (
        _bn_fwd_like(x, weight, bias, running_mean, running_var, training, eps),
        x.new_empty((c,), dtype=acc),
        x.new_empty((c,), dtype=acc),
        x.new_empty((c if training else 0,), dtype=acc),
    )


@torch.library.register_fake("normext::batch_norm_bwd")
def _batch_norm_bwd_fake(dy, x, weight, save_mean, save_invstd, training, output_mask):
    _check_same_device("normext::batch_norm_bwd", x, grad_out=dy, weight=weight,
                       save_mean=save_mean, save_invstd=save_invstd)
    c = x.shape[1]
    acc = _acc_dtype(x.dtype)
    dx = _bn_like(x) if output_mask[0] else x.new_empty((0,))
    return dx, x.new_empty((c if output_mask[1] else 0,), dtype=acc), x.new_empty((c if output_mask[2] else 0,), dtype=acc)


@torch.library.register_fake("normext::batch_norm_update_stats_")
def _batch_norm_update_stats_fake(
    running_mean, running_var, batch_mean, batch_var, momentum, count, num_batches_tracked=None
):
    _check_same_device("normext::batch_norm_update_stats_", running_mean, "running_mean",
                       running_var=running_var, batch_mean=batch_mean, batch_var=batch_var,
                       num_batches_tracked=num_batches_tracked)


# (autograd of batch_norm_fwd: csrc/autograd.cpp)


# ---- double backward ----------------------------------------------------------------------------
# Autograd formulas for the backward ops, so that a gradient of a gradient (create_graph=True, e.g.
# a gradient penalty) works and matches torch.nn. Without a registration autograd's fallback would
# treat the backward ops as constants and the second-order gradient would come out silently zero.
#
# Per group of n values (a LayerNorm row, a BatchNorm channel over N x spatial), with g = w * dy,
# x^ = (x - mean) * r and P(u) = u - mean(u) - x^ * mean(u * x^) (the group means are over the
# group), the backward op computes dx = r * P(g), dw = sum(dy * x^), db = sum(dy). Given the
# incoming grads a = grad(dx), gw = grad(dw), gb = grad(db), its vector-Jacobian product is
#   grad(dy) = w * r * P(a) + gw * x^ + gb
#   grad(w)  = sum(dy * r * P(a))
#   grad(x)  = r * P(v) - r^2 * x^ * mean(a * P(g)),
#              v = gw * dy - r * (a * mean(g * x^) + g * mean(a * x^))
# where grad(x) is the *total* derivative: mean and r are the statistics of x (training), which
# the forward op returns as non-differentiable outputs, so their dependence on x is accounted for
# here (d x^/dx = r * P, dr/dx = -r^2 * x^ / n). The mean/rstd inputs get no gradient: the backward
# ops' contract is that they are x's statistics. In eval BatchNorm the statistics are constants:
# dx = w * r * dy, so P is the identity and the statistics terms vanish:
#   grad(dy) = w * r * a + gw * x^ + gb,  grad(w) = sum(dy * r * a),  grad(x) = r * gw * dy.
# The formulas are plain differentiable torch ops, computed in the statistics' dtype (float32 for
# half inputs). When they are themselves differentiated (create_graph=True: triple backward), the
# statistics are rebuilt from x so that they carry x's gradient while keeping the saved values:
# mean + (m(x) - m(x).detach()) and rstd + (r(x) - r(x).detach()) with r(x) = (v(x) - v(x).detach()
# + rstd^-2)^-1/2, which has the derivative dr/dvar = -r^3/2 that eps-dependent rstd has.


def _stats(x, mean, rstd, dims, differentiable: bool):
    """mean/rstd broadcastable to x; with differentiable=True, carrying their dependence on x."""
    if not (differentiable and torch.is_grad_enabled() and x.requires_grad):
        return mean, rstd
    m = x.mean(dims, keepdim=True)
    var = (x - m).square().mean(dims, keepdim=True)
    r = (var - var.detach() + rstd.detach().pow(-2)).rsqrt()
    return mean + (m - m.detach()), rstd + (r - r.detach())


def _norm_double_backward(grads, dy, x, weight, mean, rstd, dims, pdims, pview, training, needs):
    """The vector-Jacobian product of the backward ops (formulas above). dims: a group's dims;
    pdims: the dims a parameter gradient sums over; pview: a parameter's shape broadcastable to x;
    mean/rstd: already broadcastable to x. needs: (dy, x, weight) input grads wanted. Returns
    (grad_dy, grad_x, grad_weight) in the dtypes of dy, x, weight (None where not wanted)."""
    ddx, ddw, ddb = grads
    acc = mean.dtype
    xa, dya = x.to(acc), dy.to(acc)
    mean, rstd = _stats(xa, mean, rstd, dims, training and needs[1])
    xhat = (xa - mean) * rstd
    w = weight.to(acc).view(pview) if weight is not None else None
    gw = ddw.to(acc).view(pview) if ddw is not None else None
    gb = ddb.to(acc).view(pview) if ddb is not None else None
    a = ddx.to(acc) if ddx is not None else None

    def proj(u):  # P(u)
        if not training:
            return u
        return u - u.mean(dims, keepdim=True) - xhat * (u * xhat).mean(dims, keepdim=True)

    g_dy = g_x = g_w = None
    ra = rstd * proj(a) if a is not None else None
    if needs[0]:
        terms = [ra * w if w is not None else ra] if ra is not None else []
        if gw is not None:
            terms.append(gw * xhat)
        if gb is not None:
            terms.append(gb if terms else gb.expand_as(xa).clone())
        g_dy = sum(terms[1:], terms[0]) if terms else torch.zeros_like(xa)
    if needs[2] and weight is not None:
        if ra is None:
            g_w = torch.zeros_like(weight, dtype=acc)
        else:  # sum(()) would sum over everything: no leading dims (LayerNorm) means no sum
            g_w = ((dya * ra).sum(pdims) if pdims else dya * ra).reshape(weight.shape)
    if needs[1]:
        g = dya * w if w is not None else dya
        v = gw * dya if gw is not None else None
        if training and a is not None:
            mix = a * (g * xhat).mean(dims, keepdim=True) + g * (a * xhat).mean(dims, keepdim=True)
            v = -rstd * mix if v is None else v - rstd * mix
        g_x = rstd * proj(v) if v is not None else torch.zeros_like(xa)
        if training and a is not None:
            g_x = g_x - rstd.square() * xhat * (a * proj(g)).mean(dims, keepdim=True)
    return (
        g_dy.to(dy.dtype) if g_dy is not None else None,
        g_x.to(x.dtype) if g_x is not None else None,
        g_w.to(weight.dtype) if g_w is not None else None,
    )


def _used(grad, wanted: bool):
    """An incoming grad, or None when that output was not computed (output_mask) or not used."""
    return grad if wanted and grad is not None else None


def _layer_norm_bwd_setup_context(ctx, inputs, output):
    dy, x, normalized_ndim, mean, rstd, weight, output_mask = inputs
    ctx.normalized_ndim = normalized_ndim
    ctx.output_mask = list(output_mask)
    ctx.save_for_backward(dy, x, mean, rstd, weight)


def _layer_norm_bwd_backward(ctx, ddx, ddw, ddb):
    dy, x, mean, rstd, weight = ctx.saved_tensors
    k, mask = ctx.normalized_ndim, ctx.output_mask
    lead = x.dim() - k
    stat_view = (*mean.shape, *([1] * k))
    nig = ctx.needs_input_grad
    g_dy, g_x, g_w = _norm_double_backward(
        (_used(ddx, mask[0]), _used(ddw, mask[1]), _used(ddb, mask[2])),
        dy, x, weight, mean.reshape(stat_view), rstd.reshape(stat_view),
        dims=tuple(range(lead, x.dim())), pdims=tuple(range(lead)), pview=x.shape[lead:],
        training=True, needs=(nig[0], nig[1], nig[5]),
    )
    return g_dy, g_x, None, None, None, g_w, None


def _batch_norm_bwd_setup_context(ctx, inputs, output):
    dy, x, weight, save_mean, save_invstd, training, output_mask = inputs
    ctx.training = training
    ctx.output_mask = list(output_mask)
    ctx.save_for_backward(dy, x, weight, save_mean, save_invstd)


def _batch_norm_bwd_backward(ctx, ddx, ddw, ddb):
    dy, x, weight, save_mean, save_invstd = ctx.saved_tensors
    mask = ctx.output_mask
    view = (1, x.shape[1], *([1] * (x.dim() - 2)))
    nig = ctx.needs_input_grad
    dims = (0, *range(2, x.dim()))
    g_dy, g_x, g_w = _norm_double_backward(
        (_used(ddx, mask[0]), _used(ddw, mask[1]), _used(ddb, mask[2])),
        dy, x, weight, save_mean.reshape(view), save_invstd.reshape(view),
        dims=dims, pdims=dims, pview=view, training=ctx.training, needs=(nig[0], nig[1], nig[2]),
    )
    return g_dy, g_x, g_w, None, None, None, None


torch.library.register_autograd(
    "normext::layer_norm_bwd", _layer_norm_bwd_backward, setup_context=_layer_norm_bwd_setup_context
)
torch.library.register_autograd(
    "normext::batch_norm_bwd", _batch_norm_bwd_backward, setup_context=_batch_norm_bwd_setup_context
)
