"""``batch_norm`` and ``layer_norm`` with torch.nn.functional's signatures and semantics, on the
normext kernels: argument checks with clear messages, then the ops, then the running-statistics
bookkeeping."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _C, _func, _script, ops

__all__ = ["batch_norm", "layer_norm"]

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)


def _check_tensor(fn: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, but got {type(x).__name__}")


def _check_input_dtype(fn: str, x: Tensor) -> None:
    _check_tensor(fn, x)
    if x.dtype not in _FLOATING:
        # NotImplementedError, as torch's kernels raise for these dtypes (a RuntimeError too)
        raise NotImplementedError(
            f"{fn}: expected a floating-point input (float32, float64, float16 or bfloat16), "
            f"but got {x.dtype}"
        )


def _check_param(fn: str, name: str, p: Tensor | None, x: Tensor, shape) -> None:
    """Same device as x, x's dtype (or float32 for a half input), and the given shape/size."""
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor or None, but got {type(p).__name__}")
    if p.device != x.device:
        raise RuntimeError(
            f"{fn}: expected {name} on the input's device {x.device}, but it is on {p.device}"
        )
    if p.dtype != x.dtype and not (x.dtype in _HALF and p.dtype == torch.float32):
        raise RuntimeError(
            f"{fn}: {name} has dtype {p.dtype} but the input has dtype {x.dtype}; a parameter "
            "must have the input's dtype, or float32 for a float16/bfloat16 input"
        )
    if isinstance(shape, int):
        if p.numel() != shape:
            raise RuntimeError(f"{fn}: {name} should contain {shape} elements not {p.numel()}")
    elif tuple(p.shape) != tuple(shape):
        raise RuntimeError(
            f"Expected {name} to be of same shape as normalized_shape, but got {name} of "
            f"shape {list(p.shape)} and normalized_shape = {list(shape)}"
        )


