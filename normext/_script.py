"""The modules' forward under torch.jit.script.

torch.nn's BatchNorm and LayerNorm modules script, so ours do too: under torch.jit.script their
forward takes these functions (modules.py), which TorchScript can compile: the custom ops called
straight (torch.ops.normext.*, registered from C++, with their C++ autograd), the checks that the
ops themselves do not make, and the running-statistics update. In eager mode and under
torch.compile nothing here runs (normext.functional does the same with more on the Python side).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_batch_size_and_eps(input: Tensor, training: bool, eps: float) -> None:
    """torch.nn.functional.batch_norm's own checks, in its order (before the dtype and the
    running statistics): in training, more than one value per channel, counted as N times the
    spatial sizes; then eps, with torch's messages (but eps=0 passes in training, DESIGN.md), a
    NaN eps refused too. For functional._batch_norm and the scripted forward below."""
    if training and input.dim() >= 1:
        per_channel = input.size(0)
        for d in range(2, input.dim()):
            per_channel *= input.size(d)
        if per_channel == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                + str(input.shape)
            )
    if training and eps < 0.0:
        raise ValueError(
            "batch_norm eps must be positive during training, but got "
            + str(eps)
            + " (normext also accepts 0)"
        )
    if not eps >= 0.0:  # NaN too
        raise ValueError("batch_norm eps must be non-negative, but got " + str(eps))


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """functional._batch_norm: normalize, and in training update the running statistics
    (a cumulative average where num_batches_tracked is given). The checks that the op does not
    make are here; the op makes the others (shapes, dtypes, devices)."""
    check_batch_size_and_eps(input, training, eps)
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if not training and running_var is None:
        raise RuntimeError("running_var must be defined in evaluation mode")
    if input.dim() < 2:
        raise ValueError(
            "batch_norm: expected an input of shape (N, C, *) with at least 2 dims, but got "
            "shape " + str(input.shape)
        )
    channels = input.size(1)
    count = input.numel() // channels if channels > 0 else 0
    if not training:
        return torch.ops.normext.batch_norm_fwd(
            input, weight, bias, running_mean, running_var, False, eps
        )[0]
    y, mean, _invstd, var = torch.ops.normext.batch_norm_fwd(
        input, weight, bias, None, None, True, eps
    )
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            torch.ops.normext.batch_norm_update_stats_(
                running_mean, running_var, mean, var, momentum, count, num_batches_tracked
            )
    return y


def step_args(
    training: bool,
    track_running_stats: bool,
    momentum: float | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, bool, float, Tensor | None]:
    """torch.nn's _BatchNorm.forward bookkeeping, for the modules in eager mode and scripted:
    counts a training step (num_batches_tracked) and returns the arguments of batch_norm that
    follow (input, ...): running_mean, running_var (None where the batch's statistics are neither
    used nor kept), training (batch statistics), momentum, and num_batches_tracked where the
    running statistics are a cumulative average (momentum None), else None."""
    factor = 0.0
    if momentum is not None:
        factor = momentum
    cumulative: Tensor | None = None
    if training and track_running_stats and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average: factor 1 / num_batches_tracked
            cumulative = num_batches_tracked
    # Batch statistics in training, and in eval when no running statistics are kept.
    bn_training = training or (running_mean is None and running_var is None)
    if training and not track_running_stats:
        running_mean = None
        running_var = None
    return running_mean, running_var, bn_training, factor, cumulative


def layer_norm(
    input: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """functional.layer_norm: the shape check, then the op."""
    k = len(normalized_shape)
    if k == 0:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least "
            "one element, but got normalized_shape = " + str(normalized_shape)
        )
    if input.dim() < k or input.shape[input.dim() - k :] != normalized_shape:
        raise RuntimeError(
            "Given normalized_shape=" + str(normalized_shape) + ", expected input with shape "
            "[*, " + ", ".join([str(s) for s in normalized_shape]) + "], but got input of size "
            + str(input.shape)
        )
    return torch.ops.normext.layer_norm_fwd(input, k, weight, bias, eps)[0]
