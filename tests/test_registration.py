"""The ops' registrations: torch.library.opcheck on every op (schema, fake impl, autograd
registration, AOT dispatch), float64 gradcheck through normext.functional, torch.compile with
fullgraph=True matching eager, and torch's own OpInfo sample inputs for batch_norm/layer_norm."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CUDA_PARAM,
    DTYPES,
    TOL,
    backward_with_seeded_dy,
    compare_sample,
    prefixed,
)

import normext
import normext.functional as NF

ops = torch.ops.normext


# ---- opcheck --------------------------------------------------------------------------------


def _ln_fwd_samples():
    cl = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    return [
        (
            torch.randn(3, 5, 7, requires_grad=True),
            1,
            torch.randn(7, requires_grad=True),
            torch.randn(7, requires_grad=True),
            1e-5,
        ),
        (
            torch.randn(4, 3, 5, dtype=torch.bfloat16, requires_grad=True),
            2,
            torch.randn(3, 5, requires_grad=True),
            None,
            1e-5,
        ),
        (torch.randn(6, 37, dtype=torch.float16, requires_grad=True), 1, None, None, 1e-3),
        (cl.requires_grad_(True), 2, None, torch.randn(4, 5, requires_grad=True), 1e-5),
        (
            torch.randn(8, 3, dtype=torch.float64)[::2],
            1,
            torch.randn(3, dtype=torch.float64),
            None,
            0.0,
        ),
        (torch.randn(0, 4), 1, torch.randn(4), torch.randn(4), 1e-5),
    ]


def _ln_bwd_samples():
    out = []
    for x, k, w, b, eps in _ln_fwd_samples():
        x = x.detach()
        w = None if w is None else w.detach()
        _, mean, rstd = ops.layer_norm_fwd(x, k, w, b.detach() if b is not None else None, eps)
        for mask in ([True, w is not None, True], [False, True, False], [True, False, False]):
            out.append((torch.randn_like(x), x, k, mean, rstd, w, mask))
    return out[::2]


def _bn_fwd_samples():
    cl = torch.randn(4, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    cl3 = torch.randn(2, 3, 4, 2, 3, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d
    )
    rg = lambda t: t.requires_grad_(True)
    return [
        (rg(torch.randn(6, 4, 9)), rg(torch.randn(4)), rg(torch.randn(4)), None, None, True, 1e-5),
        (
            rg(torch.randn(6, 4, 9)),
            rg(torch.randn(4)),
            rg(torch.randn(4)),
            torch.zeros(4),
            torch.ones(4),
            False,
            1e-5,
        ),
        (rg(cl), rg(torch.randn(3)), None, None, None, True, 1e-5),
        (
            rg(cl3),
            rg(torch.randn(3)),
            rg(torch.randn(3)),
            torch.zeros(3),
            torch.ones(3),
            False,
            1e-3,
        ),
        (rg(torch.randn(7, 5, dtype=torch.float16)), None, None, None, None, True, 0.0),
        (
            torch.randn(10, 3, 4, dtype=torch.float64).transpose(0, 2),
            None,
            None,
            None,
            None,
            True,
            1e-5,
        ),
        (torch.randn(0, 3, 2), torch.randn(3), torch.randn(3), None, None, True, 1e-5),
    ]


def _bn_bwd_samples():
    out = []
    for x, w, b, rm, rv, training, eps in _bn_fwd_samples():
        x = x.detach()
        w = None if w is None else w.detach()
        _, mean, invstd, _ = ops.batch_norm_fwd(x, w, None, rm, rv, training, eps)
        for mask in ([True, w is not None, True], [False, True, True], [True, False, False]):
            out.append((torch.randn_like(x), x, w, mean, invstd, training, mask))
    return out[::2]


def _update_samples():
    return [
        (torch.zeros(4), torch.ones(4), torch.randn(4), torch.rand(4), 0.1, 8),
        (
            torch.zeros(3, dtype=torch.float64),
            torch.ones(3, dtype=torch.float64),
            torch.randn(3, dtype=torch.float64),
            torch.rand(3, dtype=torch.float64),
            1.0,
            2,
        ),
        (
            torch.zeros(5, dtype=torch.bfloat16),
            torch.ones(5, dtype=torch.bfloat16),
            torch.randn(5),
            torch.rand(5),
            0.5,
            1,
        ),
        (torch.zeros(2), torch.ones(2), torch.randn(2), torch.rand(2), 0.1, 0),
    ]


OPCHECK_CASES = [
    ("layer_norm_fwd", _ln_fwd_samples),
    ("layer_norm_bwd", _ln_bwd_samples),
    ("batch_norm_fwd", _bn_fwd_samples),
    ("batch_norm_bwd", _bn_bwd_samples),
    ("batch_norm_update_stats_", _update_samples),
]


@pytest.mark.parametrize("op_name,samples", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(op_name, samples):
    op = getattr(ops, op_name).default
    for i, args in enumerate(samples()):
        try:
            torch.library.opcheck(op, args)
        except Exception as e:
            raise AssertionError(f"{op_name} sample {i}: {e}") from e


def test_all_ops_are_checked():
    """Every op in the normext namespace has opcheck samples."""
    assert {name for name, _ in OPCHECK_CASES} == {
        name
        for name in dir(ops)
        if not name.startswith("_")
        and name not in ("name", "__file__")
        and isinstance(getattr(ops, name), torch._ops.OpOverloadPacket)
    }


# ---- gradcheck --------------------------------------------------------------------------------

f64 = {"dtype": torch.float64}


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("normalized_shape", [(5,), (3, 5), (2, 3, 5)], ids=str)
def test_gradcheck_layer_norm(normalized_shape, affine):
    x = torch.randn(4, 2, 3, 5, **f64, requires_grad=True)
    w = torch.randn(normalized_shape, **f64, requires_grad=True) if affine != "none" else None
    b = torch.randn(normalized_shape, **f64, requires_grad=True) if affine == "both" else None
    params = [t for t in (w, b) if t is not None]

    def fn(x, *ps):
        it = iter(ps)
        return NF.layer_norm(
            x,
            normalized_shape,
            next(it) if w is not None else None,
            next(it) if b is not None else None,
            eps=1e-5,
        )

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("mode", ["train", "train-stats", "eval"])
@pytest.mark.parametrize(
    "shape,layout",
    [((6, 3), "contiguous"), ((4, 3, 5), "contiguous"), ((3, 2, 3, 4), "channels_last")],
    ids=str,
)
def test_gradcheck_batch_norm(shape, layout, mode, affine):
    x = torch.randn(shape, **f64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    c = shape[1]
    rm, rv = 0.1 * torch.randn(c, **f64), 0.5 + torch.rand(c, **f64)
    params = [torch.randn(c, **f64, requires_grad=True) for _ in range(2)] if affine else []

    def fn(x, *ps):
        w, b = ps if ps else (None, None)
        if mode == "train":
            return NF.batch_norm(x, None, None, w, b, training=True)
        if mode == "train-stats":  # the running statistics are updated, the output must not care
            return NF.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True)
        return NF.batch_norm(x, rm, rv, w, b, training=False)

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("fn", ["layer_norm", "batch_norm"])
def test_double_backward(fn):
    """The backward ops have autograd formulas: a gradient of a gradient (create_graph=True, a
    gradient penalty) equals torch's, where autograd's fallback would make it silently zero.
    More in test_double_backward.py."""
    x = torch.randn(5, 3, 4, **f64)
    w = torch.randn(4 if fn == "layer_norm" else 3, **f64)

    def call(lib, x, w):
        if fn == "layer_norm":
            return lib.layer_norm(x, (4,), w)
        return lib.batch_norm(x, None, None, w, None, training=True)

    grads = []
    for lib in (F, NF):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(call(lib, xr, wr).pow(3).sum(), xr, create_graph=True)
        g.pow(2).sum().backward()
        grads.append((g, xr.grad, wr.grad))
    for name, ours, theirs in zip(("grad", "x.grad", "weight.grad"), grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, **TOL[torch.float64]["bwd"], msg=prefixed(name))
    assert grads[0][1].abs().max() > 0


# ---- torch.compile ----------------------------------------------------------------------------


def _compare_buffers(ours, theirs, where=""):
    for (name, b), (_, c) in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(b, c, **TOL[torch.float32]["fwd"], msg=prefixed(f"{where}{name}"))


def _compare_modules(ours, theirs, step):
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(
            p.grad, q.grad, **TOL[torch.float32]["bwd"], msg=prefixed(f"step {step}, {name}.grad")
        )
    _compare_buffers(ours, theirs, f"step {step}, ")


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_batch_norm_module(momentum):
    """BatchNorm2d in training (running statistics and num_batches_tracked updated inside the
    compiled graph), then eval, under torch.compile(fullgraph=True): same as eager normext.
    momentum=None (cumulative average) compiles too: the factor 1 / num_batches_tracked is
    computed on the device by the update op, not read on the host."""
    torch._dynamo.reset()
    eager = normext.BatchNorm2d(4, momentum=momentum)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.normal_()
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True)
    for step, training in enumerate([True, True, True, False]):
        eager.train(training)
        module.train(training)
        x = (torch.randn(6, 4, 5, 5) * (step + 1) + step).contiguous(
            memory_format=torch.channels_last
        )
        dy = torch.randn(6, 4, 5, 5)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        y_eager, y_compiled = eager(xs[0]), compiled(xs[1])
        torch.testing.assert_close(y_compiled, y_eager, **TOL[torch.float32]["fwd"])
        assert y_compiled.is_contiguous(memory_format=torch.channels_last)
        for m in (eager, module):
            m.zero_grad()
        y_eager.backward(dy)
        y_compiled.backward(dy)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, **TOL[torch.float32]["bwd"])
        _compare_modules(module, eager, step)
    assert module.num_batches_tracked.item() == 3


@pytest.mark.slow
def test_compile_layer_norm_module():
    torch._dynamo.reset()
    eager = normext.LayerNorm((3, 16))
    with torch.no_grad():
        eager.weight.normal_()
        eager.bias.normal_()
    module = copy.deepcopy(eager)
    compiled = torch.compile(module, fullgraph=True)
    for step in range(2):
        x = torch.randn(5, 3, 16)
        dy = torch.randn(5, 3, 16)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        y_eager, y_compiled = eager(xs[0]), compiled(xs[1])
        torch.testing.assert_close(y_compiled, y_eager, **TOL[torch.float32]["fwd"])
        for m in (eager, module):
            m.zero_grad()
        y_eager.backward(dy)
        y_compiled.backward(dy)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, **TOL[torch.float32]["bwd"])
        _compare_modules(module, eager, step)


def _dynamo_targets(fn, *args):
    """fn's output under torch.compile(fullgraph=True), and the functions its graph calls (what
    the backend is handed: normext's ops appear there unless the functional took another path)."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)(*args), targets


