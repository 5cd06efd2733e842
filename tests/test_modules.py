"""The drop-in modules: same constructor arguments, parameters, buffers, state_dict, repr and
isinstance as torch.nn; LayerNorm module parity; normext.convert on a small conv net."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import (
    CUDA_PARAM,
    DTYPES,
    TOL,
    backward_with_seeded_dy,
    check,
    compare_runs,
    compare_sample,
    forward_backward,
    make_input,
    prefixed,
)
from torch import nn

import normext

BN_CLASSES = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
BN_INPUT = {"BatchNorm1d": (6, 4, 5), "BatchNorm2d": (3, 4, 5, 2), "BatchNorm3d": (2, 4, 3, 2, 3)}

BN_KWARGS = [
    {},
    {"eps": 1e-3, "momentum": None},
    {"momentum": 1.0, "affine": False},
    {"track_running_stats": False},
    {"affine": False, "track_running_stats": False},
    {"dtype": torch.float64},
    {"device": "meta"},
]
LN_ARGS = [
    ((7,), {}),
    ([3, 5], {"eps": 1e-3}),
    ((2, 3, 4), {"elementwise_affine": False}),
    (5, {"bias": False}),
    ((5,), {"dtype": torch.bfloat16}),
    ((5,), {"device": "meta"}),
]


def assert_same_state(ours: nn.Module, theirs: nn.Module, *, values: bool = True) -> None:
    """Same parameter and buffer names, shapes, dtypes, devices, requires_grad (and values)."""
    for kind in ("named_parameters", "named_buffers"):
        a, e = dict(getattr(ours, kind)()), dict(getattr(theirs, kind)())
        assert a.keys() == e.keys(), kind
        for name, t in a.items():
            assert t.shape == e[name].shape, name
            assert t.dtype == e[name].dtype, name
            assert t.device == e[name].device, name
            assert t.requires_grad == e[name].requires_grad, name
            if values and t.device.type != "meta":
                torch.testing.assert_close(t, e[name], atol=0, rtol=0, msg=prefixed(name))


@pytest.mark.parametrize("kwargs", BN_KWARGS, ids=str)
@pytest.mark.parametrize("cls_name", BN_CLASSES)
def test_batch_norm_constructor(cls_name, kwargs):
    ours, theirs = getattr(normext, cls_name)(4, **kwargs), getattr(nn, cls_name)(4, **kwargs)
    assert isinstance(ours, getattr(nn, cls_name)) and isinstance(
        ours, nn.modules.batchnorm._BatchNorm
    )
    assert type(ours).__name__ == cls_name
    assert repr(ours) == repr(theirs)
    assert_same_state(ours, theirs)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr


@pytest.mark.parametrize("args,kwargs", LN_ARGS, ids=str)
def test_layer_norm_constructor(args, kwargs):
    ours, theirs = normext.LayerNorm(args, **kwargs), nn.LayerNorm(args, **kwargs)
    assert isinstance(ours, nn.LayerNorm)
    assert repr(ours) == repr(theirs)
    assert_same_state(ours, theirs)
    for attr in ("normalized_shape", "eps", "elementwise_affine"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    if kwargs.get("bias") is False:
        assert ours.bias is None and ours.weight is not None


@pytest.mark.parametrize("direction", ["torch->normext", "normext->torch"])
@pytest.mark.parametrize("cls_name", BN_CLASSES)
def test_batch_norm_state_dict_interchangeable(cls_name, direction):
    """A state_dict trained in one loads into the other (strict), and both then agree in eval."""
    src_cls, dst_cls = getattr(nn, cls_name), getattr(normext, cls_name)
    if direction == "normext->torch":
        src_cls, dst_cls = dst_cls, src_cls
    src = src_cls(4, momentum=None)
    with torch.no_grad():
        src.weight.uniform_(0.5, 1.5)
        src.bias.normal_()
    for _ in range(3):
        src(torch.randn(BN_INPUT[cls_name]) * 2 + 1)
    dst = dst_cls(4, momentum=None)
    dst.load_state_dict(src.state_dict(), strict=True)
    assert_same_state(dst, src)
    assert dst.num_batches_tracked.item() == 3
    x = torch.randn(BN_INPUT[cls_name])
    torch.testing.assert_close(dst.eval()(x), src.eval()(x))
    # and a checkpoint written with torch.save
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst2 = dst_cls(4, momentum=None)
    dst2.load_state_dict(torch.load(buf, weights_only=True))
    assert_same_state(dst2, src)


def test_batch_norm_old_state_dict_without_num_batches_tracked():
    """torch's own version handling (inherited): an old checkpoint without num_batches_tracked."""
    sd = nn.BatchNorm2d(4).state_dict()
    del sd["num_batches_tracked"]
    m = normext.BatchNorm2d(4)
    m._load_from_state_dict(sd, "", {"version": 1}, True, [], [], [])
    assert m.num_batches_tracked.item() == 0


