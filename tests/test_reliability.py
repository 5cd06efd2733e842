"""normext under stress: NaN/Inf through forward and backward, calls from several Python threads
at once, thousands of calls without memory growth, memory kept proportional to the input (no
per-plane or per-row scratch that dwarfs it), and tensors with more than 2^31 elements (64-bit
indexing end to end; NORMEXT_TEST_LARGE=1, about 13 GB of memory).

The random-input version of the NaN/Inf checks is in test_property.py."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, check, compare_runs, forward_backward, make_input, prefixed
from torch import nn

import normext
import normext.functional as NF

ops = torch.ops.normext


def assert_same_nonfinite(name, actual, expected):
    """NaN exactly where torch has NaN, +Inf and -Inf exactly where torch has them."""
    for what, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        torch.testing.assert_close(f(actual), f(expected), msg=prefixed(f"{name} {what}"))


# ---- NaN and Inf through backward ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_batch_norm_nonfinite_backward(layout, training, bad, dtype):
    """One NaN/Inf in channel 1: the output, the input/weight/bias grads and the running
    statistics are NaN/Inf exactly where torch's are (the whole channel in training; in eval the
    output keeps the value's own position, and the weight grad goes NaN/Inf), and the other
    channels match torch."""
    shape = (4, 3, 5, 7)
    base, view = make_input(shape, dtype, layout)
    with torch.no_grad():
        view(base)[2, 1, 3, 4] = bad
    c = shape[1]
    w, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    stats = ((0.1 * torch.randn(c)).to(dtype), (0.5 + torch.rand(c)).to(dtype))
    dy = torch.randn(shape, dtype=dtype)

    def fn(impl):
        return lambda x, w, b, rm, rv: impl(x, rm, rv, w, b, training, 0.1, 1e-5)

    ours = forward_backward(fn(NF.batch_norm), base, view, dy, (w, b), stats)
    theirs = forward_backward(fn(F.batch_norm), base, view, dy, (w, b), stats)
    names = ["output", "input grad", "weight grad", "bias grad", "running_mean", "running_var"]
    flat = lambda r: [r[0], r[1], *r[2], *r[3]]
    for name, a, e in zip(names, flat(ours), flat(theirs)):
        assert_same_nonfinite(name, a, e)
    assert not torch.isfinite(ours[2][0][1]), "the poisoned channel's weight grad is not finite"
    ref = forward_backward(fn(F.batch_norm), base, view, dy, (w, b), stats, dtype=torch.float64)
    keep = [0, 2]
    if layout == "contiguous":
        check(
            "input grad, clean channels",
            ours[1][:, keep],
            theirs[1][:, keep],
            None if dtype == torch.float64 else ref[1][:, keep],
            dtype,
            "bwd",
        )
    check(
        "output, clean channels",
        ours[0][:, keep],
        theirs[0][:, keep],
        None if dtype == torch.float64 else ref[0][:, keep],
        dtype,
        "fwd",
    )
    for i, name in enumerate(["weight grad", "bias grad"]):
        check(
            f"{name}, clean channels",
            ours[2][i][keep],
            theirs[2][i][keep],
            None if dtype == torch.float64 else ref[2][i][keep],
            dtype,
            "bwd",
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("shape,normalized_shape", [((4, 37), (37,)), ((3, 4, 5, 6), (5, 6))])
def test_layer_norm_nonfinite_backward(shape, normalized_shape, affine, bad, dtype):
    """One NaN/Inf in a row: that row's output and input grad are NaN exactly where torch's are,
    the weight grad (which sums over rows) is NaN where torch's is, the bias grad stays finite
    (dy is finite), and the other rows match torch."""
    base, view = make_input(shape, dtype)
    idx = tuple(s // 2 for s in shape)
    with torch.no_grad():
        base[idx] = bad
    w = torch.randn(normalized_shape, dtype=dtype) if affine != "none" else None
    b = torch.randn(normalized_shape, dtype=dtype) if affine == "both" else None
    dy = torch.randn(shape, dtype=dtype)

    def fn(impl):
        return lambda x, w, b: impl(x, normalized_shape, w, b, 1e-5)

    ours = forward_backward(fn(NF.layer_norm), base, view, dy, (w, b))
    theirs = forward_backward(fn(F.layer_norm), base, view, dy, (w, b))
    names = ["output", "input grad", "weight grad", "bias grad"]
    for name, a, e in zip(names, [ours[0], ours[1], *ours[2]], [theirs[0], theirs[1], *theirs[2]]):
        if a is None:
            assert e is None, name
            continue
        assert_same_nonfinite(name, a, e)
    n = 1
    for s in normalized_shape:
        n *= s
    rows = lambda t: t.reshape(-1, n)
    bad_row = torch.isfinite(rows(view(base))).all(dim=1).logical_not().nonzero().flatten()
    assert bad_row.numel() == 1
    assert torch.isnan(rows(ours[0])[bad_row]).all() and torch.isnan(rows(ours[1])[bad_row]).all()
    if b is not None:
        assert torch.isfinite(ours[2][1]).all()
    ref = forward_backward(fn(F.layer_norm), base, view, dy, (w, b), dtype=torch.float64)
    clean = [r for r in range(rows(view(base)).shape[0]) if r != bad_row.item()]
    for i, name in ((0, "output"), (1, "input grad")):
        kind = "fwd" if i == 0 else "bwd"
        check(
            f"{name}, clean rows",
            rows(ours[i])[clean],
            rows(theirs[i])[clean],
            None if dtype == torch.float64 else rows(ref[i])[clean],
            dtype,
            kind,
        )


# ---- several Python threads at once --------------------------------------------------------------

THREAD_CASES = [
    # (module factory, input shape, dtype, layout, training)
    (lambda: normext.BatchNorm2d(8), (4, 8, 9, 9), torch.float32, "channels_last", True),
    (lambda: normext.BatchNorm2d(5), (3, 5, 7, 11), torch.float32, "contiguous", True),
    (lambda: normext.BatchNorm1d(70, momentum=None), (16, 70), torch.float32, "contiguous", True),
    (lambda: normext.BatchNorm1d(6), (5, 6, 33), torch.bfloat16, "transposed", False),
    (lambda: normext.BatchNorm3d(3), (2, 3, 4, 5, 6), torch.float64, "channels_last_3d", True),
    (lambda: normext.BatchNorm1d(100), (3, 100, 5), torch.float32, "contiguous", True),
    (lambda: normext.LayerNorm(37), (6, 37), torch.float32, "contiguous", False),
    (lambda: normext.LayerNorm((5, 64)), (3, 5, 64), torch.float16, "sliced", False),
    (lambda: normext.LayerNorm(1023, bias=False), (9, 1023), torch.float32, "transposed", False),
    (lambda: normext.LayerNorm(4100), (2, 4100), torch.float64, "contiguous", False),
]


def _thread_case(i: int):
    """Case i from scratch (seeded): the module's output, input grad, parameter grads and
    buffers after one forward+backward (twice for a training BatchNorm, so the running statistics
    move)."""
    make, shape, dtype, layout, training = THREAD_CASES[i]
    gen = torch.Generator().manual_seed(1000 + i)
    module = make().to(dtype if dtype != torch.float16 else torch.float32).train(training)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    out = []
    for _ in range(2 if training and isinstance(module, nn.modules.batchnorm._BatchNorm) else 1):
        xr = x.detach().requires_grad_(True)
        module.zero_grad()
        y = module(xr)
        y.backward(dy)
        out = [y.detach(), xr.grad, *[p.grad for p in module.parameters()]]
    return out + [b.clone() for b in module.buffers()]


def _run_threads(n_threads: int, work):
    """Runs work(tid) in n_threads threads started together; re-raises the first failure."""
    barrier = threading.Barrier(n_threads)
    errors = []

    def target(tid):
        try:
            barrier.wait()
            work(tid)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append((tid, e))

    threads = [threading.Thread(target=target, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        tid, e = errors[0]
        raise AssertionError(f"thread {tid} failed ({len(errors)} failures): {e!r}") from e


@pytest.mark.parametrize("n_threads", [4, 8])
def test_concurrent_threads_give_the_serial_results(n_threads):
    """n threads, each running every case (different modules, shapes, dtypes, layouts; forward
    and backward, running-statistics updates) in its own rotation, several rounds: every result
    is bitwise equal to the one computed serially beforehand (results never depend on the thread
    count, DESIGN.md, so concurrent calls must not change them either)."""
    expected = [_thread_case(i) for i in range(len(THREAD_CASES))]
    rounds = 3

    def work(tid):
        for r in range(rounds):
            for k in range(len(THREAD_CASES)):
                i = (tid + k + r) % len(THREAD_CASES)
                got = _thread_case(i)
                for j, (a, e) in enumerate(zip(got, expected[i])):
                    torch.testing.assert_close(
                        a, e, atol=0, rtol=0, msg=prefixed(f"case {i}, result {j}")
                    )

    _run_threads(n_threads, work)


def test_shared_modules_in_eval_from_threads():
    """Serving: one BatchNorm2d (eval) and one LayerNorm shared by 6 threads, each normalizing
    its own batches under no_grad: each thread gets the results a serial call gives."""
    bn = normext.BatchNorm2d(16).eval()
    ln = normext.LayerNorm(96)
    with torch.no_grad():
        for p in [*bn.parameters(), *ln.parameters()]:
            p.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    inputs = [(torch.randn(2 + t, 16, 6, 6), torch.randn(3, 1 + t, 96)) for t in range(6)]
    with torch.no_grad():
        expected = [(bn(a), ln(b)) for a, b in inputs]

    def work(tid):
        a, b = inputs[tid]
        with torch.no_grad():
            for _ in range(30):
                torch.testing.assert_close(bn(a), expected[tid][0], atol=0, rtol=0)
                torch.testing.assert_close(ln(b), expected[tid][1], atol=0, rtol=0)

    _run_threads(6, work)


# ---- no memory growth over many calls ----------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_no_memory_growth_over_many_calls():
    """Thousands of forward+backward calls (1000 steps of BatchNorm train/eval with running
    statistics and momentum=None, LayerNorm, raw ops with several output masks): resident memory after
    them is what it was after a warmup, within a small slack, and no Python objects pile up. Each
    call's tensors are ~100 KB, so a leaked tensor per call would show as 100 MB."""
    bn = normext.BatchNorm2d(16, momentum=None)
    ln = normext.LayerNorm(256)
    x_bn = torch.randn(8, 16, 14, 14, requires_grad=True)  # 100 KB
    x_ln = torch.randn(96, 256, requires_grad=True)  # 96 KB
    x_cl = torch.randn(8, 16, 14, 14).contiguous(memory_format=torch.channels_last)

    def step(i):
        bn.train(i % 3 != 0)
        bn(x_bn).sum().backward()
        ln(x_ln).square().mean().backward()
        y, mean, invstd, _ = ops.batch_norm_fwd(x_cl, None, None, None, None, True, 1e-5)
        ops.batch_norm_bwd(y, x_cl, None, mean, invstd, True, [True, False, False])
        xd = x_ln.detach()
        mean, rstd = ops.layer_norm_fwd(xd, 1, None, None, 1e-5)[1:]
        ops.layer_norm_bwd(
            xd, xd, 1, mean, rstd, None, [[False] * 3, [True] * 3, [False, True, False]][i % 3]
        )
        x_bn.grad = x_ln.grad = None
        bn.zero_grad()
        ln.zero_grad()

    for i in range(200):
        step(i)
    gc.collect()
    objects, rss = len(gc.get_objects()), _rss_bytes()
    calls = 1000
    for i in range(calls):
        step(i)
    gc.collect()
    grown = _rss_bytes() - rss
    assert grown < 16 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MB over {calls} calls"
    assert len(gc.get_objects()) - objects < 200, "Python objects pile up across calls"