def test_compile_graph_calls_normext_ops():
    """Under torch.compile the functional calls normext's ops, as in eager; the torch-ops math of
    normext/_func.py is for torch.func transforms only. (torch.compile's tracer once made the
    transform check answer yes, and every compiled call ran torch's ops instead of the kernels.)"""
    x = torch.randn(4, 3, 5, 5)
    w, b = torch.randn(3), torch.randn(3)
    bn = normext.BatchNorm2d(3)
    _, targets = _dynamo_targets(bn, x)
    assert any("normext.batch_norm_fwd" in t for t in targets), targets
    assert any("normext.batch_norm_update_stats_" in t for t in targets), targets
    _, targets = _dynamo_targets(lambda x: NF.batch_norm(x, None, None, w, b, True), x)
    assert any("normext.batch_norm_fwd" in t for t in targets), targets
    _, targets = _dynamo_targets(lambda x: NF.layer_norm(x, (5, 5), None, None), x)
    assert any("normext.layer_norm_fwd" in t for t in targets), targets
    assert not any("aten.mean" in t or ".mean" in t for t in targets), targets


@pytest.mark.slow
def test_compile_bfloat16_layer_norm_is_the_kernel():
    """bf16 LayerNorm under torch.compile (Inductor) gives eager's output bit for bit: the same
    kernel runs, and the output is rounded to bfloat16 (fused torch ops would keep float32)."""
    torch._dynamo.reset()
    x = torch.randn(8, 1024, dtype=torch.bfloat16)
    w, b = torch.randn(1024), torch.randn(1024)

    def f(x):
        return NF.layer_norm(x, (1024,), w, b, 1e-5).float() * 3

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=0)


