"""Drop-in replacements for torch.nn.BatchNorm1d/2d/3d (and their Lazy forms) and torch.nn.LayerNorm.

Each class subclasses its torch.nn counterpart and overrides ``forward`` only, so constructor
arguments, parameters, buffers, ``state_dict``, ``reset_parameters``, ``repr`` and ``isinstance``
checks are torch's own."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx import Proxy

from . import _script
from . import functional as F

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LayerNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "convert",
]


def _fx_leaf(module: nn.Module, input: Proxy) -> Proxy:
    """Under torch.fx.symbolic_trace: ``module`` as a leaf, one call_module node, as torch.nn's
    own modules are (FX's default tracer takes modules from the torch.nn namespace as leaves and
    traces into the others, whose forward here branches on the input). The GraphModule then calls
    the module itself, so it normalizes with the module's train/eval state at the time."""
    tracer = input.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})


class _BatchNormForward:
    """torch.nn.modules.batchnorm._BatchNorm.forward's bookkeeping, on normext.functional."""

    def _step_args(self):
        """Counts a training step, as torch's _BatchNorm.forward does, and returns the arguments
        of functional._batch_norm that follow (input): see _script.step_args."""
        return _script.step_args(
            self.training, self.track_running_stats, self.momentum, self.running_mean,
            self.running_var, self.num_batches_tracked,
        )

    def forward(self, input: Tensor) -> Tensor:
        # (torch.jit.script skips the branches under `not torch.jit.is_scripting()`)
        if not torch.jit.is_scripting():  # noqa: SIM102 (nested: TorchScript skips only this form)
            if isinstance(input, Proxy):
                return _fx_leaf(self, input)
        self._check_input_dim(input)
        running_mean, running_var, training, momentum, cumulative = self._step_args()
        if not torch.jit.is_scripting():
            return F._batch_norm(
                input, running_mean, running_var, self.weight, self.bias, training, momentum,
                self.eps, cumulative,
            )
        # under torch.jit.script: the same, in code that TorchScript compiles (_script.py)
        return _script.batch_norm(
            input, running_mean, running_var, self.weight, self.bias, training, momentum,
            self.eps, cumulative,
        )


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on normext kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on normext kernels: input (N, C, H, W), NCHW or channels_last."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on normext kernels: input (N, C, D, H, W), NCDHW or channels_last_3d."""


class LazyBatchNorm1d(_BatchNormForward, nn.LazyBatchNorm1d):
    """torch.nn.LazyBatchNorm1d on normext kernels: num_features from the first input, then it
    becomes a normext BatchNorm1d."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_BatchNormForward, nn.LazyBatchNorm2d):
    """torch.nn.LazyBatchNorm2d on normext kernels; becomes a normext BatchNorm2d."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_BatchNormForward, nn.LazyBatchNorm3d):
    """torch.nn.LazyBatchNorm3d on normext kernels; becomes a normext BatchNorm3d."""

    cls_to_become = BatchNorm3d


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm on normext kernels: normalizes over the trailing normalized_shape."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # (torch.jit.script skips this branch)
            if isinstance(input, Proxy):
                return _fx_leaf(self, input)
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        # under torch.jit.script: the same, in code that TorchScript compiles (_script.py)
        return _script.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


_REPLACEMENTS = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.LayerNorm: LayerNorm,
    nn.LazyBatchNorm1d: LazyBatchNorm1d,
    nn.LazyBatchNorm2d: LazyBatchNorm2d,
    nn.LazyBatchNorm3d: LazyBatchNorm3d,
}


def convert(model: nn.Module) -> nn.Module:
    """Make every torch.nn.BatchNorm1d/2d/3d, LazyBatchNorm1d/2d/3d and LayerNorm in ``model``
    (exact types, not subclasses) its normext equivalent, in place, and return ``model``.

    The modules keep their identity, parameters, buffers, hooks and train/eval state: only their
    class changes, so optimizers holding the parameters keep working."""
    for module in model.modules():
        new_cls = _REPLACEMENTS.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
    return model
