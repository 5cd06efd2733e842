"""Kernel-level breakdown (torch.profiler) of BatchNorm training cases on CUDA, normext against
torch: per provider and mode (fwd, fwd+bwd), the host wall time per call and each kernel's time.
The cases are those behind torch on the H100 (README). On a GPU machine, from the repository root
with normext built in place:

    PYTHONPATH=. python scripts/cuda_bn_profile.py
"""

import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from normext import functional as NF

# (shape, dtype, channels_last)
CASES = [
    ((128, 64, 56, 56), torch.float32, True),
    ((128, 256, 28, 28), torch.float32, True),
    ((128, 256, 28, 28), torch.float32, False),
    ((256, 512, 7, 7), torch.float32, False),
    ((256, 512, 7, 7), torch.float32, True),
    ((256, 512, 7, 7), torch.bfloat16, False),
    ((256, 512, 7, 7), torch.bfloat16, True),
]
CALLS = 20


def make_step(fn, shape, dtype, channels_last, backward):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    c = shape[1]
    w = (1 + 0.1 * torch.randn(c, device="cuda", dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(c, device="cuda", dtype=dtype)).requires_grad_()
    rm = torch.zeros(c, device="cuda", dtype=dtype)
    rv = torch.ones(c, device="cuda", dtype=dtype)
    g = torch.randn_like(x)

    def step():
        y = fn(x, rm, rv, w, b, True, 0.1, 1e-5)
        if backward:
            torch.autograd.backward(y, g)

    return step


def kernel_times(step):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            step()
        torch.cuda.synchronize()
    times = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = times.setdefault(e.name[:70], [0, 0.0])
            t[0] += 1
            t[1] += e.device_time_total
    return times


def main():
    for shape, dtype, channels_last in CASES:
        for name, fn in (("normext", NF.batch_norm), ("torch", F.batch_norm)):
            for mode in ("fwd", "full"):
                step = make_step(fn, shape, dtype, channels_last, mode == "full")
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(CALLS):
                    step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) / CALLS * 1e6
                times = kernel_times(step)
                total = sum(v[1] for v in times.values()) / CALLS
                layout = "CL" if channels_last else "NCHW"
                print(
                    f"{shape} {str(dtype)[6:]} {layout} {name} {mode}: "
                    f"wall {wall:.1f} us/call, kernels {total:.1f} us/call"
                )
                for k, (n, us) in sorted(times.items(), key=lambda kv: -kv[1][1]):
                    print(f"    {us / CALLS:8.2f} us x{n / CALLS:.0f}  {k}")


if __name__ == "__main__":
    main()
