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


def empty_cache() -> int:
    """Return the blocks held by normext's CPU output cache to the system; returns the bytes
    released. CPU outputs of 1 MB or more (BatchNorm's and LayerNorm's y and dx) come from freed
    blocks of the same size that normext keeps, so a training loop writes them without page
    faults; at most ``NORMEXT_CPU_CACHE_MB`` megabytes (default 256, 0: no cache) are held.
    CUDA outputs use torch's caching allocator (``torch.cuda.empty_cache()``)."""
    return int(_C.cpu_cache_release())


def cpu_cache_stats() -> dict[str, int]:
    """The CPU output cache: ``cached_bytes`` (freed blocks held), ``limit_bytes``, ``hits``
    (outputs served from a cached block) and ``misses`` (outputs that needed a fresh one)."""
    return dict(_C.cpu_cache_stats())

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
    "cpu_cache_stats",
    "empty_cache",
    "functional",
    "ops",
    "with_cuda",
]
