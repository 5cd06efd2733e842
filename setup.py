"""Build normext._C: the C++ (CPU) kernels, and the CUDA kernels when a toolkit is found.

Environment:
  NORMEXT_CUDA=auto|0|1   auto (default): build csrc/cuda/*.cu when torch was built with CUDA and
                          a CUDA toolkit (nvcc) is found; no visible GPU is needed.
  NORMEXT_CPU_ISA=auto|avx2|avx512|default
                          instruction set for the at::vec::Vectorized loops. auto picks avx2 when
                          the build machine has AVX2+FMA+F16C (the extension is built where it runs),
                          and where it also has AVX-512 (F, BW, VL, DQ) compiles the kernels a second
                          time for that (csrc/cpu/kernels.h: the copy is picked per call).
  DEBUG=1                 -O0 -g instead of -O3.
  NORMEXT_SANITIZE=1      AddressSanitizer + UndefinedBehaviorSanitizer (-O1 -g, C++ sources
                          only); see scripts/sanitize.sh (make sanitize) for building it apart
                          from the normal build and running the tests with it.
  TORCH_CUDA_ARCH_LIST, MAX_JOBS are honoured as by torch.utils.cpp_extension.
"""

import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _want_cuda():
    flag = os.environ.get("NORMEXT_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    import torch

    found = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on"):
        if not found:
            raise RuntimeError(
                "NORMEXT_CUDA=1 but no CUDA build is possible: torch.version.cuda="
                f"{torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
            )
        return True
    return found


def _build_machine_flags():
    """The build machine's CPU flags (/proc/cpuinfo), on x86-64."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


_ISA = os.environ.get("NORMEXT_CPU_ISA", "auto").lower()
_BUILD_MACHINE = _build_machine_flags()
# The AVX-512 code generation flags: the whole build's with NORMEXT_CPU_ISA=avx512, else added for
# csrc/cpu/avx512/*.cpp alone (see csrc/cpu/avx512/isa.h for why not a pragma).
# Where the build machine has AVX512_BF16 too, -mavx512bf16 joins them, and the AVX-512 copy
# rounds float to bfloat16 in one instruction (bf16_pack in csrc/cpu/vec_utils.h; dispatch.cpp
# then runs that copy only on CPUs that have it).
_AVX512_BF16 = "avx512_bf16" in _BUILD_MACHINE and _ISA in ("auto", "avx512")
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"] + (
    ["-mavx512bf16"] if _AVX512_BF16 else []
)


def _cpu_flags():
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    isa, flags = _ISA, _BUILD_MACHINE
    dual = False
    if isa == "auto":
        isa = "avx2" if {"avx2", "fma", "f16c"} <= flags else "default"
        dual = isa == "avx2" and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    if isa == "avx2":
        avx2 = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
        if not dual:
            return avx2
        bf16 = ["-DNORMEXT_CPU_AVX512_BF16"] if _AVX512_BF16 else []
        return avx2 + ["-DNORMEXT_CPU_AVX512"] + bf16
    if isa == "avx512":
        return AVX512_FLAGS + ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    return []


def _is_avx512_copy(path):
    return os.path.normpath(path).split(os.sep)[-3:-1] == ["cpu", "avx512"]


class Build(BuildExtension):
    """torch's BuildExtension, with the AVX-512 flags added for csrc/cpu/avx512/*.cpp.

    torch compiles every C++ source of an extension with the same flags, so the compile call is
    split in two: the other sources as usual, then these with AVX512_FLAGS added. Their objects
    come last on the link line, so the linker keeps the AVX2 copy of any inline function that
    both kinds of files emit.
    """

    def build_extension(self, ext):
        compile_all = self.compiler.compile

        def compile_split(sources, *args, extra_postargs=None, **kwargs):
            wide = [s for s in sources if _is_avx512_copy(s)]
            rest = [s for s in sources if not _is_avx512_copy(s)]
            objects = compile_all(rest, *args, extra_postargs=extra_postargs, **kwargs) if rest else []
            if wide:
                if isinstance(extra_postargs, dict):
                    post = {**extra_postargs, "cxx": list(extra_postargs["cxx"]) + AVX512_FLAGS}
                else:
                    post = list(extra_postargs or []) + AVX512_FLAGS
                objects += compile_all(wide, *args, extra_postargs=post, **kwargs)
            return objects

        self.compiler.compile = compile_split
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_all


debug = os.environ.get("DEBUG", "0") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
sanitize = os.environ.get("NORMEXT_SANITIZE", "0") == "1"
san_flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"] if sanitize else []
cxx_opt = ["-O1", "-g", "-fno-omit-frame-pointer"] + san_flags if sanitize else opt
with_cuda = _want_cuda()

cpu_flags = _cpu_flags()
# csrc/cpu/avx512/*.cpp: the kernels' AVX-512 copies, built only where _cpu_flags() asks for them
# (their -mavx512* flags would fail elsewhere, on another architecture's compiler say).
sources = _rel(
    glob.glob(os.path.join(CSRC, "*.cpp"))
    + glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))
    + (glob.glob(os.path.join(CSRC, "cpu", "avx512", "*.cpp"))
       if "-DNORMEXT_CPU_AVX512" in cpu_flags else [])
)
# No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20; the
# torch 2.14 headers do not compile as C++17).
# -ffp-contract=off: no implicit a*b+c -> fma. at::parallel_for inlines its body twice (the
# one-thread call and the threaded one) and the compiler may contract each copy differently, which
# made results depend on the thread count; explicit at::vec::fmadd calls are unaffected.
cxx_flags = cxx_opt + ["-fopenmp", "-ffp-contract=off", "-DNORMEXT_EXTENSION"] + cpu_flags
ext_kwargs = dict(
    name="normext._C",
    sources=sources,
    include_dirs=[CSRC],
    extra_link_args=["-fopenmp"] + san_flags,
)
if with_cuda:
    sources += _rel(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
    ext = CUDAExtension(
        **ext_kwargs,
        define_macros=[("NORMEXT_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": opt + ["--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
else:
    ext = CppExtension(**ext_kwargs, extra_compile_args={"cxx": cxx_flags})

setup(
    name="normext",
    version="0.1.0",
    packages=find_packages(include=["normext", "normext.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
