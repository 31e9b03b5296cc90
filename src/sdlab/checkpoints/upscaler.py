"""Loading ESRGAN-family upscaler files (RRDBNet) from `.safetensors` or weights-only `.pth` / `.pt`.

Three key layouts name the same network (`sdlab.models.rrdbnet`, whose names are Real-ESRGAN's):

| part            | Real-ESRGAN ("new arch")  | BSRGAN / RealSR            | ESRGAN ("old arch")              |
|-----------------|---------------------------|----------------------------|----------------------------------|
| first conv      | conv_first                | conv_first                 | model.0                          |
| RRDB n, RDB k   | body.n.rdbk.convj         | RRDB_trunk.n.RDBk.convj    | model.1.sub.n.RDBk.convj.0       |
| trunk conv      | conv_body                 | trunk_conv                 | model.1.sub.<num_blocks>         |
| upsample conv i | conv_up<i>                | upconv<i>                  | model.<3 i>                      |
| HR conv         | conv_hr                   | HRconv                     | model.<3 n + 2>                  |
| last conv       | conv_last                 | conv_last                  | model.<3 n + 4>                  |

(n = number of upsample stages; in the old layout `model.<3i - 1>` is the parameter-free nearest upsample
and `model.<3i + 1>` the LeakyReLU.) Every size is read from the tensors: features, growth channels,
number of blocks and of upsample stages, in / out channels, and Real-ESRGAN's pixel-unshuffle (an input
conv with 4x or 16x the output's channels: the x2 and x1 models). Training wrappers `params_ema` (preferred)
and `params` are unwrapped. Files are read with `sdlab.checkpoints.io.read_checkpoint`, so a pickle that
would run code is refused. Anything else (a Stable Diffusion checkpoint, ESRGAN+'s extra 1x1 convs, a
missing or misshapen tensor) is a `CheckpointError` that says what was found.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import read_checkpoint
from sdlab.models.rrdbnet import RRDBNet, RRDBNetConfig

_WRAPPERS = ("params_ema", "params")         # basicsr training files: EMA weights first
_BLOCK_NEW = re.compile(r"body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)")
_BLOCK_BSR = re.compile(r"RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)")
_BLOCK_OLD = re.compile(r"model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)")
_UP_NEW = re.compile(r"(?:conv_up|upconv)(\d+)\.(weight|bias)")
_OLD_TOP = re.compile(r"model\.(\d+)\.(weight|bias)")
_OLD_TRUNK = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)")
_RENAMES = {"trunk_conv": "conv_body", "HRconv": "conv_hr"}


@dataclass
class Upscaler:
    """A loaded upscaler network and what it is: `net` maps (B, C, H, W) in [0, 1] to (B, C, sH, sW)."""

    net: RRDBNet
    name: str                                # the file's stem, as A1111 lists upscalers

    @property
    def scale(self) -> int:
        return self.net.config.scale


def _unwrap(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors under `params_ema.` (else `params.`) when the file wraps them, else all of them."""
    for wrapper in _WRAPPERS:
        prefix = wrapper + "."
        inner = {k[len(prefix):]: state[k] for k in state if k.startswith(prefix)}
        if inner:
            return inner
    return {k: state[k] for k in state}