# ---- memory proportional to the input ----------------------------------------------------------

PEAK = textwrap.dedent(
    """
    import resource, sys, torch, normext
    ops = torch.ops.normext
    case = sys.argv[1]
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if case == "bn":  # (N, C, 2): N*C planes of 2 values
        x = torch.randn(2**19, 16, 2)
        dy = torch.randn_like(x)
        base = peak()
        y, mean, invstd, _ = ops.batch_norm_fwd(x, None, None, None, None, True, 1e-5)
        del y
        ops.batch_norm_bwd(dy, x, None, mean, invstd, True, [True, True, True])
    else:  # 4 rows of 2^21 + 1: a fused backward would keep 8 row-long sum buffers
        x = torch.randn(4, 2**21 + 1)
        dy = torch.randn_like(x)
        w = torch.randn(2**21 + 1)
        base = peak()
        mean, rstd = ops.layer_norm_fwd(x, 1, w, None, 1e-5)[1:]
        ops.layer_norm_bwd(dy, x, 1, mean, rstd, w, [True, True, True])
    print((peak() - base) / (x.numel() * x.element_size()))
    """
)


@pytest.mark.parametrize("case", ["bn", "ln"])
def test_scratch_memory_is_bounded_by_the_input(case):
    """Peak memory of a forward+backward beyond the input and dy, in units of the input's size:
    one output at a time (y, then dx), LayerNorm's float32 weight/bias grads (0.5 here) and small
    scratch, under 2. BatchNorm over many small planes used to keep 24 bytes of statistics per
    plane (7x in all for a float32 (N, C, 2) input); LayerNorm's backward over a few long rows,
    2 float partial sums per value (3.5x in all)."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK, case], check=True, capture_output=True, text=True
    )
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio < 2, f"{case}: peak scratch memory {ratio:.2f}x the input"


def test_kept_scratch_between_calls_and_threads():
    """Per-channel buffers of 32 KB or more come from a block each thread keeps between calls
    (ScratchArena in vec_utils.h), left as the last call wrote it. Calls of growing and shrinking
    channel counts, one with NaN and Inf in it, on the main thread and on others, each match
    torch.nn.functional (a value read before it is written would show here)."""
    shapes = [(3, 9000), (2, 40000), (5, 4100), (2, 40000), (4, 17000, 2)]

    def run(k):
        g = torch.Generator().manual_seed(k)
        for i, shape in enumerate(shapes):
            x = torch.randn(shape, generator=g) + 2.0
            if i == 1 and k == 0:
                x[0, :7] = float("nan")
                x[1, 7:9] = float("inf")
            c = shape[1]
            w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
            dy = torch.randn(shape, generator=g)
            outs = []
            for fn, dt in ((NF.batch_norm, None), (F.batch_norm, None), (F.batch_norm, "ref")):
                ts = (x, w, b, dy) if dt is None else (x.double(), w.double(), b.double(), dy.double())
                xs, ws, bs = (t.clone().requires_grad_() for t in ts[:3])
                rm, rv = torch.zeros(c, dtype=xs.dtype), torch.ones(c, dtype=xs.dtype)
                y = fn(xs, rm, rv, ws, bs, True)
                outs.append((y, *torch.autograd.grad(y, (xs, ws, bs), ts[3]), rm, rv))
            for i, (name, a, e, r) in enumerate(zip(["y", "dx", "dw", "db", "rm", "rv"], *outs)):
                check(f"{k}, {shape}, {name}", a, e, r, torch.float32, "fwd" if i == 0 else "bwd")

    run(0)
    errors = []

    def thread_run(k):
        try:
            run(k)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=thread_run, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    run(3)


@pytest.mark.parametrize(
    "shape, channels_last",
    [((5,), False), ((5, 2, 2), False), ((3, 4, 4), True), ((40, 2), False)],
    ids=str,
)
def test_empty_batch_after_full_one(shape, channels_last):
    """An empty batch's statistics are zeros (as SyncBatchNorm's empty processes send them), also
    right after a full batch of the same channels has left its own in the kept scratch. The
    regrouped paths (narrow channels-last rows, short planes) once returned the previous call's
    means here."""
    for n in (8, 0):
        x = torch.randn(n, *shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _, mean, _, var = ops.batch_norm_fwd(x, None, None, None, None, True, 1e-5)
    assert torch.equal(mean, torch.zeros(shape[0])), mean
    assert torch.equal(var, torch.zeros(shape[0])), var


FAULTS = textwrap.dedent(
    """
    import resource, torch, normext.functional as NF
    x = torch.randn(2, 32768)
    w, b = torch.rand(32768) + 0.5, torch.randn(32768)
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.no_grad():
        for _ in range(5):
            NF.batch_norm(x, None, None, w, b, True)
        before = faults()
        for _ in range(30):
            y = NF.batch_norm(x, None, None, w, b, True)
        print((faults() - before) / 30)
    """
)


def test_kept_scratch_takes_no_fresh_pages():
    """The kept block does keep: in a fresh process (glibc's heap as a program finds it), repeated
    training forwards of a (2, 32768) float32 input (about 2 MB of per-channel buffers a call)
    fault few pages in: 14 a call here, for the outputs. The first ScratchArena never grew its
    block (it counted only the buffers that came from the block, and an empty block gives none),
    so every buffer came from the heap, whose top glibc handed back to the kernel at each free:
    350 page faults a call in this test, and the raw op 1.08 ms where its kernels take 0.18."""
    pytest.importorskip("resource")
    out = subprocess.run([sys.executable, "-c", FAULTS], check=True, capture_output=True, text=True)
    per_call = float(out.stdout.strip().splitlines()[-1])
    assert per_call < 100, f"{per_call:.0f} page faults a call"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", ["both", "weight", "bias"])
def test_layer_norm_long_rows(affine, dtype):
    """A few rows of 2^21 + 1 values take the unfused weight/bias-grad path (column sums): it
    matches torch like the fused one."""
    shape, norm = (4, 2**21 + 1), (2**21 + 1,)
    base, view = make_input(shape, dtype)
    w = torch.randn(norm, dtype=dtype) if affine in ("both", "weight") else None
    b = torch.randn(norm, dtype=dtype) if affine in ("both", "bias") else None
    dy = torch.randn(shape, dtype=dtype)

    def fn(impl):
        return lambda x, w, b: impl(
            x, norm, w if w is not None or impl is NF.layer_norm else torch.ones_like(b), b, 1e-5
        )

    ours = forward_backward(fn(NF.layer_norm), base, view, dy, (w, b))
    theirs = forward_backward(fn(F.layer_norm), base, view, dy, (w, b))
    ref = forward_backward(fn(F.layer_norm), base, view, dy, (w, b), dtype=torch.float64)
    compare_runs(ours, theirs, None if dtype == torch.float64 else ref, dtype)


@pytest.mark.parametrize("shape", [(3, 64, 5), (4, 100, 2), (2, 65, 3, 3), (5, 63, 7)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_planar_many_channels(shape, training):
    """Planar inputs with C around kTasks (64): whole channels per thread (C >= 64) or ranges of
    planes (C < 64) give torch's results."""
    base, view = make_input(shape, torch.float32)
    c = shape[1]
    w, b = torch.randn(c), torch.randn(c)
    stats = (0.1 * torch.randn(c), 0.5 + torch.rand(c))
    dy = torch.randn(shape)

    def fn(impl):
        return lambda x, w, b, rm, rv: impl(x, rm, rv, w, b, training, 0.1, 1e-5)

    ours = forward_backward(fn(NF.batch_norm), base, view, dy, (w, b), stats)
    theirs = forward_backward(fn(F.batch_norm), base, view, dy, (w, b), stats)
    ref = forward_backward(fn(F.batch_norm), base, view, dy, (w, b), stats, dtype=torch.float64)
    compare_runs(ours, theirs, ref, torch.float32)


def test_layer_norm_backward_with_nothing_asked():
    """layer_norm_bwd with output_mask all False returns three empty tensors (it used to write
    dx through a null pointer)."""
    x = torch.randn(4, 3, 5)
    _, mean, rstd = ops.layer_norm_fwd(x, 1, None, None, 1e-5)
    for mask in ([False, False, False], [False, True, False], [False, False, True]):
        dx, dw, db = ops.layer_norm_bwd(torch.randn_like(x), x, 1, mean, rstd, None, mask)
        assert dx.numel() == 0
        assert dw.numel() == (5 if mask[1] else 0) and db.numel() == (5 if mask[2] else 0)


# ---- more than 2^31 elements -----------------------------------------------------------------

LARGE = os.environ.get("NORMEXT_TEST_LARGE", "0") == "1"


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _needs_memory(gib: float):
    if _mem_available() < gib * 2**30:
        pytest.skip(f"needs about {gib} GiB of free memory")


large = pytest.mark.skipif(not LARGE, reason="set NORMEXT_TEST_LARGE=1 (needs ~14 GiB, minutes)")

# Values with exactly known statistics and gradients: along the normalized dim, position k of x
# holds (k % 7) - 3 (plus the group's offset) and dy holds (k % 5) - 2, LayerNorm's weight
# (k % 3) + 1, over a length that is a multiple of 105. Each group then has mean = offset and
# var = 4 exactly, and as the periods are coprime mean(g) = mean(g * xhat) = 0 for g = weight * dy,
# so dx = rstd * weight * dy, dweight = sum over groups of dy * xhat and dbias = sum of dy, with
# xhat = ((k % 7) - 3) * rstd and rstd = 1 / sqrt(4 + eps). Values are checked chunk by chunk,
# to the last element, with small temporaries.
PERIOD = 105
EPS = 1e-5
RSTD = (4 + EPS) ** -0.5
CHUNK = 2**24


def _pat(a: int, b: int, period: int) -> torch.Tensor:
    """Positions a..b-1 of the pattern (k % period) - (period - 1) / 2, in float32."""
    return (torch.arange(a, b) % period).float() - (period - 1) / 2


def _xhat(a, b):
    return _pat(a, b, 7) * RSTD


def _dy(a, b):
    return _pat(a, b, 5)


def _weight(a, b):
    return _pat(a, b, 3) + 2


def _fill(t: torch.Tensor, fn, offset: float = 0.0) -> None:
    """t (1-D, any strides) = fn(a, b) + offset, a chunk at a time."""
    for a in range(0, t.numel(), CHUNK):
        b = min(t.numel(), a + CHUNK)
        t[a:b].copy_(fn(a, b) + offset)


def _check(name: str, t: torch.Tensor, fn, atol: float) -> None:
    """t (1-D, any strides) against fn(a, b), a chunk at a time."""
    for a in range(0, t.numel(), CHUNK):
        b = min(t.numel(), a + CHUNK)
        torch.testing.assert_close(
            t[a:b].float(), fn(a, b), atol=atol, rtol=0, msg=prefixed(f"{name}[{a}:{b}]")
        )


@large
@pytest.mark.parametrize("layout", ["planar", "channels_last"])
def test_batch_norm_over_2_to_the_31_elements(layout):
    """BatchNorm forward (training) and backward on a bfloat16 (N, C, L) input of just over 2^31
    elements, planar or channels-last ((N, L, C) in memory): the statistics, every output and
    input-grad element, and the weight/bias grads are what the pattern's exact statistics give."""
    _needs_memory(14)
    dtype = torch.bfloat16
    n, c = (2, 3) if layout == "planar" else (1, 3)
    length = PERIOD * (2**31 // (n * c * PERIOD) + 1)
    assert n * c * length > 2**31
    if layout == "planar":
        x, dy = (torch.empty(n, c, length, dtype=dtype) for _ in range(2))
    else:
        x, dy = (torch.empty(n, length, c, dtype=dtype).permute(0, 2, 1) for _ in range(2))
    for i in range(n):
        for ch in range(c):
            _fill(x[i, ch], lambda a, b: _pat(a, b, 7), offset=ch)
            _fill(dy[i, ch], _dy)
    weight = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    y, mean, invstd, var = ops.batch_norm_fwd(x, weight, None, None, None, True, EPS)
    assert y.stride() == x.stride()
    torch.testing.assert_close(mean, torch.arange(c, dtype=torch.float32), atol=1e-6, rtol=0)
    torch.testing.assert_close(var, torch.full((c,), 4.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(invstd, torch.full((c,), RSTD), atol=1e-6, rtol=1e-6)
    for i in range(n):
        for ch in range(c):
            w = weight[ch].item()
            _check(f"y[{i}, {ch}]", y[i, ch], lambda a, b, w=w: _xhat(a, b) * w, 0.02)
    del y
    dx, dw, db = ops.batch_norm_bwd(dy, x, weight, mean, invstd, True, [True, True, True])
    assert dx.stride() == x.stride()
    torch.testing.assert_close(dw, torch.zeros(c), atol=1.0, rtol=0)  # of 7e8-value sums
    torch.testing.assert_close(db, torch.zeros(c), atol=1.0, rtol=0)
    for i in range(n):
        for ch in range(c):
            w = weight[ch].item()
            _check(f"dx[{i}, {ch}]", dx[i, ch], lambda a, b, w=w: _dy(a, b) * RSTD * w, 0.02)


@large
@pytest.mark.parametrize("rows", [32777, 64, 1])
def test_layer_norm_over_2_to_the_31_elements(rows):
    """LayerNorm forward and backward on a bfloat16 input of just over 2^31 elements: 32777 rows
    of 65520 (fused backward), 64 rows of 2^25 (column-sum backward), or one row longer than
    int32 can index (input grad only: its float32 weight/bias grads alone would take 17 GB). The
    statistics, every output and input-grad element, and the weight/bias grads are what the
    pattern's exact statistics give."""
    _needs_memory(14)
    dtype = torch.bfloat16
    n = 65520 if rows == 32777 else PERIOD * (2**31 // (rows * PERIOD) + 1)
    assert rows * n > 2**31 and n % PERIOD == 0
    x, dy = torch.empty(rows, n, dtype=dtype), torch.empty(rows, n, dtype=dtype)
    offsets = torch.arange(rows) % 3
    if n <= CHUNK:
        row = _pat(0, n, 7).to(dtype)
        torch.add(row.expand(rows, n), offsets[:, None].to(dtype), out=x)
        dy.copy_(_dy(0, n).to(dtype).expand(rows, n))
    else:
        for r in range(rows):
            _fill(x[r], lambda a, b: _pat(a, b, 7), offset=offsets[r].item())
            _fill(dy[r], _dy)
    weight = None
    if rows > 1:
        weight = torch.empty(n, dtype=dtype)
        _fill(weight, _weight)
    y, mean, rstd = ops.layer_norm_fwd(x, 1, weight, None, EPS)
    torch.testing.assert_close(mean, offsets.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(rstd, torch.full((rows,), RSTD), atol=1e-6, rtol=1e-6)
    w_fn = _weight if weight is not None else (lambda a, b: 1.0)

    def check_rows(name, t, fn, atol):
        """t (rows, n): every row against fn(a, b) (the same for every row)."""
        if n > CHUNK:
            for r in range(rows):
                _check(f"{name}[{r}]", t[r], fn, atol)
            return
        expected, step = fn(0, n), CHUNK // n
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            torch.testing.assert_close(
                t[r0:r1].float(),
                expected.expand(r1 - r0, n),
                atol=atol,
                rtol=0,
                msg=prefixed(f"{name}[{r0}:{r1}]"),
            )

    check_rows("y", y, lambda a, b: _xhat(a, b) * w_fn(a, b), 0.05)
    del y
    mask = [True, rows > 1, rows > 1]
    dx, dw, db = ops.layer_norm_bwd(dy, x, 1, mean, rstd, weight, mask)
    check_rows("dx", dx, lambda a, b: _dy(a, b) * RSTD * w_fn(a, b), 0.05)
    if rows > 1:
        torch.testing.assert_close(dw, _dy(0, n) * _xhat(0, n) * rows, atol=1e-2, rtol=1e-5)
        torch.testing.assert_close(db, _dy(0, n) * rows, atol=1e-2, rtol=0)


# ---- bad inputs that tests/test_errors.py does not cover ----------------------------------------


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (
            lambda: NF.batch_norm([[1.0, 2.0]], None, None, training=True),
            TypeError,
            r"batch_norm: input must be a Tensor, but got list",
        ),
        (
            lambda: NF.layer_norm((1.0, 2.0), (2,)),
            TypeError,
            r"layer_norm: input must be a Tensor, but got tuple",
        ),
        (
            lambda: NF.batch_norm(
                torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None
            ),
            TypeError,
            r"momentum must be a float, but got NoneType",
        ),
        (
            lambda: NF.batch_norm(torch.randn(4, 3), None, None, training=True, eps=float("nan")),
            ValueError,
            r"eps must be non-negative, but got nan",
        ),
        (
            lambda: normext.BatchNorm1d(3, eps=float("nan"))(torch.randn(4, 3)),
            ValueError,
            r"eps must be non-negative, but got nan",
        ),
        (lambda: normext.BatchNorm2d(3)(torch.randn(2, 3, 4, 4).to_sparse()), Exception, None),
        (lambda: normext.LayerNorm(4)(torch.randn(2, 4).to_sparse()), Exception, None),
    ],
    ids=[
        "bn input list",
        "ln input tuple",
        "bn momentum None",
        "bn eps nan",
        "module eps nan",
        "bn sparse",
        "ln sparse",
    ],
)
def test_more_bad_inputs(call, exc, msg):
    """Non-tensor inputs, a momentum that is not a number (torch raises TypeError too), a NaN eps
    (DESIGN.md: eps must be non-negative for BatchNorm), sparse inputs: a Python exception naming
    the problem, never a crash or a silently wrong result."""
    with pytest.raises(exc, match=msg):
        call()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_zero_channels(training):
    """C = 0: an empty output, as torch gives."""
    x = torch.randn(4, 0, 5)
    stats = (torch.zeros(0), torch.ones(0))
    y = NF.batch_norm(x, *stats, training=training)
    assert y.shape == x.shape
    assert F.batch_norm(x, *stats, training=training).shape == y.shape
