"""normext.SyncBatchNorm.

Multi-process tests spawn one gloo process group per world size (2 and 3 processes on
127.0.0.1, unequal batch sizes, one process with an empty batch) and run every case in it; each
process saves its results, and the tests here compare them with one torch BatchNorm over the
concatenated batch (outputs, input gradients, summed weight/bias gradients, running statistics)
and with single-process training for a DistributedDataParallel step. Spawning costs seconds, so
all multi-process cases share the two spawns.
"""

from __future__ import annotations

import datetime
import inspect
import os
import socket
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normext

# Per dtype: float64 compares the combination of per-process statistics with one pass over the
# whole batch (only rounding differs); float32 adds the kernels' float32 rounding; the bfloat16
# case (float32 parameters) is compared with a float32 computation on the same rounded input, so
# its tolerance is that of bfloat16 outputs. Backward is as tight as forward here: the gradient
# sums are accumulated in double inside the kernels.
TOL = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-9},
    torch.float32: {"rtol": 1e-4, "atol": 2e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}

# Per-process batch sizes: unequal, and in the 3-process group one process has an empty batch
# and one a single sample (allowed: "more than 1 value per channel" holds over the group).
SIZES = {2: [3, 5], 3: [1, 0, 6]}
STEPS = 2  # training steps per case: exercises momentum and the cumulative average


@dataclass(frozen=True)
class Case:
    module: str  # normext/torch class name: BatchNorm1d, BatchNorm2d or BatchNorm3d
    shape: tuple  # (C, *spatial)
    dtype: torch.dtype = torch.float64
    affine: bool = True
    momentum: float | None = 0.1
    track_running_stats: bool = True
    channels_last: bool = False
    input_grad: bool = True
    offset: float = 3.0  # mean of the input (cancellation at large offsets)


CASES = {
    "1d_NC": Case("BatchNorm1d", (5,)),
    "1d_NCL": Case("BatchNorm1d", (4, 7), momentum=None),
    "2d": Case("BatchNorm2d", (3, 5, 4)),
    "2d_channels_last": Case("BatchNorm2d", (6, 3, 5), channels_last=True),
    "2d_no_affine": Case("BatchNorm2d", (3, 4, 4), affine=False),
    "2d_float32_offset": Case("BatchNorm2d", (4, 6, 5), dtype=torch.float32, offset=100.0),
    "2d_bfloat16": Case("BatchNorm2d", (4, 4, 4), dtype=torch.bfloat16),
    "2d_no_running_stats": Case("BatchNorm2d", (3, 3, 3), track_running_stats=False),
    "2d_no_input_grad": Case("BatchNorm2d", (3, 4, 3), input_grad=False),
    "3d": Case("BatchNorm3d", (3, 2, 3, 4), momentum=None),
}


def _param_dtype(case: Case) -> torch.dtype:
    return torch.float32 if case.dtype == torch.bfloat16 else case.dtype


def _data(case: Case, step: int, n: int, seed: int = 0):
    """The whole batch (n samples) of one step and its output gradient, the same in every
    process."""
    g = torch.Generator().manual_seed(1000 * seed + 10 * step + 1)
    shape = (n, *case.shape)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + case.offset).to(case.dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(case.dtype)
    return x, dy


def _init(module: nn.Module, case: Case) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
            module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    return module


def _kwargs(case: Case) -> dict:
    return {
        "num_features": case.shape[0],
        "momentum": case.momentum,
        "affine": case.affine,
        "track_running_stats": case.track_running_stats,
        "dtype": _param_dtype(case),
    }


def _layout(t: torch.Tensor, case: Case) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if case.channels_last else t


def _run_case(module: nn.Module, case: Case, sizes: list[int], rank: int) -> dict:
    """STEPS training steps of ``module`` on this process's slice, then one eval forward."""
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    out = {"steps": []}
    for step in range(STEPS + 1):
        training = step < STEPS
        module.train(training)
        x, dy = _data(case, step, sum(sizes))
        x = _layout(x[lo:hi], case).requires_grad_(case.input_grad and training)
        y = module(x)
        rec = {
            "y": y.detach().clone(),
            "channels_last": y.is_contiguous(memory_format=torch.channels_last),
        }
        if not training:
            rec["x"] = x.detach().clone()
        if training:
            y.backward(_layout(dy[lo:hi], case))
            rec["dx"] = None if x.grad is None else x.grad.clone()
            for name, p in module.named_parameters():
                rec["d" + name] = p.grad.clone()
                p.grad = None
        rec["buffers"] = {k: v.clone() for k, v in module.named_buffers()}
        out["steps"].append(rec)
    return out


def _reference(case: Case, sizes: list[int]) -> dict:
    """torch's BatchNorm over the concatenated batch (bfloat16: float32 math on the rounded
    input)."""
    module = _init(getattr(nn, case.module)(**_kwargs(case)), case)
    ref = {"steps": []}
    for step in range(STEPS + 1):
        training = step < STEPS
        module.train(training)
        x, dy = _data(case, step, sum(sizes))
        if case.dtype == torch.bfloat16:
            x, dy = x.float(), dy.float()
        x = x.requires_grad_(training)
        y = module(x)
        rec = {"y": y.detach().clone()}
        if training:
            y.backward(dy)
            rec["dx"] = x.grad.clone()
            for name, p in module.named_parameters():
                rec["d" + name] = p.grad.clone()
                p.grad = None
        rec["buffers"] = {k: v.clone() for k, v in module.named_buffers()}
        ref["steps"].append(rec)
    return ref


# ---- the conv net of the DistributedDataParallel test ---------------------------------------

DDP_STEPS = 3
DDP_WORLD = 3  # the group with the empty and the single-sample batch


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        normext.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
        nn.BatchNorm1d(4),
    ).double()


