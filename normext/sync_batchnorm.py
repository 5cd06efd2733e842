"""SyncBatchNorm on the normext kernels: batch statistics over every process of a
torch.distributed process group, on CPU (gloo) as well as CUDA (NCCL).

Forward (training, world size > 1), per process then across the group:

1. ``batch_norm_fwd(training=True)`` gives this process's mean and biased variance over its
   n_r = numel / C values per channel (an empty batch gives n_r = 0).
2. One ``all_gather`` of the (2C + 1)-element vector [mean, var, n_r], in float64, so unequal batch
   sizes weigh exactly and counts stay exact. Every process then combines the same gathered
   tensor in rank order (Chan's parallel formula, no E[x^2] - E[x]^2 cancellation), so the global
   statistics, and the running statistics updated from them, are bitwise equal on every process:
       n = sum n_r,   mean = sum n_r mean_r / n,   var = sum n_r (var_r + (mean_r - mean)^2) / n.
3. ``batch_norm_fwd(training=False)`` with the global mean / biased variance as the "running"
   statistics normalizes: y = (x - mean) * invstd * weight + bias.
4. ``batch_norm_update_stats_`` updates the running statistics with the global count (the running
   variance gets the unbiased global variance, var * n / (n - 1)).

Backward (DESIGN.md's formula with the group's sums): ``batch_norm_bwd(training=False)`` gives the
per-process sums S1 = sum(dy) (its grad_bias) and S2 = sum(dy * xhat) (its grad_weight); one
``all_reduce`` of [S1, S2] gives the group's sums, and
    dx = weight * invstd * (dy - S1 / n - xhat * S2 / n),   xhat = (x - mean) * invstd,
is an elementwise step in the statistics' dtype. grad_weight / grad_bias are this process's own
contributions (not reduced), as in torch: DistributedDataParallel averages them like any gradient.

Outside training, or without an initialized process group of more than one process, the module
is exactly normext's BatchNorm (normext.functional.batch_norm).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.fx import Proxy

from . import functional as F
from . import ops
from .modules import _BatchNormForward, _fx_leaf

__all__ = ["SyncBatchNorm"]


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) for broadcasting against an (N, C, *) tensor of ndim dims."""
    return t.view(1, -1, *([1] * (ndim - 2)))


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, input, weight, bias, running_mean, running_var, eps, momentum, cumulative, group,
        world_size,
    ):
        channels = input.shape[1]
        local_count = input.numel() // channels
        # Per-process statistics (an empty batch gives mean = var = 0, weighted by count 0).
        _, mean, _, var = ops.batch_norm_fwd(input, None, None, None, None, True, eps)
        local = torch.cat(
            [mean.double(), var.double(), mean.new_full((1,), local_count, dtype=torch.float64)]
        )
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)  # (world_size, 2C + 1), identical on every process

        counts = stats[:, 2 * channels :]  # (world_size, 1)
        total = int(counts.sum().item())  # the one host sync (torch's SyncBatchNorm has one too)
        if total == 1:
            # Every process sees the same total, so every process raises (none is left waiting
            # in a collective).
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel "
                f"over the process group (this process's input size {list(input.shape)})"
            )
        if total == 0:  # every batch in the group is empty: nothing to normalize or track
            mean_g = torch.zeros(channels, dtype=torch.float64, device=input.device)
            var_g = torch.zeros_like(mean_g)
        else:
            means, vars_ = stats[:, :channels], stats[:, channels : 2 * channels]
            mean_g = (counts * means).sum(0) / total
            var_g = (counts * (vars_ + (means - mean_g) ** 2)).sum(0) / total

        if running_mean is not None:
            ops.batch_norm_update_stats_(
                running_mean, running_var, mean_g, var_g, momentum, total, cumulative
            )

        acc = mean.dtype  # float32 for float16/bfloat16/float32 inputs, float64 for float64
        y, save_mean, save_invstd, _ = ops.batch_norm_fwd(
            input, weight, bias, mean_g.to(acc), var_g.to(acc), False, eps
        )
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        ctx.total = total
        ctx.group = group
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        dy = grad_output.to(input.dtype)
        # Eval-mode backward with the global statistics: grad_bias = sum(dy) and
        # grad_weight = sum(dy * xhat) over this process's values.
        _, sum_dy_xhat, sum_dy = ops.batch_norm_bwd(
            dy, input, weight, mean, invstd, False, [False, True, True]
        )

        grad_input = None
        if need_input:  # the same on every process, so they all take part in the all_reduce
            sums = torch.stack([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            if input.numel() > 0:
                n = float(ctx.total)
                scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
                nd = input.dim()
                # dx = scale * dy - scale * S1 / n - (x - mean) * scale * invstd * S2 / n, evaluated
                # in the statistics' dtype, with (x - mean) kept explicit (no cancellation at large
                # offsets), and written in x's memory format.
                t = input - _channel_view(mean, nd)
                coef_xmu = _channel_view(-scale * invstd * sums[1] / n, nd)
                torch.addcmul(_channel_view(-scale * sums[0] / n, nd), t, coef_xmu, out=t)
                t.addcmul_(dy, _channel_view(scale, nd))
                grad_input = t.to(input.dtype)
            else:
                grad_input = torch.empty_like(input)

        # This process's own contributions; zeros (not None) for an empty batch so that
        # DistributedDataParallel sees a gradient for every parameter on every process.
        grad_weight = (
            sum_dy_xhat.to(ctx.weight_dtype) if weight is not None and need_weight else None
        )
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(_BatchNormForward, nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on normext kernels, for CPU (gloo) and CUDA (NCCL) process groups.

    Same constructor, parameters and buffers as torch.nn.SyncBatchNorm; takes (N, C, *) inputs
    (BatchNorm1d/2d/3d shapes). In training with an initialized process group of more than one
    process, the batch statistics are those of the concatenation of every process's batch
    (batches may differ in size, or be empty); otherwise the module is normext's BatchNorm.

    Importing normext lets DistributedDataParallel wrap CPU models that hold this module (it
    refuses torch's own SyncBatchNorm on CPU); see ``_allow_on_cpu_in_ddp``."""

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Proxy):
            return _fx_leaf(self, input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        running_mean, running_var, bn_training, factor, cumulative = self._step_args()

        # As torch: statistics are synchronized in training only (never in eval mode).
        group, world_size = None, 1
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group if self.process_group is not None else dist.group.WORLD
            world_size = dist.get_world_size(group)
        if world_size <= 1:
            return F._batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                factor,
                self.eps,
                cumulative,
            )
        return _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            self.eps,
            factor,
            cumulative,
            group,
            world_size,
        )

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group: Any | None = None
    ) -> nn.Module:
        """Return ``module`` with every BatchNorm layer (torch's or normext's BatchNorm1d/2d/3d,
        or a SyncBatchNorm) replaced by a normext SyncBatchNorm over ``process_group`` (None: the
        whole world), sharing its parameters and buffers and keeping its train/eval flag. As in
        torch, a BatchNorm ``module`` itself is returned as a new module; containers are changed
        in place."""
        module_output = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # bias=False exists only in newer torch (BatchNorm without a bias): passed only then
            no_bias = {"bias": False} if module.affine and module.bias is None else {}
            module_output = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                **no_bias,
            )
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module_output


def _allow_on_cpu_in_ddp() -> None:
    """Let DistributedDataParallel wrap CPU models that hold normext SyncBatchNorm layers.

    DistributedDataParallel refuses any ``torch.nn.SyncBatchNorm`` instance (subclasses included)
    in a CPU model ("SyncBatchNorm layers only work with GPU modules"), because torch's own
    implementation is GPU-only. normext's works on CPU, so this wraps that check to skip it when
    every SyncBatchNorm in the model is normext's; a model with a torch SyncBatchNorm is still
    checked (and refused on CPU) exactly as before."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    check = getattr(DDP, "_passing_sync_batchnorm_handle", None)
    if check is None or getattr(check, "_normext_wrapped", False):
        return

    def _passing_sync_batchnorm_handle(self, module):
        if any(
            isinstance(m, nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm)
            for m in module.modules()
        ):
            return check(self, module)
        return None

    _passing_sync_batchnorm_handle._normext_wrapped = True
    DDP._passing_sync_batchnorm_handle = _passing_sync_batchnorm_handle


if dist.is_available():
    _allow_on_cpu_in_ddp()