@pytest.mark.slow
def test_compile_of_torch_func_transforms():
    """torch.compile around torch.func.grad and vmap: the transform is seen under the tracer, and
    the functional takes the differentiable torch-ops path there, as in eager."""
    x = torch.randn(4, 16, dtype=torch.float64)
    w, b = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def loss(x):
        return NF.layer_norm(x, (16,), w, b).square().sum()

    expected = torch.func.grad(loss)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(torch.func.grad(loss))(x), expected)
    torch._dynamo.reset()
    rows = torch.compile(torch.vmap(lambda r: NF.layer_norm(r, (16,), w, b)))(x)
    torch.testing.assert_close(rows, NF.layer_norm(x, (16,), w, b))


@pytest.mark.parametrize("kind", ["batch_norm", "layer_norm"])
def test_compile_dynamic_shapes(kind):
    """torch.compile(dynamic=True): the fake kernels work with symbolic shapes, and one compiled
    module serves several input shapes as torch.nn does (outputs, grads, running statistics)."""
    torch._dynamo.reset()
    if kind == "batch_norm":
        ours, theirs = normext.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
        shapes = [(3, 4, 5, 5), (6, 4, 7, 3), (2, 4, 9, 9)]
    else:
        ours, theirs = normext.LayerNorm(8), torch.nn.LayerNorm(8)
        shapes = [(3, 8), (5, 7, 8), (2, 3, 4, 8)]
    compiled = torch.compile(ours, dynamic=True, fullgraph=True, backend="aot_eager")
    for shape in shapes:
        x = torch.randn(shape)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        y, expected = compiled(xs[0]), theirs(xs[1])
        torch.testing.assert_close(y, expected, **TOL[torch.float32]["fwd"])
        dy = torch.randn(shape)
        y.backward(dy)
        expected.backward(dy)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, **TOL[torch.float32]["bwd"])
    _compare_buffers(ours, theirs)


