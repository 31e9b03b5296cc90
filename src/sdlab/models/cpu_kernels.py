"""sdlab's own CPU kernels (`kernels/`): built once per installed copy on CPUs with AVX512-BF16.

One extension module holds them all: bf16 flash attention (`cpu_attention`), GroupNorm (+ SiLU) for bf16
channels-last activations and LayerNorm for bf16 token rows (`cpu_norm`), on CPUs with AMX the tile
products for convolutions over few pixels (`patch_conv`) and the feed-forward's GEGLU (`cpu_linear`), and an
allocator that reuses large blocks inside a model's call (`cpu_memory`). It is
built the first time a bf16 model of any size draws on such a CPU (`torch.utils.cpp_extension`: a C++ compiler
and ninja; about 30 s once on 2 idle cores, into torch's extensions folder (`build_folder()`), keyed by the
sources' path and contents, and imported from there afterwards); where it cannot be built, every caller falls
back to PyTorch's own operations. Without a compiler on PATH nothing is tried (one line says so: install g++); a
build that fails is remembered in its folder (`FAILED_MARKER`) and not tried again until the compiler, ninja
or Python's headers change or a day has passed (a fix nothing here can see: OpenMP installed, disk space
freed); each process that would use the kernels says in one line that they are off, why, and where that is
remembered.

Which path a tensor takes depends only on the tensor (shape, dtype, layout, device, whether a gradient is
wanted) and on fixed facts of the machine (`runs_here`, `amx_cpu`, whether the build succeeds), never on what
ran earlier in the process: the kernels round differently from PyTorch's operations, and a chooser that took
them for a small tensor only once something large had loaded them gave the same seed and settings a
different picture after a larger model had drawn (`loaded()` answers questions, it chooses nothing).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import ModuleType

import torch
from torch.nn.modules import module as _module_hooks

from sdlab.utils.files import atomic_write

logger = logging.getLogger(__name__)

FOLDER = Path(__file__).with_name("kernels")
SOURCES = ("bindings.cpp", "cpu_attention.cpp", "cpu_memory.cpp", "cpu_norm.cpp", "cpu_patch_product.cpp")
HEADERS = ("amx.h", "simd.h")

FAILED_MARKER = "build-failed"     # in a build's folder: the inputs it failed with, then the line that said why
RETRY_AFTER = 24 * 3600            # seconds after which a remembered failure is tried again
_REMEMBERED = (" [remembered in {}: tried again after a day or once the compiler, ninja or Python's headers change;"
               " delete it to try now]")

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


@functools.cache
def runs_here() -> bool:
    """The CPU has the kernels' instructions (AVX-512 with bf16 conversions and pair dot products)."""
    return torch.cpu._is_avx512_bf16_supported()


def name() -> str:
    """The build's name (and folder in `build_folder()`): a hash of the kernels' folder, their sources, this CPU's
    instruction set and the versions of torch and Python, so each installed copy and version of sdlab has its
    own build (a changed header rebuilds too), a cache shared between machines (a network home, an image)
    never hands a build made with `-march=native` for another CPU to this one, and a build is never loaded
    into another torch or Python than the one it was compiled for."""
    digest = hashlib.sha1(str(FOLDER.resolve()).encode() + _cpu_flags().encode() + torch.__version__.encode()
                          + f"{sys.version_info[:2]}{getattr(sys, 'abiflags', '')}".encode())
    for file in (*SOURCES, *HEADERS):
        digest.update(file.encode() + (FOLDER / file).read_bytes())
    return f"sdlab_cpu_kernels_{digest.hexdigest()[:10]}"