@pytest.mark.parametrize("direction", ["torch->normext", "normext->torch"])
@pytest.mark.parametrize("args,kwargs", LN_ARGS[:4], ids=str)
def test_layer_norm_state_dict_interchangeable(args, kwargs, direction):
    src_cls, dst_cls = nn.LayerNorm, normext.LayerNorm
    if direction == "normext->torch":
        src_cls, dst_cls = dst_cls, src_cls
    src = src_cls(args, **kwargs)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    dst = dst_cls(args, **kwargs)
    dst.load_state_dict(src.state_dict(), strict=True)
    assert_same_state(dst, src)
    x = torch.randn(3, *src.normalized_shape)
    torch.testing.assert_close(dst(x), src(x))


def test_reset_and_deepcopy():
    m = normext.BatchNorm2d(4)
    m(torch.randn(3, 4, 2, 2) + 5)
    c = copy.deepcopy(m)
    assert type(c) is normext.BatchNorm2d
    assert_same_state(c, m)
    m.reset_running_stats()
    assert_same_state(m, nn.BatchNorm2d(4))
    ln = normext.LayerNorm(5)
    with torch.no_grad():
        ln.weight.normal_()
    ln.reset_parameters()
    assert_same_state(ln, nn.LayerNorm(5))


@pytest.mark.parametrize(
    "dtype,module_dtype",
    [(d, None) for d in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
    ids=str,
)
@pytest.mark.parametrize("args,kwargs", LN_ARGS[:4], ids=str)
def test_layer_norm_module(args, kwargs, dtype, module_dtype):
    """normext.LayerNorm against nn.LayerNorm: output and all grads (float32 modules with half
    inputs included: their grads stay float32)."""
    theirs = nn.LayerNorm(args, **kwargs).to(module_dtype or dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours = normext.LayerNorm(args, **kwargs).to(module_dtype or dtype)
    ours.load_state_dict(theirs.state_dict())
    shape = (4, 3, *theirs.normalized_shape)
    base, view = make_input(shape, dtype)
    dy = torch.randn(shape, dtype=dtype)

    def run(m, dt=None):
        y, gx, _, _ = forward_backward(m, base, view, dy, dtype=dt)
        grads = [p.grad for p in (m.weight, m.bias) if p is not None]
        return y, gx, grads, []

    ref = None
    if dtype != torch.float64:
        ref_module = copy.deepcopy(theirs).double()
        ref = run(ref_module, torch.float64)
    compare_runs(run(ours), run(theirs), ref, dtype)


# ---- convert --------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.bn1 = nn.BatchNorm1d(16, momentum=None)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Sequential(nn.Linear(16, 5), nn.LayerNorm(5, bias=False))

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv(x)))
        x = torch.relu(self.bn1(self.fc(x.flatten(1))))
        return self.head(self.ln(x))


class MyBatchNorm(nn.BatchNorm2d):
    """A user subclass: convert must leave it alone (it swaps exact types only)."""


@pytest.mark.parametrize(
    "kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}], ids=str
)
@pytest.mark.parametrize("kind,shape", [("1d", (6, 5)), ("2d", (3, 5, 4, 4)), ("3d", (2, 5, 3, 3, 3))])
def test_lazy_batch_norm(kind, shape, kwargs):
    """LazyBatchNorm1d/2d/3d: num_features from the first input, then the module becomes normext's
    BatchNorm (as torch's becomes torch's); outputs, grads and state as torch.nn's, in training
    and then eval."""
    ours = getattr(normext, f"LazyBatchNorm{kind}")(**kwargs)
    theirs = getattr(nn, f"LazyBatchNorm{kind}")(**kwargs)
    assert ours.has_uninitialized_params() == theirs.has_uninitialized_params()
    for step, training in enumerate([True, True, False]):
        ours.train(training)
        theirs.train(training)
        x = torch.randn(shape) * (step + 1) + step
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        y, expected = ours(xs[0]), theirs(xs[1])
        assert type(ours) is getattr(normext, f"BatchNorm{kind}")
        torch.testing.assert_close(y, expected, **TOL[torch.float32]["fwd"])
        dy = torch.randn(shape)
        y.backward(dy)
        expected.backward(dy)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, **TOL[torch.float32]["bwd"])
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, **TOL[torch.float32]["fwd"])


