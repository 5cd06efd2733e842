"""BatchNorm in training mode (batch statistics, running statistics updated with momentum):
normext vs torch eager (and optionally torch.compile), forward / backward / full, with weight
and bias. 4-D shapes are BatchNorm2d (NCHW and channels_last), 2-D shapes BatchNorm1d (N, C).

    python benchmarks/bench_batch_norm.py [--device cuda] [--layouts channels_last] [--quick]
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F

from normext import functional as NF

# ResNet-like activations, then BatchNorm1d (N, C).
SHAPES = {
    "cpu": "32x64x56x56,32x256x14x14,32x512x7x7,4096x1024,256x8192",
    "cuda": "128x64x56x56,128x256x28x28,256x512x7x7,64x64x112x112,32768x1024,4096x8192",
}
LAYOUTS = ("nchw", "channels_last")
MOMENTUM, EPS = 0.1, 1e-5


def _batch_norm(provider: str):
    if provider == "normext":
        return NF.batch_norm
    if provider == "torch":
        return F.batch_norm
    return torch.compile(F.batch_norm, dynamic=False)


def setup(case: common.Case, provider: str, device: torch.device):
    dtype = common.DTYPES[case.dtype]
    c = case.shape[1]
    x = torch.randn(case.shape, device=device, dtype=dtype)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (1 + 0.1 * torch.randn(c, device=device, dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(c, device=device, dtype=dtype)).requires_grad_()
    running_mean = torch.zeros(c, device=device, dtype=dtype)
    running_var = torch.ones(c, device=device, dtype=dtype)
    fn = _batch_norm(provider)
    return (lambda: fn(x, running_mean, running_var, w, b, True, MOMENTUM, EPS)), [x, w, b]


def main(argv: list[str] | None = None) -> list[dict]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of nchw,channels_last")
    args = p.parse_args(argv)
    common.check_args(args)
    if bad := [lay for lay in common.split(args.layouts) if lay not in LAYOUTS]:
        raise SystemExit(f"unknown layout: {', '.join(bad)}")
    shapes = common.parse_shapes(args.shapes or SHAPES[args.device])
    if args.quick and not args.shapes:
        shapes = shapes[:1]
    cases = []
    for shape in shapes:
        # channels_last applies to 4-D inputs only; (N, C) and (N, C, L) are plain contiguous.
        layouts = common.split(args.layouts) if len(shape) == 4 else ["contiguous"]
        cases += [common.Case(shape, d, lay) for lay in layouts for d in common.split(args.dtype)]
    return common.run("batch_norm", cases, setup, args)


if __name__ == "__main__":
    main()
