"""Bad arguments give a Python exception whose message names the problem, never a crash: through
the modules and normext.functional (compared with torch where torch raises too), and through the
raw ops (always RuntimeError). The second device is 'meta' (a GPU is not needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normext
import normext.functional as NF

ops = torch.ops.normext
META = "meta"

# ---- modules ---------------------------------------------------------------------------------

MODULE_ERRORS = [
    # (description, module factory, input factory, exception, message regex)
    (
        "BatchNorm2d rank 3",
        lambda m: m.BatchNorm2d(3),
        lambda: torch.randn(2, 3, 4),
        ValueError,
        r"expected 4D input \(got 3D input\)",
    ),
    (
        "BatchNorm1d rank 4",
        lambda m: m.BatchNorm1d(3),
        lambda: torch.randn(2, 3, 4, 4),
        ValueError,
        r"expected 2D or 3D input \(got 4D input\)",
    ),
    (
        "BatchNorm1d rank 1",
        lambda m: m.BatchNorm1d(3),
        lambda: torch.randn(3),
        ValueError,
        r"expected 2D or 3D input \(got 1D input\)",
    ),
    (
        "BatchNorm3d rank 4",
        lambda m: m.BatchNorm3d(3),
        lambda: torch.randn(2, 3, 4, 4),
        ValueError,
        r"expected 5D input \(got 4D input\)",
    ),
    (
        "BatchNorm2d channels",
        lambda m: m.BatchNorm2d(3),
        lambda: torch.randn(2, 4, 3, 3),
        RuntimeError,
        r"should contain 4 elements not 3",
    ),
    (
        "BatchNorm2d channels eval",
        lambda m: m.BatchNorm2d(3).eval(),
        lambda: torch.randn(2, 4, 3, 3),
        RuntimeError,
        r"should contain 4 elements not 3",
    ),
    (
        "BatchNorm1d channels no affine",
        lambda m: m.BatchNorm1d(3, affine=False),
        lambda: torch.randn(2, 5),
        RuntimeError,
        r"running_mean should contain 5 elements not 3",
    ),
    (
        "LayerNorm shape",
        lambda m: m.LayerNorm(5),
        lambda: torch.randn(2, 4),
        RuntimeError,
        r"Given normalized_shape=\[5\], expected input with shape \[\*, 5\]",
    ),
    (
        "LayerNorm 2-dim shape",
        lambda m: m.LayerNorm([3, 5]),
        lambda: torch.randn(2, 5, 3),
        RuntimeError,
        r"Given normalized_shape=\[3, 5\], expected input with shape \[\*, 3, 5\]",
    ),
    (
        "LayerNorm rank",
        lambda m: m.LayerNorm([2, 3, 5]),
        lambda: torch.randn(3, 5),
        RuntimeError,
        r"Given normalized_shape=\[2, 3, 5\]",
    ),
    (
        "BatchNorm2d float64 into float32",
        lambda m: m.BatchNorm2d(3),
        lambda: torch.randn(2, 3, 2, 2, dtype=torch.float64),
        RuntimeError,
        None,
    ),
    (
        "LayerNorm bfloat16 module, float32 input",
        lambda m: m.LayerNorm(5, dtype=torch.bfloat16),
        lambda: torch.randn(2, 5),
        RuntimeError,
        None,
    ),
    (
        "BatchNorm2d meta input",
        lambda m: m.BatchNorm2d(3),
        lambda: torch.empty(2, 3, 2, 2, device=META),
        RuntimeError,
        None,
    ),
    (
        "LayerNorm meta input",
        lambda m: m.LayerNorm(5),
        lambda: torch.empty(2, 5, device=META),
        RuntimeError,
        None,
    ),
]
# Where torch's message differs, ours must still name the problem.
OUR_MESSAGES = {
    "BatchNorm2d float64 into float32": r"weight has dtype torch.float32 but the input has dtype torch.float64",
    "LayerNorm bfloat16 module, float32 input": r"weight has dtype torch.bfloat16 but the input has dtype torch.float32",
    "BatchNorm2d meta input": r"expected weight on the input's device meta, but it is on cpu",
    "LayerNorm meta input": r"expected weight on the input's device meta, but it is on cpu",
}


@pytest.mark.parametrize("desc,make,inp,exc,msg", MODULE_ERRORS, ids=[e[0] for e in MODULE_ERRORS])
def test_module_errors(desc, make, inp, exc, msg):
    x = inp()
    with pytest.raises(exc):  # torch raises too: same exception type
        make(nn)(x)
    with pytest.raises(exc, match=OUR_MESSAGES.get(desc, msg)):
        make(normext)(x)


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64], ids=str
)
def test_non_floating_input(dtype):
    """Integer, bool and complex inputs: a NotImplementedError naming the dtype, the exception
    torch's kernels raise ("not implemented for 'Long'"); torch.nn.LayerNorm's float32
    parameters make it a RuntimeError there, which NotImplementedError is too."""
    x = torch.ones(4, 3, 5).to(dtype)
    msg = rf"expected a floating-point input .* but got {dtype}"
    for lib in (torch.nn.functional, NF):
        with pytest.raises(NotImplementedError):
            lib.batch_norm(x, None, None, training=True)
        with pytest.raises(NotImplementedError):
            lib.layer_norm(x, (5,))
    with pytest.raises(NotImplementedError, match=msg):
        normext.BatchNorm1d(3)(x)
    with pytest.raises(RuntimeError, match=msg):
        normext.LayerNorm(5)(x)
    with pytest.raises(NotImplementedError, match=msg):
        NF.batch_norm(x, None, None, training=True)
    with pytest.raises(NotImplementedError, match=msg):
        NF.layer_norm(x, (5,))


# ---- functional ------------------------------------------------------------------------------

x43 = lambda: torch.randn(4, 3)
FUNCTIONAL_BN_ERRORS = [
    (
        "weight size",
        {"weight": torch.ones(4)},
        RuntimeError,
        r"weight should contain 3 elements not 4",
    ),
    ("bias size", {"bias": torch.ones(2)}, RuntimeError, r"bias should contain 3 elements not 2"),
    (
        "running_mean size",
        {"running_mean": torch.zeros(4), "running_var": torch.ones(3)},
        RuntimeError,
        r"running_mean should contain 3 elements not 4",
    ),
    (
        "running_var size",
        {"running_mean": torch.zeros(3), "running_var": torch.ones(2)},
        RuntimeError,
        r"running_var should contain 3 elements not 2",
    ),
    (
        "running_var size eval",
        {"running_mean": torch.zeros(3), "running_var": torch.ones(2), "training": False},
        RuntimeError,
        r"running_var should contain 3 elements not 2",
    ),
    (
        "only running_mean",
        {"running_mean": torch.zeros(3)},
        ValueError,
        r"running_mean and running_var must either both be None or neither be None",
    ),
    (
        "eval without statistics",
        {"training": False},
        RuntimeError,
        r"running_mean must be defined in evaluation mode",
    ),
    (
        "weight meta",
        {"weight": torch.ones(3, device=META)},
        RuntimeError,
        r"expected weight on the input's device cpu, but it is on meta",
    ),
    (
        "running stats meta",
        {"running_mean": torch.zeros(3, device=META), "running_var": torch.ones(3, device=META)},
        RuntimeError,
        r"expected running_mean on the input's device cpu, but it is on meta",
    ),
    (
        "weight float64",
        {"weight": torch.ones(3, dtype=torch.float64)},
        RuntimeError,
        r"weight has dtype torch.float64 but the input has dtype torch.float32",
    ),
    (
        "bias float16",
        {"bias": torch.ones(3, dtype=torch.float16)},
        RuntimeError,
        r"bias has dtype torch.float16 but the input has dtype torch.float32",
    ),
    (
        "weight int",
        {"weight": torch.ones(3, dtype=torch.int64)},
        RuntimeError,
        r"weight has dtype torch.int64",
    ),
    (
        "running_var float64",
        {"running_mean": torch.zeros(3), "running_var": torch.ones(3, dtype=torch.float64)},
        RuntimeError,
        r"running_var has dtype torch.float64",
    ),
    ("negative eps", {"eps": -1e-3}, ValueError, r"eps must be positive during training"),
    (
        "negative eps, eval",
        {"eps": -1e-3, "training": False, "running_mean": torch.zeros(3),
         "running_var": torch.ones(3)},
        ValueError,
        r"eps must be non-negative",
    ),
    (
        "one value per channel",
        {"input": torch.randn(1, 3)},
        ValueError,
        r"Expected more than 1 value per channel when training",
    ),
    ("rank 1", {"input": torch.randn(4)}, ValueError, r"at least 2 dims, but got shape \(4,\)"),
    ("rank 0", {"input": torch.randn(())}, ValueError, r"at least 2 dims, but got shape \(\)"),
    (
        "weight not a tensor",
        {"weight": [1.0, 1.0, 1.0]},
        TypeError,
        r"weight must be a Tensor or None",
    ),
]


@pytest.mark.parametrize(
    "desc,kwargs,exc,msg", FUNCTIONAL_BN_ERRORS, ids=[e[0] for e in FUNCTIONAL_BN_ERRORS]
)
def test_functional_batch_norm_errors(desc, kwargs, exc, msg):
    args = {
        "input": x43(),
        "running_mean": None,
        "running_var": None,
        "weight": None,
        "bias": None,
        "training": True,
        "momentum": 0.1,
        "eps": 1e-5,
    }
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        NF.batch_norm(**args)


FUNCTIONAL_LN_ERRORS = [
    (
        "weight shape",
        (3,),
        {"weight": torch.ones(4)},
        r"Expected weight to be of same shape as normalized_shape, but got weight of shape \[4\]",
    ),
    (
        "bias shape",
        (3,),
        {"bias": torch.ones(4)},
        r"Expected bias to be of same shape as normalized_shape",
    ),
    (
        "weight flattened",
        (2, 3),
        {"input": torch.randn(4, 2, 3), "weight": torch.ones(6)},
        r"got weight of shape \[6\] and normalized_shape = \[2, 3\]",
    ),
    (
        "normalized_shape",
        (4,),
        {},
        r"Given normalized_shape=\[4\], expected input with shape \[\*, 4\], but got input of size \[4, 3\]",
    ),
    ("normalized_shape too long", (1, 4, 3), {}, r"Given normalized_shape=\[1, 4, 3\]"),
    ("normalized_shape empty", (), {}, r"Expected normalized_shape to be at least 1-dimensional"),
    (
        "weight meta",
        (3,),
        {"weight": torch.ones(3, device=META)},
        r"expected weight on the input's device cpu, but it is on meta",
    ),
    (
        "weight float64",
        (3,),
        {"weight": torch.ones(3, dtype=torch.float64)},
        r"weight has dtype torch.float64 but the input has dtype torch.float32",
    ),
    (
        "bias bfloat16",
        (3,),
        {"bias": torch.ones(3, dtype=torch.bfloat16)},
        r"bias has dtype torch.bfloat16 but the input has dtype torch.float32",
    ),
    (
        "float64 params, half input",
        (3,),
        {
            "input": torch.randn(4, 3, dtype=torch.float16),
            "weight": torch.ones(3, dtype=torch.float64),
        },
        r"weight has dtype torch.float64 but the input has dtype torch.float16",
    ),
]


@pytest.mark.parametrize(
    "desc,normalized_shape,kwargs,msg",
    FUNCTIONAL_LN_ERRORS,
    ids=[e[0] for e in FUNCTIONAL_LN_ERRORS],
)
def test_functional_layer_norm_errors(desc, normalized_shape, kwargs, msg):
    args = {
        "input": torch.randn(4, 3),
        "normalized_shape": normalized_shape,
        "weight": None,
        "bias": None,
    }
    args.update(kwargs)
    with pytest.raises(RuntimeError):  # torch raises a RuntimeError for each of these too
        F.layer_norm(**args)
    with pytest.raises(RuntimeError, match=msg):
        NF.layer_norm(**args)


def test_errors_leave_running_statistics_alone():
    """A call that fails its checks changes nothing (no half-done update)."""
    m = normext.BatchNorm1d(3)
    with pytest.raises(RuntimeError):
        m(torch.randn(4, 3, dtype=torch.float64))
    torch.testing.assert_close(m.running_mean, torch.zeros(3), atol=0, rtol=0)
    torch.testing.assert_close(m.running_var, torch.ones(3), atol=0, rtol=0)


# ---- raw ops: RuntimeError, never a crash ----------------------------------------------------

_x = lambda: torch.randn(4, 3, 5)
_m = lambda: torch.randn(4, 3)
_r = lambda: torch.rand(4, 3) + 0.5
_c = lambda: torch.rand(3) + 0.5
_meta = lambda *s: torch.empty(s, device=META)
ALL = [True, True, True]

RAW_OP_ERRORS = [
    # layer_norm_fwd(input, normalized_ndim, weight?, bias?, eps)
    (
        "ln_fwd ndim 0",
        lambda: ops.layer_norm_fwd(_x(), 0, None, None, 1e-5),
        r"normalized_ndim must be in \[1, 3\]",
    ),
    (
        "ln_fwd ndim 4",
        lambda: ops.layer_norm_fwd(_x(), 4, None, None, 1e-5),
        r"normalized_ndim must be in \[1, 3\]",
    ),
    ("ln_fwd ndim -1", lambda: ops.layer_norm_fwd(_x(), -1, None, None, 1e-5), r"normalized_ndim"),
    (
        "ln_fwd 0-d input",
        lambda: ops.layer_norm_fwd(torch.tensor(1.0), 1, None, None, 1e-5),
        r"normalized_ndim must be in \[1, 0\]",
    ),
    (
        "ln_fwd int input",
        lambda: ops.layer_norm_fwd(_x().long(), 1, None, None, 1e-5),
        r"expected input of dtype float32",
    ),
    (
        "ln_fwd weight size",
        lambda: ops.layer_norm_fwd(_x(), 1, torch.ones(4), None, 1e-5),
        r"weight should contain 5 elements, not 4",
    ),
    (
        "ln_fwd bias size",
        lambda: ops.layer_norm_fwd(_x(), 2, None, torch.ones(5), 1e-5),
        r"bias should contain 15 elements, not 5",
    ),
    (
        "ln_fwd weight dtype",
        lambda: ops.layer_norm_fwd(_x(), 1, torch.ones(5, dtype=torch.float64), None, 1e-5),
        r"weight has dtype Double but input has dtype Float",
    ),
    (
        "ln_fwd weight int",
        lambda: ops.layer_norm_fwd(_x(), 1, torch.ones(5, dtype=torch.long), None, 1e-5),
        r"weight has dtype Long",
    ),
    (
        "ln_fwd weight meta",
        lambda: ops.layer_norm_fwd(_x(), 1, _meta(5), None, 1e-5),
        r"weight is on meta but input is on cpu",
    ),
    (
        "ln_fwd input meta",
        lambda: ops.layer_norm_fwd(_meta(4, 3, 5), 1, None, torch.ones(5), 1e-5),
        r"bias is on cpu but input is on meta",
    ),
    # layer_norm_bwd(grad_out, input, normalized_ndim, mean, rstd, weight?, output_mask)
    (
        "ln_bwd grad shape",
        lambda: ops.layer_norm_bwd(_x()[:2], _x(), 1, _m(), _r(), None, ALL),
        r"grad_out has shape \[2, 3, 5\] but input has shape \[4, 3, 5\]",
    ),
    (
        "ln_bwd grad dtype",
        lambda: ops.layer_norm_bwd(_x().double(), _x(), 1, _m(), _r(), None, ALL),
        r"grad_out has dtype Double but input has dtype Float",
    ),
    (
        "ln_bwd mean size",
        lambda: ops.layer_norm_bwd(_x(), _x(), 1, _m()[:2], _r(), None, ALL),
        r"mean/rstd must be Float tensors of 12 elements",
    ),
    (
        "ln_bwd rstd dtype",
        lambda: ops.layer_norm_bwd(_x(), _x(), 1, _m(), _r().double(), None, ALL),
        r"mean/rstd must be Float tensors",
    ),
    (
        "ln_bwd ndim",
        lambda: ops.layer_norm_bwd(_x(), _x(), 9, _m(), _r(), None, ALL),
        r"normalized_ndim must be in \[1, 3\]",
    ),
    (
        "ln_bwd weight size",
        lambda: ops.layer_norm_bwd(_x(), _x(), 1, _m(), _r(), torch.ones(3), ALL),
        r"weight should contain 5 elements, not 3",
    ),
    (
        "ln_bwd int",
        lambda: ops.layer_norm_bwd(_x().long(), _x().long(), 1, _m(), _r(), None, ALL),
        r"expected input of dtype float32",
    ),
    (
        "ln_bwd grad meta",
        lambda: ops.layer_norm_bwd(_meta(4, 3, 5), _x(), 1, _m(), _r(), None, ALL),
        r"grad_out is on meta but input is on cpu",
    ),
    (
        "ln_bwd rstd meta",
        lambda: ops.layer_norm_bwd(_x(), _x(), 1, _m(), _meta(4, 3), None, ALL),
        r"rstd is on meta but input is on cpu",
    ),
    # batch_norm_fwd(input, weight?, bias?, running_mean?, running_var?, training, eps)
    (
        "bn_fwd rank 1",
        lambda: ops.batch_norm_fwd(torch.randn(4), None, None, None, None, True, 1e-5),
        r"at least 2 dims, but got 1 dims",
    ),
    (
        "bn_fwd rank 0",
        lambda: ops.batch_norm_fwd(torch.randn(()), None, None, None, None, True, 1e-5),
        r"at least 2 dims, but got 0 dims",
    ),
    (
        "bn_fwd int",
        lambda: ops.batch_norm_fwd(_x().int(), None, None, None, None, True, 1e-5),
        r"expected input of dtype float32",
    ),
    (
        "bn_fwd negative eps",
        lambda: ops.batch_norm_fwd(_x(), None, None, None, None, True, -1.0),
        r"eps must be non-negative",
    ),
    (
        "bn_fwd eval without stats",
        lambda: ops.batch_norm_fwd(_x(), None, None, None, None, False, 1e-5),
        r"running_mean and running_var must be given in evaluation mode",
    ),
    (
        "bn_fwd eval one stat",
        lambda: ops.batch_norm_fwd(_x(), None, None, torch.zeros(3), None, False, 1e-5),
        r"must be given in evaluation mode",
    ),
    (
        "bn_fwd weight size",
        lambda: ops.batch_norm_fwd(_x(), torch.ones(4), None, None, None, True, 1e-5),
        r"weight should contain 3 elements, not 4",
    ),
    (
        "bn_fwd running_var size",
        lambda: ops.batch_norm_fwd(_x(), None, None, torch.zeros(3), torch.ones(2), False, 1e-5),
        r"running_var should contain 3 elements, not 2",
    ),
    (
        "bn_fwd weight dtype",
        lambda: ops.batch_norm_fwd(
            _x(), torch.ones(3, dtype=torch.float64), None, None, None, True, 1e-5
        ),
        r"weight has dtype Double but input has dtype Float",
    ),
    (
        "bn_fwd running_mean int",
        lambda: ops.batch_norm_fwd(
            _x(), None, None, torch.zeros(3, dtype=torch.long), torch.ones(3), False, 1e-5
        ),
        r"running_mean has dtype Long",
    ),
    (
        "bn_fwd running_var meta",
        lambda: ops.batch_norm_fwd(_x(), None, None, torch.zeros(3), _meta(3), False, 1e-5),
        r"running_var is on meta but input is on cpu",
    ),
    (
        "bn_fwd input meta",
        lambda: ops.batch_norm_fwd(_meta(4, 3, 5), torch.ones(3), None, None, None, True, 1e-5),
        r"weight is on cpu but input is on meta",
    ),
    # batch_norm_bwd(grad_out, input, weight?, save_mean, save_invstd, training, output_mask)
    (
        "bn_bwd grad shape",
        lambda: ops.batch_norm_bwd(_x()[:2], _x(), None, _c(), _c(), True, ALL),
        r"grad_out has shape \[2, 3, 5\] but input has shape \[4, 3, 5\]",
    ),
    (
        "bn_bwd grad dtype",
        lambda: ops.batch_norm_bwd(_x().half(), _x(), None, _c(), _c(), True, ALL),
        r"grad_out has dtype Half but input has dtype Float",
    ),
    (
        "bn_bwd save_mean size",
        lambda: ops.batch_norm_bwd(_x(), _x(), None, _c()[:2], _c(), True, ALL),
        r"save_mean/save_invstd must be Float tensors of 3 elements",
    ),
    (
        "bn_bwd save_invstd dtype",
        lambda: ops.batch_norm_bwd(_x(), _x(), None, _c(), _c().double(), False, ALL),
        r"save_mean/save_invstd must be Float",
    ),
    (
        "bn_bwd half stats",
        lambda: ops.batch_norm_bwd(
            _x().half(), _x().half(), None, _c().half(), _c().half(), True, ALL
        ),
        r"save_mean/save_invstd must be Float",
    ),
    (
        "bn_bwd rank 1",
        lambda: ops.batch_norm_bwd(torch.randn(4), torch.randn(4), None, _c(), _c(), True, ALL),
        r"at least 2 dims",
    ),
    (
        "bn_bwd weight size",
        lambda: ops.batch_norm_bwd(_x(), _x(), torch.ones(2), _c(), _c(), True, ALL),
        r"weight should contain 3 elements, not 2",
    ),
    (
        "bn_bwd grad meta",
        lambda: ops.batch_norm_bwd(_meta(4, 3, 5), _x(), None, _c(), _c(), True, ALL),
        r"grad_out is on meta but input is on cpu",
    ),
    (
        "bn_bwd save_invstd meta",
        lambda: ops.batch_norm_bwd(_x(), _x(), None, _c(), _meta(3), True, ALL),
        r"save_invstd is on meta but input is on cpu",
    ),
    # batch_norm_update_stats_(running_mean!, running_var!, batch_mean, batch_var, momentum, count)
    (
        "update sizes",
        lambda: ops.batch_norm_update_stats_(
            torch.zeros(3), torch.ones(3), torch.zeros(2), _c(), 0.1, 4
        ),
        r"must all have 3 elements, but got 3, 2 and 3",
    ),
    (
        "update running_var size",
        lambda: ops.batch_norm_update_stats_(
            torch.zeros(3), torch.ones(4), torch.zeros(3), _c(), 0.1, 4
        ),
        r"must all have 3 elements",
    ),
    (
        "update negative count",
        lambda: ops.batch_norm_update_stats_(
            torch.zeros(3), torch.ones(3), torch.zeros(3), _c(), 0.1, -1
        ),
        r"count must be non-negative, but got -1",
    ),
    (
        "update batch_mean meta",
        lambda: ops.batch_norm_update_stats_(torch.zeros(3), torch.ones(3), _meta(3), _c(), 0.1, 4),
        r"batch_mean is on meta but running_mean is on cpu",
    ),
    (
        "update running_mean meta",
        lambda: ops.batch_norm_update_stats_(_meta(3), torch.ones(3), torch.zeros(3), _c(), 0.1, 4),
        r"running_var is on cpu but running_mean is on meta",
    ),
    (
        "update integer buffer",
        lambda: ops.batch_norm_update_stats_(
            torch.zeros(3, dtype=torch.long), torch.ones(3), torch.zeros(3), _c(), 0.1, 4
        ),
        r"must be floating point, but one has dtype Long",
    ),
    (
        "update expanded buffer",
        lambda: ops.batch_norm_update_stats_(
            torch.zeros(1).expand(3), torch.ones(3), torch.zeros(3), _c(), 0.1, 4
        ),
        r"more than one element of the written-to tensor",
    ),
]


@pytest.mark.parametrize("desc,call,msg", RAW_OP_ERRORS, ids=[e[0] for e in RAW_OP_ERRORS])
def test_raw_op_errors(desc, call, msg):
    with pytest.raises(RuntimeError, match=msg):
        call()


# ---- parameter dtypes with a half-precision input ----------------------------------------------


def _outcome(f, *args):
    try:
        return f(*args).dtype
    except RuntimeError:
        return RuntimeError


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_parameter_dtypes_as_torch(half):
    """With a float16/bfloat16 input, torch takes parameters all of the input's dtype or all
    float32 (absent ones aside), and raises for a mix. normext accepts and refuses the same
    combinations (every one of the given parameters in either dtype), with the same output dtype."""
    options = (None, half, torch.float32)
    x = torch.randn(4, 3, 5, dtype=half)
    n = 0
    for wd in options:
        for bd in options:
            w = None if wd is None else torch.randn(5, dtype=wd)
            b = None if bd is None else torch.randn(5, dtype=bd)
            expected = _outcome(F.layer_norm, x, (5,), w, b)
            assert _outcome(NF.layer_norm, x, (5,), w, b) == expected, (wd, bd)
            for sd in options:
                for training in (True, False):
                    if sd is None and not training:
                        continue
                    stats = (None, None) if sd is None else (torch.zeros(3, dtype=sd),
                                                            torch.ones(3, dtype=sd))
                    wc = None if wd is None else torch.randn(3, dtype=wd)
                    bc = None if bd is None else torch.randn(3, dtype=bd)
                    expected = _outcome(F.batch_norm, x, *stats, wc, bc, training)
                    got = _outcome(NF.batch_norm, x, *stats, wc, bc, training)
                    assert got == expected, (wd, bd, sd, training)
                    n += expected is RuntimeError
    assert n > 0  # some combinations are refused


# ---- torch's order and exceptions for BatchNorm's argument checks --------------------------------

TORCH_ORDER_CASES = {
    # torch checks the batch size first, counting N times the spatial sizes (C does not count)
    "C=0, N=1, train": (lambda f: f(torch.randn(1, 0), None, None, training=True), ValueError,
                        "Expected more than 1 value per channel when training"),
    "int input, N=1, train": (
        lambda f: f(torch.ones(1, 3, dtype=torch.long), None, None, training=True), ValueError,
        "Expected more than 1 value per channel when training"),
    # then eps, before the dtype
    "int input, eps<0, train": (
        lambda f: f(torch.ones(4, 3, dtype=torch.long), None, None, training=True, eps=-1.0),
        ValueError, "eps must be positive during training"),
    "only running_mean, eval": (
        lambda f: f(torch.randn(4, 3), torch.zeros(3), None), RuntimeError,
        "running_var must be defined in evaluation mode"),
    "only running_var, eval": (
        lambda f: f(torch.randn(4, 3), None, torch.ones(3)), RuntimeError,
        "running_mean must be defined in evaluation mode"),
    "running stats require grad, train": (
        lambda f: f(torch.randn(4, 3), torch.zeros(3, requires_grad=True),
                    torch.ones(3, requires_grad=True), training=True),
        RuntimeError, "not differentiable with respect to"),
    "running stats require grad, eval": (
        lambda f: f(torch.randn(4, 3), torch.zeros(3, requires_grad=True),
                    torch.ones(3, requires_grad=True)),
        RuntimeError, "not differentiable with respect to"),
}


@pytest.mark.parametrize("case", TORCH_ORDER_CASES)
def test_batch_norm_checks_in_torchs_order(case):
    """Where two checks could fail, the one torch raises first, with its exception type (the
    message is ours where torch's comes from deep inside its kernels)."""
    call, exc, msg = TORCH_ORDER_CASES[case]
    with pytest.raises(exc):
        call(torch.nn.functional.batch_norm)
    with pytest.raises(exc, match=msg):
        call(NF.batch_norm)


def test_running_stats_requiring_grad_under_no_grad():
    """torch refuses running statistics that require grad only where grad mode is on."""
    rm, rv = torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True)
    x = torch.randn(4, 3)
    with torch.no_grad():
        y = NF.batch_norm(x, rm, rv, training=True)
        y_ref = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), training=True)
    torch.testing.assert_close(y, y_ref)
    assert rm.abs().sum() > 0


