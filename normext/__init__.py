"""normext: hand-written CPU and CUDA kernels for BatchNorm and LayerNorm, as drop-in torch.nn modules."""

import torch  # noqa: F401  (loads libc10/libtorch, which normext._C links against)

from . import _C, functional, ops  # _C and ops register torch.ops.normext.*
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LayerNorm,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    convert,
)
from .sync_batchnorm import SyncBatchNorm

__version__ = "0.1.0"

#: whether the CUDA kernels were compiled into this build
with_cuda: bool = bool(_C.with_cuda)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LayerNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "convert",
    "functional",
    "ops",
    "with_cuda",
]