def _net_batch(step: int, n: int):
    g = torch.Generator().manual_seed(100 + step)
    return (
        torch.randn(n, 3, 9, 9, generator=g, dtype=torch.float64),
        torch.randn(n, 4, generator=g, dtype=torch.float64),
    )


def _train(model: nn.Module, sizes: list[int], rank: int, world: int) -> dict:
    """DDP_STEPS SGD steps on this process's slice; the loss is scaled so that DDP's gradient
    average over processes is the gradient of the mean squared error over the whole batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lo, hi, total = sum(sizes[:rank]), sum(sizes[: rank + 1]), sum(sizes)
    losses = []
    for step in range(DDP_STEPS):
        x, t = _net_batch(step, total)
        loss = ((model(x[lo:hi]) - t[lo:hi]) ** 2).sum() * (world / total)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() / world)
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {"losses": losses, "state": {k: v.clone() for k, v in module.state_dict().items()}}


# ---- the spawned processes -----------------------------------------------------------------


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    sizes = SIZES[world]
    results = {"cases": {}}
    for name, case in CASES.items():
        module = _init(normext.SyncBatchNorm(**_kwargs(case)), case)
        results["cases"][name] = _run_case(module, case, sizes, rank)

    # A group whose total is one value per channel: every process raises, none hangs.
    one = [1] + [0] * (world - 1)
    x = torch.randn(one[rank], 4)
    try:
        normext.SyncBatchNorm(4)(x)
        results["single_value_error"] = None
    except ValueError as e:
        results["single_value_error"] = str(e)

    # Every batch in the group empty: an empty output, running statistics unchanged.
    m = normext.SyncBatchNorm(4)
    x = torch.randn(0, 4, 3, requires_grad=True)
    y = m(x)
    y.sum().backward()
    results["all_empty"] = (y.shape, x.grad.shape, m.running_mean.clone(), m.running_var.clone())

    # A subgroup of processes 0 and 2 (every process creates it; only members use it).
    if world == 3:
        sub = dist.new_group([0, 2])
        if rank != 1:
            case = CASES["2d"]
            module = _init(normext.SyncBatchNorm(**_kwargs(case), process_group=sub), case)
            results["subgroup"] = _run_case(module, case, [2, 3], rank // 2)

    # DistributedDataParallel (in one group only: building it imports torch._dynamo, seconds).
    if world == DDP_WORLD:
        model = normext.SyncBatchNorm.convert_sync_batchnorm(_net())
        results["ddp"] = _train(nn.parallel.DistributedDataParallel(model), sizes, rank, world)
        try:  # torch's own SyncBatchNorm is still refused in a CPU model
            nn.parallel.DistributedDataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(_net()))
            results["ddp_torch_sync_bn_error"] = None
        except ValueError as e:
            results["ddp_torch_sync_bn_error"] = str(e)

    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SPAWNED: dict[int, list[dict]] = {}


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """group_results(world) -> every process's results; each group is spawned once."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")

    def get(world: int) -> list[dict]:
        if world not in _SPAWNED:
            outdir = str(tmp_path_factory.mktemp(f"world{world}"))
            mp.spawn(_worker, args=(world, _free_port(), outdir), nprocs=world, join=True)
            _SPAWNED[world] = [
                torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)
            ]
        return _SPAWNED[world]

    return get