def test_convert_lazy_batch_norm():
    """convert() takes a torch LazyBatchNorm2d not yet initialized: it becomes normext's lazy
    module, and on its first input normext's BatchNorm2d."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    normext.convert(model)
    assert type(model[1]) is normext.LazyBatchNorm2d
    model(torch.randn(2, 3, 6, 6))
    assert type(model[1]) is normext.BatchNorm2d
    assert model[1].num_features == 4


def test_convert_conv_net():
    ref = Net()
    model = copy.deepcopy(ref)
    model.bn1.eval()  # a submodule's own train/eval state must survive convert
    ref.bn1.eval()
    identity = {name: id(m) for name, m in model.named_modules()}
    params = {name: p for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    hook_calls = []
    model.ln.register_forward_hook(lambda m, i, o: hook_calls.append(o.shape))

    assert normext.convert(model) is model
    assert type(model.bn2) is normext.BatchNorm2d
    assert type(model.bn1) is normext.BatchNorm1d
    assert type(model.ln) is normext.LayerNorm
    assert type(model.head[1]) is normext.LayerNorm
    assert type(model.conv) is nn.Conv2d and type(model.fc) is nn.Linear
    assert {name: id(m) for name, m in model.named_modules()} == identity
    assert all(p is params[name] for name, p in model.named_parameters())
    assert model.training and model.bn2.training and not model.bn1.training
    assert_same_state(model, ref)
    assert repr(model) == repr(ref)

    for step in range(3):
        x = torch.randn(6, 3, 4, 4)
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            m(x).square().mean().backward()
        torch.testing.assert_close(model(x), ref(x))
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(
                p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=prefixed(f"{name}")
            )
        opt.step()
        opt_ref.step()
    assert len(hook_calls) == 6
    for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-4, msg=prefixed(f"{name}"))
    model.eval()
    ref.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)


def test_convert_leaves_subclasses_and_others_alone():
    model = nn.Sequential(
        MyBatchNorm(3), nn.SyncBatchNorm(3), nn.GroupNorm(1, 3), nn.BatchNorm2d(3)
    )
    normext.convert(model)
    assert type(model[0]) is MyBatchNorm
    assert type(model[1]) is nn.SyncBatchNorm
    assert type(model[2]) is nn.GroupNorm
    assert type(model[3]) is normext.BatchNorm2d
    # converting twice is harmless
    normext.convert(model)
    assert type(model[3]) is normext.BatchNorm2d
    # a bare module can be converted too
    bn = normext.convert(nn.BatchNorm1d(3))
    assert type(bn) is normext.BatchNorm1d




@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])
def test_autocast_matches_torch(device, dtype):
    """Under torch.autocast the converted net computes what torch.nn's does, in the same dtypes:
    on CUDA, LayerNorm is on autocast's float32 list (csrc/autocast.cpp), so its output is float32;
    BatchNorm runs in its input's dtype; on the CPU neither is cast. Gradients too."""
    torch.manual_seed(0)
    ref = Net().to(device)
    model = normext.convert(copy.deepcopy(ref))
    x = torch.randn(6, 3, 4, 4, device=device)
    seen = {}
    for name, net in (("ours", model), ("torch", ref)):
        outs = []
        for m in (net.bn2, net.ln, net.head[1]):
            m.register_forward_hook(lambda m, i, o, outs=outs: outs.append((i[0].dtype, o.dtype)))
        with torch.autocast(device, dtype=dtype):
            y = net(x)
        y.float().square().mean().backward()
        seen[name] = (outs, y.dtype, y, [p.grad for p in net.parameters()])
    ours, theirs = seen["ours"], seen["torch"]
    assert ours[0] == theirs[0]  # each norm's input and output dtypes
    assert ours[1] == theirs[1]
    torch.testing.assert_close(ours[2], theirs[2], atol=2e-2, rtol=2e-2)
    for (name, _), g, h in zip(model.named_parameters(), ours[3], theirs[3]):
        torch.testing.assert_close(g, h, atol=2e-2, rtol=2e-2, msg=prefixed(name))


# ---- torch's own ModuleInfo samples -------------------------------------------------------------

