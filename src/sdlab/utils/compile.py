"""`torch.compile` for a loaded network, with a compile cache that outlives the process.

Inductor turns the U-Net's graph into fused C++ / OpenMP (CPU) or Triton (CUDA) kernels. Compiling costs
tens of seconds to minutes; inductor's FX-graph and AOTAutograd caches keep the compiled artifacts on disk,
keyed by the graph, shapes, dtypes, torch version and machine, so a later process with the same model and
image size only traces the Python (seconds) and reloads the kernels. Those caches live in
`$TORCHINDUCTOR_CACHE_DIR` when the user set it, else in `compile/` of sdlab's cache folder
(`$SDLAB_CACHE_DIR`, `$XDG_CACHE_HOME/sdlab` or `~/.cache/sdlab`).

Compilation is lazy: the first call with a new input shape compiles (a graph per shape, up to dynamo's
recompile limit, then eager); the module's parameters stay its own
(`state_dict`, LoRA merges and dtype casts see the same tensors).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from sdlab.utils.file_hashes import cache_dir

COMPILE_CACHE_FOLDER = "compile"


def compile_cache_dir() -> Path:
    """Where inductor keeps its compiled kernels for sdlab."""
    explicit = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(explicit) if explicit else cache_dir() / COMPILE_CACHE_FOLDER


def use_compile_cache() -> Path:
    """Point inductor's on-disk caches at `compile_cache_dir()` and switch them on; returns the folder."""
    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read when inductor first needs its cache folder
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


def compile_module(module: nn.Module) -> nn.Module:
    """Compile `module`'s forward in place with inductor (it keeps its parameters and names); returns it."""
    use_compile_cache()
    # One static graph per input shape (each cached on disk). Dynamo would otherwise switch to a shape-generic
    # graph at the second size it sees (hires fix, another --width, another U-Net instance in the process),
    # and inductor cannot lower the channels-last 1x1 convolutions of that graph (ValueRangeError).
    module.compile(backend="inductor", dynamic=False)
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether `compile_module` (or `nn.Module.compile`) has compiled `module`."""
    return getattr(module, "_compiled_call_impl", None) is not None


__all__ = ["compile_cache_dir", "compile_module", "is_compiled", "use_compile_cache"]
