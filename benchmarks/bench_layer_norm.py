"""LayerNorm over the last dim of a (rows, hidden) input: normext vs torch eager (and optionally
torch.compile), forward / backward / full, with weight and bias.

    python benchmarks/bench_layer_norm.py [--device cuda] [--dtype bf16] [--modes fwd] [--quick]
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F

from normext import functional as NF

# CPU: rows chosen so an fp32 input is 12-16 MiB. CUDA: rows 4096..32768, hidden 768..16384.
SHAPES = {
    "cpu": "4096x768,4096x1024,1024x4096,512x8192",
    "cuda": "32768x768,16384x1024,8192x4096,4096x8192,4096x16384",
}
EPS = 1e-5


def _layer_norm(provider: str):
    if provider == "normext":
        return NF.layer_norm
    if provider == "torch":
        return F.layer_norm
    return torch.compile(F.layer_norm, dynamic=False)


def setup(case: common.Case, provider: str, device: torch.device):
    rows, hidden = case.shape
    dtype = common.DTYPES[case.dtype]
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(hidden, device=device, dtype=dtype)).requires_grad_()
    fn = _layer_norm(provider)
    return (lambda: fn(x, (hidden,), w, b, EPS)), [x, w, b]


def main(argv: list[str] | None = None) -> list[dict]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    common.check_args(args)
    shapes = common.parse_shapes(args.shapes or SHAPES[args.device])
    if args.quick and not args.shapes:
        shapes = shapes[:1]
    cases = [common.Case(s, d, "contiguous") for s in shapes for d in common.split(args.dtype)]
    return common.run("layer_norm", cases, setup, args)


if __name__ == "__main__":
    main()
