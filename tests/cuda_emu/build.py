"""Build csrc/cuda as a CPU-emulated pybind11 module (see README.md in this folder).

Steps: copy ``csrc/cuda`` and ``csrc/common`` into an output folder, patch the copies (the PTX-wrapper section of
``device.cuh`` becomes ``#include "emu_ptx.h"``, ``<<<...>>>`` launches become ``emu_launch_`` calls,
``__shared__`` declarations become the emulated shared memory, the module is renamed and gains two bounds-check
hooks), compile the four ``.cu`` files as C++ with g++ in parallel, plus the bindings and ``emu.cpp``, and
link one shared object. Every patch checks how many times it applied against ``EXPECTED``, and the patched
sources must be free of ``asm``, ``__shared__`` and ``<<<``, so a kernel refactor that the patching no longer
fits fails with a message saying what to update instead of quietly testing something else.

Nothing is written outside the output folder. By hand::

    python tests/cuda_emu/build.py /tmp/emu_build      # prints the path of the built module

and load it with :func:`load` (module name :data:`MODULE_NAME`, never ``dynattn._C_cuda``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"

#: Name of the built module (PyInit symbol and file name): private, so it can never shadow a real
#: ``dynattn._C_cuda`` loaded in the same process.
MODULE_NAME = "_dynattn_C_cuda_emu"

CU_FILES = ("runtime", "route", "fwd", "bwd")
CUDA_HEADERS = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "crt/host_config.h")  # the last: cuda_runtime.h's
CXXFLAGS = ["-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-Wno-attributes"]

#: How many times each patch must apply, per file. A kernel added or a launch moved changes these: update the
#: numbers after checking that the new code is something the emulator handles (README.md, "What is emulated").
EXPECTED: Dict[str, Dict[str, int]] = {
    "device.cuh": {"ptx_section": 1},
    "fwd.cu": {"dynamic_smem": 1, "static_smem": 0, "launch": 1},
    "bwd.cu": {"dynamic_smem": 2, "static_smem": 0, "launch": 3},
    "route.cu": {"dynamic_smem": 1, "static_smem": 1, "launch": 2},
    "runtime.cu": {"dynamic_smem": 0, "static_smem": 0, "launch": 1},
    "bindings_cuda.cpp": {"module": 1},
}


class Unavailable(RuntimeError):
    """A tool or header the emulated build needs is missing: the caller should skip, not fail."""


class PatchError(RuntimeError):
    """The kernel sources no longer fit the emulator's patches: the caller should fail loudly."""


@dataclass
class Toolchain:
    cxx: str
    cuda_include: str
    python_include: str
    pybind11_include: str


# --------------------------------------------------------------------------------------------------
# toolchain discovery
# --------------------------------------------------------------------------------------------------


def _cuda_include_candidates() -> List[Path]:
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "include")
    cands.append(Path("/usr/local/cuda/include"))
    # The headers of the nvidia CUDA wheels a CUDA build of torch installs: usable only together with those of
    # the nvcc wheel (crt/host_config.h), which torch does not pull in by itself.
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        nv = Path(site) / "nvidia"
        cands += sorted(nv.glob("cu*/include")) + [nv / "cuda_runtime" / "include"]
    return cands


def find_toolchain() -> Toolchain:
    """The compiler and include folders, or :class:`Unavailable` naming what is missing."""
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"the CUDA emulator runs threads as ucontext fibers: Linux only, not {sys.platform}")
    cxx = shutil.which("g++")
    if cxx is None:
        raise Unavailable("g++ not found on PATH (the CUDA emulator compiles the kernels as C++ with g++)")
    cands = _cuda_include_candidates()
    cuda_inc = next((c for c in cands if all((c / h).is_file() for h in CUDA_HEADERS)), None)
    if cuda_inc is None:
        raise Unavailable(
            f"CUDA headers {', '.join(CUDA_HEADERS)} not found in $CUDA_HOME/include, $CUDA_PATH/include, "
            "/usr/local/cuda/include or the nvidia wheels (no nvcc or GPU is needed, only the toolkit's headers)"
        )
    py_inc = sysconfig.get_paths()["include"]
    if not (Path(py_inc) / "Python.h").is_file():
        raise Unavailable(f"Python.h not found in {py_inc} (install the Python development headers)")
    try:
        import pybind11
    except ImportError:
        raise Unavailable("pybind11 is not importable (pip install pybind11)") from None
    return Toolchain(cxx, str(cuda_inc), py_inc, pybind11.get_include())


