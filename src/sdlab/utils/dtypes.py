"""Weight dtypes by their short names (``fp32``, ``fp16``, ``bf16``, ``auto``), as flags and config files
spell them, and the dtype ``auto`` picks for a model on a device.

The names are plain strings so that argument parsers can list them without importing torch.

``auto`` (the default of `sdlab.load`, the CLI and the server) is chosen per model from measurements on a
2-core AMD EPYC with AVX512-BF16 (docs/performance.md):

- a large U-Net (>= `LARGE_MODEL_PARAMETERS`, SD1.5 / SD2 / SDXL) runs in bf16 where the device computes
  it natively: on a CPU with AVX512-BF16 or AMX a guided SD1.5 step costs 0.58 x the fp32 CPU time and the
  picture moves by at most a few levels of 255 (PSNR ~48 dB after 4 DPM++ 2M steps); on CUDA bf16 where
  supported, else fp16;
- a small one (the shipped sdlab-tiny) stays fp32: it is fast already, and in bf16 one of eight 20-step
  pictures ended as a different picture;
- a CPU without native bf16 emulates it (slower than fp32), so it stays fp32; other devices too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["AUTO", "DTYPE_CHOICES", "DTYPE_NAMES", "LARGE_MODEL_PARAMETERS", "auto_dtype", "cpu_has_native_bf16",
           "dtype_from_name", "requested_dtype"]

#: short name -> attribute of ``torch``
_TORCH_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_NAMES: tuple[str, ...] = tuple(_TORCH_NAMES)
AUTO = "auto"
DTYPE_CHOICES: tuple[str, ...] = (AUTO, *DTYPE_NAMES)       # what a --dtype flag accepts
LARGE_MODEL_PARAMETERS = 100_000_000                        # U-Net parameters from which `auto` may pick bf16


def dtype_from_name(name: str) -> torch.dtype:
    """``"fp16"`` -> ``torch.float16``; a ``KeyError`` for a name not in ``DTYPE_NAMES``."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def requested_dtype(name: str) -> torch.dtype | None:
    """A --dtype value as `sdlab.load` takes it: None for ``auto`` (chosen per model), else the dtype."""
    return None if name == AUTO else dtype_from_name(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX), as oneDNN uses them."""
    import torch

    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def auto_dtype(device: torch.device | str, unet_parameters: int) -> torch.dtype:
    """The dtype ``auto`` loads a model with on `device` (rules in the module docstring)."""
    import torch

    device = torch.device(device)
    if unet_parameters < LARGE_MODEL_PARAMETERS:
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32