def _from_old_layout(state: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    top = {int(m.group(1)) for k in state if (m := _OLD_TOP.fullmatch(k))}
    trunk = {int(m.group(1)) for k in state if (m := _OLD_TRUNK.fullmatch(k))}
    if len(trunk) != 1 or 0 not in top or (max(top) - 4) % 3:
        raise CheckpointError(f"{path}: an ESRGAN (old-arch) file without the expected model.N layers "
                              f"(top layers {sorted(top)}, trunk convs {sorted(trunk)})")
    ups = (max(top) - 4) // 3
    names = {0: "conv_first", 3 * ups + 2: "conv_hr", 3 * ups + 4: "conv_last"}
    names.update({3 * i: f"conv_ups.{i - 1}" for i in range(1, ups + 1)})
    out: dict[str, Tensor] = {}
    for key in state:
        if m := _BLOCK_OLD.fullmatch(key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = state[key]
        elif m := _OLD_TRUNK.fullmatch(key):
            out[f"conv_body.{m[2]}"] = state[key]
        elif (m := _OLD_TOP.fullmatch(key)) and int(m[1]) in names:
            out[f"{names[int(m[1])]}.{m[2]}"] = state[key]
        else:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} in an ESRGAN (old-arch) file")
    return out


def _from_new_layout(state: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key in state:
        if m := _BLOCK_NEW.fullmatch(key) or _BLOCK_BSR.fullmatch(key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = state[key]
        elif m := _UP_NEW.fullmatch(key):
            out[f"conv_ups.{int(m[1]) - 1}.{m[2]}"] = state[key]
        else:
            module, _, kind = key.rpartition(".")
            module = _RENAMES.get(module, module)
            if module not in ("conv_first", "conv_body", "conv_hr", "conv_last") or kind not in ("weight", "bias"):
                raise CheckpointError(f"{path}: unexpected tensor {key!r} in a Real-ESRGAN (new-arch) file")
            out[f"{module}.{kind}"] = state[key]
    return out


def to_rrdbnet_keys(state: Mapping[str, Tensor], path: str | os.PathLike[str] = "upscaler") -> dict[str, Tensor]:
    """`state` (any layout of the module docstring's table, wrapped or not) under `RRDBNet`'s names."""
    path = Path(path)
    state = _unwrap(state)
    if any(".conv1x1." in k for k in state):
        raise CheckpointError(f"{path}: an ESRGAN+ file (extra conv1x1 layers); sdlab reads ESRGAN and Real-ESRGAN")
    if "model.0.weight" in state and any(_BLOCK_OLD.fullmatch(k) for k in state):
        return _from_old_layout(state, path)
    if "conv_first.weight" in state and any(_BLOCK_NEW.fullmatch(k) or _BLOCK_BSR.fullmatch(k) for k in state):
        return _from_new_layout(state, path)
    shown = ", ".join(list(state)[:4])
    raise CheckpointError(f"{path}: not an ESRGAN / Real-ESRGAN upscaler (no conv_first + body.N.rdbK or "
                          f"model.0 + model.1.sub.N.RDBK tensors; it holds {len(state)} tensors: {shown}, ...)")


def config_from_state(state: Mapping[str, Tensor], path: str | os.PathLike[str] = "upscaler") -> RRDBNetConfig:
    """The network's sizes, read from tensors already under `RRDBNet`'s names."""
    try:
        first, last = state["conv_first.weight"].shape, state["conv_last.weight"].shape
        growth = state["body.0.rdb1.conv1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"{path}: the upscaler has no {err.args[0]} tensor") from None
    folded, out_channels = first[1], last[0]
    unshuffle = {4 * out_channels: 2, 16 * out_channels: 4}.get(folded, 1)     # Real-ESRGAN x2 / x1
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    ups = sum(1 for k in state if k.startswith("conv_ups.") and k.endswith(".weight"))
    return RRDBNetConfig(in_channels=folded // unshuffle ** 2, out_channels=out_channels, features=first[0],
                         growth=growth, num_blocks=blocks, num_upsamples=ups, unshuffle=unshuffle)


def _check_tensors(net: RRDBNet, state: Mapping[str, Tensor], path: Path) -> None:
    expected = {k: v.shape for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: the upscaler's tensors do not form an RRDBNet "
                              f"(missing: {', '.join(missing[:4]) or 'none'}; unexpected: {', '.join(extra[:4]) or 'none'})")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(state[key].shape)}, "
                                  f"the network read from the file needs {tuple(shape)}")
        if not state[key].is_floating_point():
            raise CheckpointError(f"{path}: tensor {key} holds {state[key].dtype}, not floating-point weights")
        if not torch.isfinite(state[key]).all():
            raise CheckpointError(f"{path}: tensor {key} holds NaN or infinite values")


def upscaler_from_state(state: Mapping[str, Tensor], name: str = "upscaler", *, path: str | os.PathLike[str] | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Upscaler:
    """An `Upscaler` from a state dict in any supported layout (see the module docstring)."""
    where = Path(path) if path is not None else Path(name)
    tensors = to_rrdbnet_keys(state, where)
    config = config_from_state(tensors, where)
    with torch.device("meta"):
        net = RRDBNet(config)
    _check_tensors(net, tensors, where)
    net.load_state_dict(tensors, assign=True)
    return Upscaler(net.to(device=device, dtype=dtype).eval().requires_grad_(False), name)


def load_upscaler(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Upscaler:
    """Read an upscaler file safely (`read_checkpoint`) and build its network."""
    path = Path(path)
    state, _ = read_checkpoint(path, nested=True)
    return upscaler_from_state(state, path.stem, path=path, device=device, dtype=dtype)