NORM_MODULES = {
    nn.BatchNorm1d: normext.BatchNorm1d,
    nn.BatchNorm2d: normext.BatchNorm2d,
    nn.BatchNorm3d: normext.BatchNorm3d,
    nn.LayerNorm: normext.LayerNorm,
}


@pytest.fixture(scope="module")
def module_db():
    pytest.importorskip("expecttest")  # torch.testing._internal needs it (requirements-dev.txt)
    from torch.testing._internal.common_modules import module_db

    return module_db


def _module_run(module, args, kwargs, dy_seed):
    """module(*args, **kwargs) on fresh leaves, then backward with a fixed random dy. Returns
    (output, {name: buffer after the call, or a grad}) or the exception raised."""
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    try:
        y = module(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  (compared with the other implementation's)
        return e, {}
    state = {f"buffer {k}": v.detach().clone() for k, v in module.named_buffers()}
    if y.requires_grad:
        backward_with_seeded_dy(y, dy_seed)
        leaves = [(f"arg{i}", a) for i, a in enumerate(args)] + list(module.named_parameters())
        state.update({f"{k}.grad": t.grad for k, t in leaves if t.grad is not None})
    return y.detach(), state


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])
def test_moduleinfo_samples(module_db, device, dtype, training):
    """normext's modules on every sample of torch's ModuleInfo entries for BatchNorm1d/2d/3d and
    LayerNorm (built from the same constructor arguments, with torch's module's state): the same
    output, buffers after the call and grads (input and parameters), within the tolerance table
    against a float64 run of torch's module (conftest.check), and an exception wherever torch
    raises one. torch lists float32 and float64 for them; bfloat16 and float16 run the same
    samples, cast."""
    count = 0
    for info in module_db:
        ours_cls = NORM_MODULES.get(info.module_cls)
        if ours_cls is None:
            continue
        samples = info.module_inputs_func(
            info, device=device, dtype=dtype, requires_grad=True, training=training
        )
        for i, sample in enumerate(samples):
            if sample.forward_input is None:
                continue
            where = f"{info.name} sample {i} ({sample.constructor_input.kwargs or ''})"
            ctor, fwd = sample.constructor_input, sample.forward_input
            torch.manual_seed(i)
            theirs = info.module_cls(*ctor.args, **ctor.kwargs).to(device, dtype).train(training)
            ours = ours_cls(*ctor.args, **ctor.kwargs).to(device, dtype).train(training)
            ours.load_state_dict(theirs.state_dict())
            ref = copy.deepcopy(theirs).double()
            args = [a.to(dtype) if a.is_floating_point() else a for a in fwd.args]
            count += compare_sample(
                where,
                dtype,
                _module_run(theirs, args, fwd.kwargs, i),
                _module_run(ours, args, fwd.kwargs, i),
                lambda ref=ref, args=args, fwd=fwd, i=i: _module_run(
                    ref, [a.double() for a in args], fwd.kwargs, i
                ),
            )
    assert count >= 20, f"only {count} samples compared"


# ---- torch.jit.script ------------------------------------------------------------------------
# torch.nn's modules script, so normext's do (normext/_script.py): the scripted module matches
# torch.nn over a train/eval sequence (outputs, grads, buffers), saves and loads, and raises
# where torch's raises.

SCRIPT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _script_steps(ours, theirs, make_x, dtype):
    """Three calls each (train, eval, train): output, input grad and param grads compared with
    conftest.check (half dtypes measured against a float64 copy of torch's module run alongside),
    then the buffers."""
    ref = copy.deepcopy(theirs).double() if dtype != torch.float64 else None
    for train in (True, False, True):
        runs = []
        for m, dt in ((ours, dtype), (theirs, dtype), (ref, torch.float64)):
            if m is None:
                runs.append((None, None, [None] * len(list(theirs.parameters()))))
                continue
            m.train(train)
            if m is ours:
                x, dy = make_x().to(dtype), None
            x_in = x.to(dt).clone().requires_grad_()
            y = m(x_in)
            if dy is None:
                dy = torch.randn_like(y)
            y.backward(dy.to(dt))
            runs.append((y, x_in.grad, [p.grad for p in m.parameters()]))
            m.zero_grad()
        (y, gx, gp), (ye, gxe, gpe), (yr, gxr, gpr) = runs
        check(f"output, train={train}", y, ye, yr, dtype, "fwd")
        check(f"input grad, train={train}", gx, gxe, gxr, dtype, "bwd")
        for i, (g, ge, gr) in enumerate(zip(gp, gpe, gpr)):
            check(f"param {i} grad, train={train}", g, ge, gr, dtype, "bwd")
    for name, b in ours.named_buffers():
        check(name, b, dict(theirs.named_buffers())[name], None, dtype, "fwd")