# --------------------------------------------------------------------------------------------------
# source patches
# --------------------------------------------------------------------------------------------------

_SECTION = re.compile(r"^// -{20,}\n// (?P<title>[^\n]*)\n(?://[^\n]*\n)*?// -{20,}\n", re.M)
_DEFINED = re.compile(
    r"__device__\s+__forceinline__\s+(?:static\s+)?[\w:<>]+\s+(\w+)\s*\(|^\s*struct\s+(\w+)\s*[{;]", re.M
)
_DYNAMIC_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\[\];")
_STATIC_SMEM = re.compile(r"(?<!extern )\b__shared__\s+(?:__align__\(\d+\)\s+)?")
_LAUNCH = re.compile(r"([\w:]+(?:<[^;(]*?>)?)<<<(.*?)>>>\((.*?)\);", re.S)
_BINDINGS_MODULE = "PYBIND11_MODULE(_C_cuda, m) {"
_LEFTOVERS = {
    "inline PTX (asm)": re.compile(r"\basm\b"),
    "__shared__": re.compile(r"__shared__"),
    "<<<...>>> launch": re.compile(r"<<<"),
}
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def _blank_comments(text: str) -> str:
    """Comments replaced by spaces (newlines kept, so line numbers stay right)."""
    return _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)


def _defined_names(text: str) -> set:
    return {a or b for a, b in _DEFINED.findall(text)}


def _patch_device(text: str) -> tuple:
    """Replace the "PTX wrappers" section of device.cuh (header comment through the next section header) with
    ``#include "emu_ptx.h"``; returns (text, count)."""
    heads = list(_SECTION.finditer(text))
    hits = [i for i, m in enumerate(heads) if m.group("title").startswith("PTX wrappers")]
    if len(hits) != 1:
        return text, len(hits)
    i = hits[0]
    start = heads[i].start()
    end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
    removed = text[start:end]
    missing = _defined_names(removed) - _defined_names((HERE / "emu_ptx.h").read_text())
    if missing:
        raise PatchError(
            f"device.cuh's PTX wrapper section defines {sorted(missing)}, which tests/cuda_emu/emu_ptx.h does not "
            "emulate: add a spec implementation there (same signature)"
        )
    return text[:start] + '#include "emu_ptx.h"\n\n' + text[end:], 1


def _patch_cu(text: str) -> tuple:
    counts = {}
    text, counts["dynamic_smem"] = _DYNAMIC_SMEM.subn(
        r"\1* \2 = reinterpret_cast<\1*>(emu::smem_base());", text
    )
    # Static shared arrays become function-level statics: one instance shared by the threads of the block
    # (blocks run one after another), not poisoned between blocks.
    text, counts["static_smem"] = _STATIC_SMEM.subn("static ", text)
    text, counts["launch"] = _LAUNCH.subn(r"emu_launch_([&] { \1(\3); }, \2);", text)
    return text, counts


def _patch_bindings(text: str) -> tuple:
    n = text.count(_BINDINGS_MODULE)
    text = text.replace(
        _BINDINGS_MODULE,
        "namespace emu { void register_global(uintptr_t, size_t); void clear_global(); }\n"
        f"PYBIND11_MODULE({MODULE_NAME}, m) {{\n"
        '  m.def("emu_register", [](int64_t p, int64_t n) {\n'
        "    emu::register_global(static_cast<uintptr_t>(p), static_cast<size_t>(n)); });\n"
        '  m.def("emu_clear", &emu::clear_global);',
    )
    return text, n