@pytest.mark.parametrize("kind", ["batch_norm", "layer_norm"])
def test_export(kind):
    """torch.export of an eval module: the exported graph calls normext's op and gives torch.nn's
    output."""
    if kind == "batch_norm":
        ours, theirs = normext.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
        x = torch.randn(3, 4, 5, 5)
        with torch.no_grad():
            for m in (ours, theirs):
                m.running_mean.copy_(torch.arange(4.0))
                m.running_var.copy_(torch.arange(1.0, 5.0))
    else:
        ours, theirs = normext.LayerNorm((5, 5)), torch.nn.LayerNorm((5, 5))
        x = torch.randn(3, 4, 5, 5)
    ours.eval()
    theirs.eval()
    program = torch.export.export(ours, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert any(f"normext.{kind}_fwd" in t for t in targets), targets
    x2 = torch.randn_like(x)
    torch.testing.assert_close(program.module()(x2), theirs(x2), **TOL[torch.float32]["fwd"])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["BatchNorm2d", "BatchNorm1d", "LayerNorm"])
def test_jit_trace(kind, training):
    """torch.jit.trace of a module, as of torch.nn's (sizes are tensors while tracing): the traced
    module gives torch.nn's output on new values of the traced shape, and in training updates the
    running statistics as torch.nn's does."""
    shape = {"BatchNorm2d": (3, 4, 5, 5), "BatchNorm1d": (6, 4), "LayerNorm": (3, 4)}[kind]
    ours = getattr(normext, kind)(4).train(training)
    theirs = getattr(torch.nn, kind)(4).train(training)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters()):
            p.copy_(torch.randn_like(p))
            q.copy_(p)
    x = torch.randn(shape)
    traced_ours = torch.jit.trace(ours, (x,), check_trace=False)
    traced_theirs = torch.jit.trace(theirs, (x,), check_trace=False)
    x2 = torch.randn(shape) * 3 + 1
    torch.testing.assert_close(traced_ours(x2), traced_theirs(x2), **TOL[torch.float32]["fwd"])
    _compare_buffers(ours, theirs)