def test_momentum_as_one_value_tensor():
    """torch takes a one-value tensor for momentum as its number; so does normext."""
    x = torch.randn(8, 3)
    stats = {}
    for name, f, m in (("tensor", NF.batch_norm, torch.tensor(0.3)),
                       ("float", NF.batch_norm, float(torch.tensor(0.3))),
                       ("torch", torch.nn.functional.batch_norm, torch.tensor(0.3))):
        rm, rv = torch.zeros(3), torch.ones(3)
        f(x, rm, rv, training=True, momentum=m)
        stats[name] = (rm, rv)
    torch.testing.assert_close(stats["tensor"], stats["float"], rtol=0, atol=0)
    torch.testing.assert_close(stats["tensor"], stats["torch"])


def test_torch_layer_norm_error_inputs():
    """torch's own ErrorInputs of native_layer_norm (OpInfo), against normext.functional's
    layer_norm: the same exception and a message its regex finds."""
    pytest.importorskip("expecttest")  # torch.testing._internal needs it
    from torch.testing._internal.common_methods_invocations import (
        error_inputs_native_layer_norm,
    )

    errors = list(error_inputs_native_layer_norm(None, "cpu"))
    assert len(errors) == 4
    for e in errors:
        s = e.sample_input
        with pytest.raises(e.error_type, match=e.error_regex):
            NF.layer_norm(s.input, *s.args)
