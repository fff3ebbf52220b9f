"""Build script for dynattn's compiled kernels.

`dynattn._C` (C++17, pybind11) holds the CPU kernels. It does not link libtorch: Python hands it raw
pointers, sizes and strides, so the build needs no torch and the wheel works with any torch >= 2.4.

One build runs on any x86-64 CPU: files named `*_avx2.cpp` / `*_avx512.cpp` are compiled with those
instruction sets and the kernels pick a path at run time. On other architectures those files are compiled
with `-DDYNATTN_NO_X86_SIMD` and reduce to nothing.

`dynattn._C_cuda` is built from `csrc/cuda/` when `nvcc` is found (or `DYNATTN_BUILD_CUDA=1`; `=0` turns it
off). `DYNATTN_CUDA_ARCHS` picks the GPU architectures, e.g. "8.0;9.0+PTX" (the default).
The CUDA runtime is linked statically, so the module needs only the NVIDIA driver at run time.
"""

import glob
import os
import platform
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # Ampere and Hopper; PTX lets newer GPUs JIT the Hopper code

ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]


def rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def find_nvcc():
    """nvcc from $CUDA_HOME, then $PATH, then /usr/local/cuda."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cuda_home_of(nvcc):
    """The toolkit folder behind nvcc (follows wrapper scripts via `nvcc --version` location guesses)."""
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if os.path.isdir(os.path.join(home, "include")) and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    for guess in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        if guess and os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
            return guess
    # A wrapper script: ask the shell where the real binary is.
    try:
        text = open(real).read(4096)
        for token in text.split():
            if token.endswith("/bin/nvcc") and os.path.exists(token):
                return os.path.dirname(os.path.dirname(token))
    except (OSError, UnicodeDecodeError):
        pass
    return home


def cuda_gencode_flags(archs):
    """'8.0;9.0+PTX' -> nvcc -gencode flags (SASS for each, PTX for those marked +PTX)."""
    flags = []
    for item in archs.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item[:-4] if ptx else item
        try:
            major, minor = num.split(".") if "." in num else (num[:-1], num[-1])
            cc = f"{int(major)}{minor}"
        except ValueError:
            sys.exit(f"DYNATTN_CUDA_ARCHS: cannot parse {item!r}; expected e.g. '8.0;9.0+PTX'")
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    if not flags:
        sys.exit("DYNATTN_CUDA_ARCHS is empty; expected e.g. '8.0;9.0+PTX'")
    return flags


class BuildExt(build_ext):
    """Per-file flags: ISA-specific C++ files and nvcc for .cu files."""

    def build_extensions(self):
        compiler = self.compiler
        if ".cu" not in compiler.src_extensions:
            compiler.src_extensions.append(".cu")
        default_compile = compiler._compile
        nvcc = getattr(self, "_nvcc", None)
        nvcc_flags = getattr(self, "_nvcc_flags", [])

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            postargs = list(extra_postargs or [])
            if src.endswith(".cu"):
                saved = compiler.compiler_so
                compiler.set_executable("compiler_so", [nvcc])
                try:
                    # Our own nvcc flags only: host-compiler flags go behind -Xcompiler.
                    args = nvcc_flags + ["-Xcompiler", "-fPIC,-fvisibility=hidden"]
                    return default_compile(obj, src, ext, cc_args, args, pp_opts)
                finally:
                    compiler.set_executable("compiler_so", saved)
            for suffix, flags in ISA_FLAGS.items():
                if src.endswith(suffix):
                    postargs += flags if IS_X86 else ["-DDYNATTN_NO_X86_SIMD"]
            return default_compile(obj, src, ext, cc_args, postargs, pp_opts)

        compiler._compile = _compile
        # -Wall noise from pybind11 headers is not ours; -Wstrict-prototypes is C-only.
        for flag in ("-Wstrict-prototypes",):
            if flag in compiler.compiler_so:
                compiler.compiler_so.remove(flag)
        super().build_extensions()


def extensions():
    exts = [
        Pybind11Extension(
            "dynattn._C",
            rel(["csrc/bindings.cpp"] + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-pthread"],
            cxx_std=17,
        )
    ]
    build_cuda = os.environ.get("DYNATTN_BUILD_CUDA")
    nvcc = find_nvcc()
    if build_cuda == "1" and nvcc is None:
        sys.exit("DYNATTN_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if nvcc is not None and build_cuda != "0":
        home = cuda_home_of(nvcc)
        archs = os.environ.get("DYNATTN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        BuildExt._nvcc = nvcc
        BuildExt._nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Werror=all-warnings",
                                "-lineinfo"] + cuda_gencode_flags(archs)
        print(f"dynattn: building _C_cuda with {nvcc} for DYNATTN_CUDA_ARCHS={archs}")
        exts.append(
            Pybind11Extension(
                "dynattn._C_cuda",
                rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp"))
                    + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))),
                include_dirs=[os.path.join(HERE, "csrc"), os.path.join(home, "include")],
                library_dirs=[os.path.join(home, "lib64"), os.path.join(home, "lib")],
                libraries=["cudart_static", "dl", "rt"],
                extra_compile_args=CXX_FLAGS,
                extra_link_args=["-pthread"],
                define_macros=[("DYNATTN_CUDA_ARCHS", f'"{archs}"')],
                cxx_std=17,
            )
        )
    else:
        reason = "DYNATTN_BUILD_CUDA=0" if build_cuda == "0" else "nvcc not found"
        print(f"dynattn: not building _C_cuda ({reason})")
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