def _check_params_agree(fn: str, x: Tensor, params) -> None:
    """The given parameters share one dtype, as torch requires: for a float16/bfloat16 input,
    all of them the input's dtype or all float32, not a mix (_check_param has checked each)."""
    given = [(name, p) for name, p in params if p is not None]
    for name, p in given[1:]:
        if p.dtype != given[0][1].dtype:
            first = given[0][0]
            raise RuntimeError(
                f"{fn}: {first} has dtype {given[0][1].dtype} but {name} has dtype {p.dtype}; "
                f"with a {x.dtype} input the parameters must all have the input's dtype or all "
                "be float32"
            )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization over dim 1 of ``input`` (N, C, *), like torch.nn.functional.batch_norm.

    training: normalize with the batch statistics and, when running_mean/running_var are given,
    update them in place: ``running = (1 - momentum) * running + momentum * batch`` with the
    unbiased batch variance. Otherwise normalize with running_mean/running_var.
    Unlike current torch, ``eps=0`` is accepted in training (the variance must then be nonzero).
    """
    if isinstance(momentum, Tensor) and momentum.numel() == 1:
        momentum = float(momentum)  # torch takes a one-value tensor as its number
    if not isinstance(momentum, numbers.Real):
        raise TypeError(
            f"batch_norm: momentum must be a float, but got {type(momentum).__name__} (the "
            "modules' momentum=None, a cumulative average, has no functional equivalent)"
        )
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                num_batches_tracked=None):
    """batch_norm; with num_batches_tracked, the running statistics are a cumulative average
    (momentum=None in the modules), updated without reading the count on the host."""
    if not torch.compiler.is_compiling() and not _func.active():
        # A plain call: checks, the forward and the running-statistics update from C++
        # (csrc/eager.cpp); None: anything else, which the code below handles.
        y = _C.batch_norm_eager(input, running_mean, running_var, weight, bias, training,
                                momentum, eps, num_batches_tracked)
        if y is not None:
            return y
    fn = "batch_norm"
    _check_tensor(fn, input)
    # torch.nn.functional.batch_norm's own checks (the batch size, then eps; shared with the
    # scripted forward), then the op's (dtype, running statistics, shapes).
    _script.check_batch_size_and_eps(input, training, eps)
    _check_input_dtype(fn, input)
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if not training and running_var is None:
        raise RuntimeError("running_var must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if torch.is_grad_enabled():
        for name, r in (("running_mean", running_mean), ("running_var", running_var)):
            if r is not None and r.requires_grad:
                raise RuntimeError(
                    f"batch_norm is not differentiable with respect to {name}: it cannot "
                    "require grad (as torch's native_batch_norm says)"
                )
    if input.dim() < 2:
        if input.numel() == 0:
            # torch returns an empty result for an empty 1-D input; treat it as (0, 0).
            out = _batch_norm(input.reshape(0, 0), running_mean, running_var, weight, bias,
                              training, momentum, eps, num_batches_tracked)
            return out.reshape(input.shape)
        raise ValueError(
            f"batch_norm: expected an input of shape (N, C, *) with at least 2 dims, but got "
            f"shape {tuple(input.shape)}"
        )
    # While torch.jit.trace runs, sizes are 0-d tensors; the ops take ints (the trace keeps them
    # as constants, as it keeps the shapes it saw).
    tracing = torch.jit.is_tracing()
    channels = int(input.shape[1]) if tracing else input.shape[1]
    numel = int(input.numel()) if tracing else input.numel()
    params = (("weight", weight), ("bias", bias), ("running_mean", running_mean),
              ("running_var", running_var))
    for name, p in params:
        _check_param(fn, name, p, input, channels)
    _check_params_agree(fn, input, params)
    count = numel // channels if channels else 0

    if _func.active():  # a torch.func transform: differentiable torch ops (_func.py)
        y, mean, var = _func.batch_norm(
            input, weight, bias, running_mean, running_var, training, eps
        )
    else:
        y, mean, _invstd, var = ops.batch_norm_fwd(
            input, weight, bias, None if training else running_mean,
            None if training else running_var, training, eps,
        )
    if training and running_mean is not None:
        update = (running_mean, running_var, mean, var, momentum, count, num_batches_tracked)
        if _func.active():  # in torch ops, which vmap batches (per-model running statistics)
            _func.update_stats(*update)
            return y
        # Not differentiated. Entering no_grad costs a few us a call, so only where a tensor in
        # the update could be recorded (the kernels' batch statistics never require grad, and
        # running statistics that require grad were refused above where grad mode is on).
        if torch.is_grad_enabled() and mean.requires_grad:
            with torch.no_grad():
                ops.batch_norm_update_stats_(*update)
        else:
            ops.batch_norm_update_stats_(*update)
    return y


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims of ``input``, like
    torch.nn.functional.layer_norm."""
    if not torch.compiler.is_compiling() and not _func.active():
        # A plain call goes straight to the op from C++ (csrc/eager.cpp); None: anything else.
        y = _C.layer_norm_eager(input, normalized_shape, weight, bias, eps)
        if y is not None:
            return y
    fn = "layer_norm"
    _check_input_dtype(fn, input)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if k == 0:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least "
            f"one element, but got normalized_shape = {list(normalized_shape)}"
        )
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != normalized_shape:
        raise RuntimeError(
            f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(str(s) for s in normalized_shape)}], but got input of size "
            f"{list(input.shape)}"
        )
    _check_param(fn, "weight", weight, input, normalized_shape)
    _check_param(fn, "bias", bias, input, normalized_shape)
    _check_params_agree(fn, input, (("weight", weight), ("bias", bias)))
    if _func.active():  # a torch.func transform: differentiable torch ops (_func.py)
        return _func.layer_norm(input, k, weight, bias, eps)
    y, _mean, _rstd = ops.layer_norm_fwd(input, k, weight, bias, eps)
    return y