@functools.cache
def _cpu_flags() -> str:
    """The CPU's feature flags as Linux lists them (empty elsewhere: the build is native to it anyway)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return ""


def inference_only(*tensors: torch.Tensor) -> bool:
    """No gradient is wanted through `tensors` and no `torch.compile` graph is being traced: where operations
    without a backward (these kernels, oneDNN's fused products) may stand in for PyTorch's (a compiled graph
    fuses for itself)."""
    return (not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.compiler.is_compiling())


def tensor_version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place change, shared by views), None for an inference
    tensor, which has none."""
    try:
        return tensor._version
    except RuntimeError:   # "Inference tensors do not track version counter"
        return None


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether forward hooks watch `module` (a LoRA in training adds its output through one), its own or the
    ones registered for every module (`torch.nn.modules.module.register_module_forward_hook`), so it must
    run through its own call rather than a fused or hand-written stand-in."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks)


@functools.cache
def onednn_fuses() -> bool:
    """PyTorch has oneDNN's fused products (`torch.ops.mkldnn._linear_pointwise`, `_convolution_pointwise`:
    a product with an element-wise step applied before its one write), and oneDNN runs bf16 on this CPU (it
    refuses bf16 without AVX-512 or AMX, where PyTorch's own bf16 products fall back to other code)."""
    try:
        return (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._linear_pointwise.binary is not None
                and torch.ops.mkldnn._convolution_pointwise.binary is not None
                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def amx_cpu() -> bool:
    """The CPU has the kernels' instructions and AMX tiles (`torch.cpu._is_amx_tile_supported`)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return runs_here() and probe is not None and bool(probe())


def tile_kernels() -> ModuleType | None:
    """The built module where it runs the AMX tile products (`patch_product_bf16`, `geglu_bf16`: an AMX CPU,
    a build for AMX, and the OS grants the tiles; built on the first call there), else None (a CPU without
    AMX never builds for this)."""
    if not amx_cpu():
        return None
    module = extension()
    return module if module is not None and module.uses_amx() else None


def loaded() -> bool:
    """Whether the module was built (or found built) in this process. Not a path's chooser: what a tensor runs
    on must not depend on what ran before it (see the module docstring)."""
    return _state.get("module") is not None


def built_extension() -> ModuleType | None:
    """The module where it is loaded, or built already (then imported, ~1 ms, and loaded from here on); this
    never builds it, and looks for a build once per process."""
    with _lock:
        if "module" not in _state and "looked" not in _state:
            _state["looked"] = None
            module = _import_built(_library(name())) if runs_here() else None
            if module is not None and hasattr(module, "flash_attention_bf16"):
                _state["module"] = module
        return _state.get("module")


def extension() -> ModuleType | None:
    """The built module (built on the first call), or None where it cannot be built."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def build_folder() -> Path:
    """Where the kernels are built, one subfolder per `name()`: `$TORCH_EXTENSIONS_DIR`, else
    `torch_extensions` in the user's cache folder (`$XDG_CACHE_HOME` or `~/.cache`), as torch's own builds."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"


def _library(build: str) -> Path:
    """The built library of `build` (a `name()`)."""
    return build_folder() / build / f"{build}.so"


def _build() -> ModuleType | None:
    try:
        build = name()
        library = _library(build)
        module = _import_built(library) or _build_once(build, library)
    except Exception as err:   # missing sources, an unusable build folder: PyTorch's operations instead
        logger.warning("sdlab's CPU kernels could not be loaded (%s); using PyTorch's operations", _error_line(err))
        return None
    return module if hasattr(module, "flash_attention_bf16") else None


def _build_once(build: str, library: Path) -> ModuleType | None:
    """The kernels built into `library`'s folder, or None with one line saying why: a missing compiler is
    found before torch is asked (whose check prints a banner and whose ninja run costs every process), and
    a failure is remembered (`FAILED_MARKER`): a later run with the same build inputs (`_build_inputs`) within
    `RETRY_AFTER` does not try again, and says that the kernels are off, why, and where that is remembered."""
    marker = library.parent / FAILED_MARKER
    inputs = _build_inputs()
    remembered = _read_marker(marker)
    if remembered is not None and remembered[0] == inputs and time.time() - remembered[2] < RETRY_AFTER:
        logger.warning("%s%s", remembered[1], _REMEMBERED.format(marker))
        return None
    compiler = os.environ.get("CXX", "c++")                  # the one torch's build runs
    if shutil.which(compiler) is None:
        reason = (f"no C++ compiler ({compiler!r} is not on PATH): sdlab's bf16 CPU kernels (attention, norms, "
                  "AMX products) are off and PyTorch's operations draw instead; install g++ to have them built once")
    else:
        try:
            return _compile(build, library)
        except Exception as err:   # no ninja, a build error
            reason = f"sdlab's bf16 CPU kernels could not be built ({_error_line(err)}); using PyTorch's operations"
    logger.warning("%s%s", reason, _REMEMBERED.format(marker) if _write_marker(marker, inputs, reason) else "")
    return None


def _compile(build: str, library: Path) -> ModuleType:
    from torch.utils import cpp_extension   # ~70 ms to import: only to build

    if not library.is_file():
        logger.warning("building sdlab's bf16 CPU kernels (once; about 30 s)")
    library.parent.mkdir(parents=True, exist_ok=True)
    torch_log = logging.getLogger(cpp_extension.__name__)
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)               # its multi-line compiler banners: the failure says it in one
    try:
        return cpp_extension.load(name=build, sources=[str(FOLDER / s) for s in SOURCES],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"],   # OpenMP: at::parallel_for's threads
                                  build_directory=str(library.parent), verbose=False)
    finally:
        torch_log.setLevel(level)


def _build_inputs() -> str:
    """What a build's outcome depends on beyond its folder's `name()` (sources, CPU, torch and Python
    versions): the compiler and ninja it would run, as found on PATH (resolved), and Python's headers (the
    folder of `Python.h`, "-" where it is missing: a Debian / Ubuntu Python without python3-dev). A failed
    build is tried again once any of them changes."""
    found = (shutil.which(tool) for tool in (os.environ.get("CXX", "c++"), "ninja"))
    include = Path(sysconfig.get_paths()["include"])
    headers = str(include) if (include / "Python.h").is_file() else "-"
    return " ".join([*(os.path.realpath(path) if path else "-" for path in found), headers])


def _read_marker(marker: Path) -> tuple[str, str, float] | None:
    """(build inputs, reason, time written) of a remembered failed build, None where there is none."""
    try:
        inputs, _, reason = marker.read_text(encoding="utf-8").partition("\n")
        written = marker.stat().st_mtime
    except (OSError, UnicodeDecodeError):
        return None
    return inputs, reason.strip(), written


def _write_marker(marker: Path, inputs: str, reason: str) -> bool:
    """Remember a failed build; False where it cannot be (a read-only cache: the next run tries again)."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, lambda path: path.write_text(f"{inputs}\n{reason}\n", encoding="utf-8"), fsync=False)
    except OSError as err:
        logger.debug("cannot remember the failed build in %s: %s", marker, err)
        return False
    return True


def _error_line(err: BaseException) -> str:
    """The line of a build error that says what went wrong: the compiler's first `error:` line, else the last."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "error:" in line), lines[-1] if lines else type(err).__name__)


def _import_built(path: Path) -> ModuleType | None:
    """The built library at `path` (`_library`), imported as it is: its name already stands for these sources,
    this CPU and this torch, and asking `cpp_extension.load` instead costs ~85 ms a process (importing it, then
    ninja finding nothing to do). None where there is no build or it does not import (`load` then rebuilds it)."""
    if not path.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception:
        return None
    return module


__all__ = ["FOLDER", "HEADERS", "SOURCES", "amx_cpu", "build_folder", "built_extension", "extension", "has_hooks",
           "inference_only", "loaded", "name", "onednn_fuses", "runs_here", "tensor_version", "tile_kernels"]