def patch_sources(csrc: Path, dst: Path) -> Path:
    """Copy ``csrc/{cuda,common}`` to ``dst/src`` and patch them for the emulator; returns ``dst/src``."""
    src = dst / "src"
    if src.exists():
        shutil.rmtree(src)
    for sub in ("common", "cuda"):
        shutil.copytree(csrc / sub, src / sub)
    cuda_dir = src / "cuda"
    problems = []
    patched = {}
    for name, expected in EXPECTED.items():
        path = cuda_dir / name
        if not path.is_file():
            problems.append(f"csrc/cuda/{name} not found")
            continue
        text = path.read_text()
        if name == "device.cuh":
            text, n = _patch_device(text)
            counts = {"ptx_section": n}
        elif name.endswith(".cu"):
            text, counts = _patch_cu(text)
        else:
            text, n = _patch_bindings(text)
            counts = {"module": n}
        for key, want in expected.items():
            if counts[key] != want:
                problems.append(f"csrc/cuda/{name}: patch {key!r} applied {counts[key]} times, expected {want}")
        path.write_text(text)
        patched[name] = text
    for p in sorted(cuda_dir.iterdir()):
        if p.suffix in (".cu", ".cuh") and p.name not in EXPECTED:
            problems.append(f"csrc/cuda/{p.name} is new: add it to EXPECTED (and CU_FILES if it is a .cu)")
    for name, text in patched.items():
        text = _blank_comments(text)
        for what, rx in _LEFTOVERS.items():
            for m in rx.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f"csrc/cuda/{name}:{line}: {what} left after patching: the emulator cannot run it")
    if problems:
        raise PatchError(
            "the CUDA sources no longer match the emulator's patches (tests/cuda_emu/build.py):\n  "
            + "\n  ".join(problems)
        )
    return src


# --------------------------------------------------------------------------------------------------
# compile and link
# --------------------------------------------------------------------------------------------------


def _run(cmd: Sequence[str], cwd: Path) -> None:
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"emulated CUDA build failed (exit {r.returncode}):\n{' '.join(cmd)}\n{r.stdout}{r.stderr}")


def build(out_dir, toolchain: Optional[Toolchain] = None, csrc: Path = CSRC, jobs: Optional[int] = None,
          extra_flags: Sequence[str] = (), verbose: bool = False) -> Path:
    """Patch and compile into ``out_dir``; returns the path of the built module. ``extra_flags`` go after the
    default flags (e.g. ``-O0 -g`` to debug a kernel in gdb)."""
    tc = toolchain or find_toolchain()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    src = patch_sources(Path(csrc), out)
    obj = out / "obj"
    obj.mkdir(exist_ok=True)
    base = [tc.cxx, *CXXFLAGS, *extra_flags, f"-I{HERE}", f"-I{src}", f"-I{tc.cuda_include}"]
    kernel = ["-include", "emu.h", "-include", "emu_launch.h", "-x", "c++"]
    # Heaviest first: bwd.cu and fwd.cu dominate the build.
    cmds = [base + kernel + ["-c", str(src / "cuda" / f"{f}.cu"), "-o", str(obj / f"{f}.o")]
            for f in reversed(CU_FILES)]
    cmds.append(base + [f"-I{tc.python_include}", f"-I{tc.pybind11_include}", "-c",
                        str(src / "cuda" / "bindings_cuda.cpp"), "-o", str(obj / "bindings.o")])
    cmds.append(base + ["-c", str(HERE / "emu.cpp"), "-o", str(obj / "emu.o")])
    workers = jobs or max(2, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=min(workers, len(cmds))) as pool:
        list(pool.map(lambda c: _run(c, out), cmds))  # re-raises the first failure
    so = out / (MODULE_NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    _run([tc.cxx, "-shared", "-Wl,-Bsymbolic", "-o", str(so), *sorted(str(p) for p in obj.glob("*.o"))], out)
    if verbose:
        print(f"built {so} in {time.time() - t0:.1f}s", file=sys.stderr)
    return so


def load(so_path):
    """Import the built module under :data:`MODULE_NAME` (once per process)."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(so_path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[MODULE_NAME] = mod
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="folder to build in (created; csrc is copied, never modified)")
    ap.add_argument("-j", "--jobs", type=int, default=None, help="parallel compiler processes")
    ap.add_argument("--cxxflags", default="", help="extra compiler flags, e.g. '-O0 -g'")
    args = ap.parse_args(argv)
    try:
        so = build(args.out_dir, jobs=args.jobs, extra_flags=args.cxxflags.split(), verbose=True)
    except Unavailable as e:
        print(f"cannot build the CUDA emulator here: {e}", file=sys.stderr)
        return 2
    print(so)
    return 0


if __name__ == "__main__":
    sys.exit(main())