# ---- torch's OpInfo sample inputs -----------------------------------------------------------


@pytest.fixture(scope="module")
def op_db():
    pytest.importorskip("expecttest")  # torch.testing._internal needs it (requirements-dev.txt)
    from torch.testing._internal.common_methods_invocations import op_db

    return op_db


def _clone(v, dtype=None):
    if isinstance(v, torch.Tensor):
        t = v.detach().clone() if dtype is None or not v.is_floating_point() else v.detach().to(dtype)
        return t.requires_grad_(v.requires_grad)
    return v


def _run_sample(fn, sample, dy_seed, dtype=None):
    """fn(input, *args, **kwargs) on fresh copies (floating-point tensors cast to ``dtype`` when
    given), then backward with a fixed random dy when anything requires grad. Returns (output,
    {name: tensor after the call or its grad}) or the exception raised."""
    inp = _clone(sample.input, dtype)
    args = [_clone(a, dtype) for a in sample.args]
    kwargs = {k: _clone(v, dtype) for k, v in sample.kwargs.items()}
    try:
        y = fn(inp, *args, **kwargs)
    except Exception as e:  # noqa: BLE001  (compared with the other implementation's)
        return e, {}
    state = {f"arg{i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    leaves = {
        "input": inp,
        **state,
        **{k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)},
    }
    if y.requires_grad:
        backward_with_seeded_dy(y, dy_seed)
        for name, t in leaves.items():
            if t.grad is not None:
                state[f"{name}.grad"] = t.grad
    return y.detach(), state


def _torch_batch_norm_eps0(*args, **kwargs):
    """torch's batch_norm, but with eps=0 in training (which torch refuses and normext accepts,
    DESIGN.md) replaced by the smallest positive float64, which gives the same result."""
    if kwargs.get("eps", 1e-5) == 0 and kwargs.get("training", False):
        kwargs = {**kwargs, "eps": torch.finfo(torch.float64).tiny}
    return F.batch_norm(*args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])
@pytest.mark.parametrize(
    "name,ours,theirs",
    [
        ("nn.functional.batch_norm", NF.batch_norm, _torch_batch_norm_eps0),
        ("nn.functional.layer_norm", NF.layer_norm, F.layer_norm),
    ],
    ids=["batch_norm", "layer_norm"],
)
def test_opinfo_samples(op_db, name, ours, theirs, device, dtype):
    """normext.functional on every sample input of torch's OpInfo entries for the same function:
    same output, same running-statistics mutation, same grads, and an exception wherever torch
    raises one, on the CPU and CUDA, in every dtype (torch lists float32 and float64; the half
    dtypes run the same samples). torch's own eps rules apply, except that normext's batch_norm
    accepts eps = 0 in training; layer_norm accepts any eps (a sample uses eps=-0.5)."""
    entries = [op for op in op_db if op.name == name]
    assert entries, name
    count = 0
    for op in entries:
        for i, sample in enumerate(op.sample_inputs(device, dtype, requires_grad=True)):
            where = f"{name}{'.' + op.variant_test_name if op.variant_test_name else ''} sample {i}"
            count += compare_sample(
                where,
                dtype,
                _run_sample(theirs, sample, i),
                _run_sample(ours, sample, i),
                lambda sample=sample, i=i: _run_sample(theirs, sample, i, torch.float64),
            )
    assert count >= 5, f"only {count} samples compared"