# ---- multi-process tests -------------------------------------------------------------------


def _check_against_reference(per_rank: list[dict], ref: dict, case: Case) -> None:
    tol = TOL[case.dtype]
    ptol = TOL[_param_dtype(case)] if case.dtype != torch.bfloat16 else TOL[torch.bfloat16]
    for step, r in enumerate(ref["steps"]):
        got = [p["steps"][step] for p in per_rank]
        if step == STEPS and not case.track_running_stats:
            # Eval without running statistics normalizes each process's batch on its own (no
            # synchronization in eval, as in torch).
            local = _init(getattr(nn, case.module)(**_kwargs(case)), case)
            for g in got:
                if g["x"].shape[0] > 0:
                    want = local(g["x"].to(_param_dtype(case)))
                    torch.testing.assert_close(g["y"].to(want.dtype), want, **tol)
            continue
        y = torch.cat([g["y"] for g in got])
        assert y.dtype == case.dtype
        torch.testing.assert_close(
            y.to(r["y"].dtype), r["y"], **tol, msg=lambda m, s=step: f"step {s} y: {m}"
        )
        if case.channels_last:
            assert all(g["channels_last"] for g in got if g["y"].numel() > 0)
        if "dx" in r:
            if case.input_grad:
                dx = torch.cat([g["dx"] for g in got])
                torch.testing.assert_close(
                    dx.to(r["dx"].dtype), r["dx"], **tol, msg=lambda m, s=step: f"step {s} dx: {m}"
                )
            else:
                assert all(g["dx"] is None for g in got)
            for name in ("dweight", "dbias"):
                if name in r:
                    summed = torch.stack([g[name] for g in got]).sum(0)
                    torch.testing.assert_close(
                        summed, r[name], **ptol, msg=lambda m, s=step, n=name: f"step {s} {n}: {m}"
                    )
                else:
                    assert all(name not in g for g in got)
        for k, v in r["buffers"].items():
            for g in got:  # identical on every process
                torch.testing.assert_close(
                    g["buffers"][k], v, **ptol, msg=lambda m, s=step, k=k: f"step {s} {k}: {m}"
                )
            assert all(torch.equal(g["buffers"][k], got[0]["buffers"][k]) for g in got)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", [2, 3])
def test_matches_batchnorm_over_concatenated_batch(group_results, world, name):
    per_rank = group_results(world)
    case = CASES[name]
    _check_against_reference(
        [p["cases"][name] for p in per_rank], _reference(case, SIZES[world]), case
    )


@pytest.mark.parametrize("world", [2, 3])
def test_single_value_per_channel_over_group_raises_everywhere(group_results, world):
    per_rank = group_results(world)
    for p in per_rank:
        assert p["single_value_error"] is not None
        assert "Expected more than 1 value per channel when training" in p["single_value_error"]


@pytest.mark.parametrize("world", [2, 3])
def test_all_batches_empty(group_results, world):
    per_rank = group_results(world)
    for p in per_rank:
        y_shape, dx_shape, running_mean, running_var = p["all_empty"]
        assert y_shape == dx_shape == (0, 4, 3)
        assert torch.equal(running_mean, torch.zeros(4)) and torch.equal(running_var, torch.ones(4))


def test_process_subgroup(group_results):
    per_rank = group_results(3)
    case = CASES["2d"]
    assert "subgroup" not in per_rank[1]
    _check_against_reference(
        [per_rank[0]["subgroup"], per_rank[2]["subgroup"]], _reference(case, [2, 3]), case
    )


def test_ddp_training_matches_single_process(group_results):
    world = DDP_WORLD
    per_rank = group_results(world)
    ref = _train(_net(), [sum(SIZES[world])], 0, 1)
    for p in per_rank:
        for k, v in ref["state"].items():
            torch.testing.assert_close(
                p["ddp"]["state"][k], v, rtol=1e-9, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}"
            )
    losses = torch.tensor([p["ddp"]["losses"] for p in per_rank], dtype=torch.float64).sum(0)
    torch.testing.assert_close(
        losses, torch.tensor(ref["losses"], dtype=losses.dtype), rtol=1e-9, atol=1e-9
    )
    for p in per_rank:
        assert "only work with GPU modules" in p["ddp_torch_sync_bn_error"]


