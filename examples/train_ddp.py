"""Train a small conv net with normext.SyncBatchNorm under DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/train_ddp.py               # CPU processes, gloo
    torchrun --nproc_per_node=2 examples/train_ddp.py --device cuda # one GPU per process, NCCL

The model is written with torch.nn.BatchNorm2d; ``normext.SyncBatchNorm.convert_sync_batchnorm``
turns every BatchNorm into a normext SyncBatchNorm, whose batch statistics are those of the
whole global batch (every process's share together). The data are synthetic: 3x16x16 noise
images whose class (4 classes) is given by the signs of the mean of channels 0 and 1.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import normext


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    m = x[:, :2].mean(dim=(2, 3))
    y = (m[:, 0] > 0).long() + 2 * (m[:, 1] > 0).long()
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts rank 0's)
    model = normext.SyncBatchNorm.convert_sync_batchnorm(make_model()).to(device)
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)

    train, test = make_data(2048, seed=1), make_data(512, seed=2)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    if rank == 0:
        print(
            f"{world} processes on {device.type} ({dist.get_backend()}), "
            f"global batch {world * args.batch_size}, {len(loader)} steps per epoch"
        )

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        total = torch.zeros(2, device=device)  # sum of losses, number of samples
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += torch.stack([loss.detach() * len(y), torch.tensor(len(y), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            # Eval uses the running statistics, identical on every process.
            model.eval()
            with torch.no_grad():
                xt, yt = test.tensors
                acc = (model(xt.to(device)).argmax(1) == yt.to(device)).float().mean().item()
            print(
                f"epoch {epoch}: train loss {(total[0] / total[1]).item():.4f}  "
                f"test accuracy {acc:.3f}"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