@pytest.mark.parametrize("dtype", SCRIPT_DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", [k for k in BN_KWARGS if "device" not in k and "dtype" not in k],
                         ids=str)
@pytest.mark.parametrize("cls_name", BN_CLASSES)
def test_batch_norm_script(cls_name, kwargs, dtype):
    torch.manual_seed(0)
    theirs = getattr(nn, cls_name)(4, **kwargs).to(dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours = copy.deepcopy(theirs)
    ours.__class__ = getattr(normext, cls_name)
    scripted = torch.jit.script(ours)
    _script_steps(scripted, theirs, lambda: torch.randn(BN_INPUT[cls_name]), dtype)
    assert "normext" in scripted.code  # the scripted forward calls normext, not torch.nn
    for name, b in ours.named_buffers():  # the scripted module updated the original's buffers
        check(name, b, dict(theirs.named_buffers())[name], None, dtype, "fwd")


@pytest.mark.parametrize("dtype", SCRIPT_DTYPES, ids=str)
@pytest.mark.parametrize("args, kwargs", [a for a in LN_ARGS if "device" not in a[1]
                                          and "dtype" not in a[1]], ids=str)
def test_layer_norm_script(args, kwargs, dtype):
    torch.manual_seed(0)
    theirs = nn.LayerNorm(args, **kwargs).to(dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours = copy.deepcopy(theirs)
    ours.__class__ = normext.LayerNorm
    shape = (3, *theirs.normalized_shape)
    _script_steps(torch.jit.script(ours), theirs, lambda: torch.randn(shape), dtype)


def test_script_save_load_and_errors():
    """A scripted converted net saves and loads (with normext imported, its ops are there), and
    runs as torch's; the scripted modules raise where torch's do."""
    torch.manual_seed(0)
    ref = Net()
    model = normext.convert(copy.deepcopy(ref))
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x = torch.randn(6, 3, 4, 4)
    torch.testing.assert_close(loaded(x), ref(x))
    loaded.eval()
    ref.eval()
    torch.testing.assert_close(loaded(x), ref(x))
    for name, b in loaded.named_buffers():
        torch.testing.assert_close(b, dict(ref.named_buffers())[name], msg=prefixed(name))

    for cls, x, msg in [
        ("BatchNorm2d", torch.randn(1, 4, 1, 1), "Expected more than 1 value per channel"),
        ("BatchNorm2d", torch.randn(2, 4), "expected 4D input"),
        ("BatchNorm2d", torch.randn(2, 3, 4, 4), "3"),
        ("LayerNorm", torch.randn(2, 5), r"normalized_shape=\[4\]"),
    ]:
        with pytest.raises((RuntimeError, torch.jit.Error)):
            torch.jit.script(getattr(nn, cls)(4))(x)
        # a check in the scripted code raises torch.jit.Error, one in an op RuntimeError
        with pytest.raises((RuntimeError, torch.jit.Error), match=msg):
            torch.jit.script(getattr(normext, cls)(4))(x)


# ---- torch.fx -------------------------------------------------------------------------------


def test_fx_symbolic_trace_keeps_modules_as_leaves():
    """torch.fx.symbolic_trace takes torch.nn's modules as leaves (call_module nodes); normext's
    are leaves too (their forward branches on the input, which FX cannot trace into). The
    GraphModule then follows the modules' train/eval state, as torch's does."""
    torch.manual_seed(0)
    ref = Net()
    ref.sync = nn.SyncBatchNorm(5)  # single process: a BatchNorm
    model = normext.convert(copy.deepcopy(ref))
    model.sync = normext.SyncBatchNorm(5)

    def run(m, x):
        return m.sync(m(x).unsqueeze(-1)).squeeze(-1)

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return run(self.inner, x)

    traced, traced_ref = torch.fx.symbolic_trace(Wrap(model)), torch.fx.symbolic_trace(Wrap(ref))
    calls = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"inner.bn2", "inner.bn1", "inner.ln", "inner.head.1", "inner.sync"} <= calls
    for train in (True, False):
        traced.train(train)
        traced_ref.train(train)
        x = torch.randn(6, 3, 4, 4)
        torch.testing.assert_close(traced(x), traced_ref(x), msg=prefixed(f"train={train}"))
    assert_same_state(model, ref, values=False)
    for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, msg=prefixed(name))