# ---- single-process tests ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["1d_NC", "1d_NCL", "2d", "2d_channels_last", "3d", "2d_no_running_stats"]
)
def test_without_process_group_is_batchnorm(name):
    assert not dist.is_initialized()
    case = CASES[name]
    sync = _init(normext.SyncBatchNorm(**_kwargs(case)), case)
    plain = _init(getattr(normext, case.module)(**_kwargs(case)), case)
    got, want = _run_case(sync, case, [4], 0), _run_case(plain, case, [4], 0)
    for g, w in zip(got["steps"], want["steps"]):  # same kernels, so bitwise equal
        for k in w:
            if isinstance(w[k], dict):
                assert all(torch.equal(g[k][b], w[k][b]) for b in w[k])
            else:
                assert (
                    torch.equal(g[k], w[k]) if isinstance(w[k], torch.Tensor) else g[k] == w[k]
                ), k


def test_world_size_one_is_batchnorm():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        case = CASES["2d"]
        sync = _init(normext.SyncBatchNorm(**_kwargs(case)), case)
        plain = _init(normext.BatchNorm2d(**_kwargs(case)), case)
        got, want = _run_case(sync, case, [4], 0), _run_case(plain, case, [4], 0)
        for g, w in zip(got["steps"], want["steps"]):
            for k in ("y", "dx", "dweight", "dbias"):
                assert k not in w or torch.equal(g[k], w[k]), k
            assert all(torch.equal(g["buffers"][b], w["buffers"][b]) for b in w["buffers"])
    finally:
        dist.destroy_process_group()


def test_sync_path_in_one_process():
    """The synchronized computation itself, run over a one-process group: the same results as
    BatchNorm, and the input's memory format kept for the output and the input gradient."""
    from normext.sync_batchnorm import _SyncBatchNormFunction

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        case = CASES["2d_channels_last"]
        x, dy = _data(case, 0, 6)
        x, dy = _layout(x, case), _layout(dy, case)
        sync = _init(normext.SyncBatchNorm(**_kwargs(case)), case)
        ref = _init(nn.BatchNorm2d(**_kwargs(case)), case)
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = _SyncBatchNormFunction.apply(
            xs,
            sync.weight,
            sync.bias,
            sync.running_mean,
            sync.running_var,
            sync.eps,
            0.1,
            None,
            dist.group.WORLD,
            1,
        )
        y.backward(dy)
        yr = ref(xr)
        yr.backward(dy)
        tol = TOL[case.dtype]
        torch.testing.assert_close(y, yr, **tol)
        torch.testing.assert_close(xs.grad, xr.grad, **tol)
        torch.testing.assert_close(sync.weight.grad, ref.weight.grad, **tol)
        torch.testing.assert_close(sync.bias.grad, ref.bias.grad, **tol)
        torch.testing.assert_close(sync.running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(sync.running_var, ref.running_var, **tol)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert xs.grad.is_contiguous(memory_format=torch.channels_last)
    finally:
        dist.destroy_process_group()


def test_input_checks():
    m = normext.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        m(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        normext.SyncBatchNorm(0)(torch.randn(2, 0))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3))
    m.eval()
    assert m(torch.randn(1, 3)).shape == (1, 3)


# BatchNorm's bias=False (a weight without a bias) is newer than some torch builds (2.11 lacks it).
HAS_BN_BIAS_ARG = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


def test_convert_sync_batchnorm():
    inner = nn.Sequential(nn.BatchNorm3d(2), nn.LayerNorm(4))
    no_bias = {"bias": False} if HAS_BN_BIAS_ARG else {}
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, momentum=None),
        normext.BatchNorm1d(4, affine=False, eps=1e-3),
        nn.BatchNorm2d(4, track_running_stats=False, **no_bias),
        nn.SyncBatchNorm(4),
        inner,
    )
    model[1].eval()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    model[1].num_batches_tracked.fill_(7)
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    group = object()  # stored as given; never used without an initialized process group
    out = normext.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert out is model
    for i in (1, 2, 3, 4):
        assert type(model[i]) is normext.SyncBatchNorm
        assert model[i].process_group is group
    assert type(inner[0]) is normext.SyncBatchNorm
    assert type(inner[1]) is nn.LayerNorm
    assert not model[1].training and model[2].training
    assert model[1].momentum is None and model[2].eps == 1e-3 and not model[2].affine
    assert (model[3].bias is None) == HAS_BN_BIAS_ARG and model[3].running_mean is None
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    assert all(after[k] is v for k, v in before.items())  # the same parameters and buffers
    single = normext.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(5))
    assert type(single) is normext.SyncBatchNorm and single.process_group is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
