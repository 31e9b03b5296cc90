"""Loading ESRGAN-family upscaler files from `.safetensors` or weights-only `.pth` / `.pt`: RRDBNet (ESRGAN,
Real-ESRGAN, BSRGAN) and Real-ESRGAN's compact SRVGGNet (`sdlab.models.srvgg`: `body.N` convs and PReLUs only).

Three key layouts name the same RRDBNet (`sdlab.models.rrdbnet`, whose names are Real-ESRGAN's):

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
conv with 4x or 16x the output's channels: the x2 and x1 models). Wrappers are unwrapped as spandrel's
`canonicalize_state_dict` does (what A1111 and ComfyUI load upscalers with): the tensors under the first of
`model_state_dict`, `state_dict`, `params_ema`, `params-ema`, `params`, `model`, `net`, else under a lone
top-level name, then without a common `module.` or `netG.` prefix (DataParallel, BasicSR). Files are read with `sdlab.checkpoints.io.read_checkpoint`, so a pickle that
would run code is refused. Anything else (a Stable Diffusion checkpoint, ESRGAN+'s extra 1x1 convs, a
missing or misshapen tensor) is a `CheckpointError` that says what was found.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdlab.checkpoints.components import meta_device_without_init
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import read_checkpoint, shapes_of
from sdlab.models.rrdbnet import RRDBNet, RRDBNetConfig
from sdlab.models.srvgg import SRVGGConfig, SRVGGNetCompact
from sdlab.utils.dtypes import auto_dtype

_WRAPPERS = ("model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model", "net")  # spandrel's order
_PREFIXES = ("module.", "netG.")
_BLOCK_NEW = re.compile(r"body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)")
_BLOCK_BSR = re.compile(r"RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)")
_BLOCK_OLD = re.compile(r"model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)")
_UP_NEW = re.compile(r"(?:conv_up|upconv)(\d+)\.(weight|bias)")
_OLD_TOP = re.compile(r"model\.(\d+)\.(weight|bias)")
_OLD_TRUNK = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)")
_COMPACT = re.compile(r"body\.(\d+)\.(weight|bias)")
_RENAMES = {"trunk_conv": "conv_body", "HRconv": "conv_hr"}


@dataclass
class Upscaler:
    """A loaded upscaler network and what it is: `net` maps (B, C, H, W) in [0, 1] to (B, C, sH, sW)."""

    net: RRDBNet | SRVGGNetCompact
    name: str                                # the file's stem, as A1111 lists upscalers

    @property
    def scale(self) -> int:
        return self.net.config.scale


def _unwrap(keys: list[str]) -> dict[str, str]:
    """Key without wrappers -> file key, unwrapped as spandrel's `canonicalize_state_dict` (module docstring).

    The file's nested dicts arrive flattened to dotted keys, where a wrapper looks like a layout's own first
    name (an ESRGAN file's `model.N`, a compact one's `body.N`): the most unwrapped reading that names an
    upscaler (`_layout`) wins, else the keys as they are."""
    readings = [_without_prefixes(reading) for reading in _unwrapped({k: k for k in keys})]
    return next((reading for reading in readings if _layout(reading)), readings[-1])


def _unwrapped(keys: dict[str, str]) -> list[dict[str, str]]:
    """spandrel's unwrapping of flattened keys, most unwrapped reading first: under the first wrapper present
    (`_WRAPPERS`), then under a lone top-level name; each also left as it is."""
    wrapper = next((w for w in _WRAPPERS if any(k.startswith(w + ".") for k in keys)), None)
    readings = []
    for stage in ([_under(keys, wrapper)] if wrapper else []) + [keys]:
        tops = {k.split(".", 1)[0] for k in stage}
        if len(tops) == 1:
            readings.append(_under(stage, tops.pop()))
        readings.append(stage)
    return readings


def _under(keys: dict[str, str], name: str) -> dict[str, str]:
    """The keys inside `name.`, without it."""
    return {k[len(name) + 1:]: file_key for k, file_key in keys.items() if k.startswith(name + ".")}


def _without_prefixes(keys: dict[str, str]) -> dict[str, str]:
    """`keys` without a prefix of `_PREFIXES` that all of them share (spandrel's `remove_common_prefix`)."""
    for prefix in _PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            keys = {k[len(prefix):]: file_key for k, file_key in keys.items()}
    return keys


def _layout(names: Collection[str]) -> str | None:
    """Which upscaler `names` lay out: "old" / "new" (the module docstring's table; BSRGAN counts as new),
    "compact" (Real-ESRGAN's SRVGGNet: only `body.N`, PReLU weights at `body.1`), or None."""
    if "model.0.weight" in names and any(_BLOCK_OLD.fullmatch(k) for k in names):
        return "old"
    if "conv_first.weight" in names and any(_BLOCK_NEW.fullmatch(k) or _BLOCK_BSR.fullmatch(k) for k in names):
        return "new"
    if "body.0.weight" in names and "body.1.weight" in names and all(_COMPACT.fullmatch(k) for k in names):
        return "compact"
    return None


def _old_layout_names(keys: list[str], path: Path) -> dict[str, str]:
    top = {int(m.group(1)) for k in keys if (m := _OLD_TOP.fullmatch(k))}
    trunk = {int(m.group(1)) for k in keys if (m := _OLD_TRUNK.fullmatch(k))}
    if len(trunk) != 1 or 0 not in top or (max(top) - 4) % 3:
        raise CheckpointError(f"{path}: an ESRGAN (old-arch) file without the expected model.N layers "
                              f"(top layers {sorted(top)}, trunk convs {sorted(trunk)})")
    ups = (max(top) - 4) // 3
    names = {0: "conv_first", 3 * ups + 2: "conv_hr", 3 * ups + 4: "conv_last"}
    names.update({3 * i: f"conv_ups.{i - 1}" for i in range(1, ups + 1)})
    out: dict[str, str] = {}
    for key in keys:
        if m := _BLOCK_OLD.fullmatch(key):
            out[key] = f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"
        elif m := _OLD_TRUNK.fullmatch(key):
            out[key] = f"conv_body.{m[2]}"
        elif (m := _OLD_TOP.fullmatch(key)) and int(m[1]) in names:
            out[key] = f"{names[int(m[1])]}.{m[2]}"
        else:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} in an ESRGAN (old-arch) file")
    return out


def _new_layout_names(keys: list[str], path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in keys:
        if m := _BLOCK_NEW.fullmatch(key) or _BLOCK_BSR.fullmatch(key):
            out[key] = f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"
        elif m := _UP_NEW.fullmatch(key):
            out[key] = f"conv_ups.{int(m[1]) - 1}.{m[2]}"
        else:
            module, _, kind = key.rpartition(".")
            module = _RENAMES.get(module, module)
            if module not in ("conv_first", "conv_body", "conv_hr", "conv_last") or kind not in ("weight", "bias"):
                raise CheckpointError(f"{path}: unexpected tensor {key!r} in a Real-ESRGAN (new-arch) file")
            out[key] = f"{module}.{kind}"
    return out


def rrdbnet_names(inner: dict[str, str], layout: str | None, path: Path) -> dict[str, str]:
    """File key -> `RRDBNet` name, for the unwrapped keys `inner` (`_unwrap`) of any layout of the module
    docstring's table (`layout`, `_layout` of them); decided from the names alone, so a large file of another
    kind is refused before any tensor is read."""
    names = list(inner)
    if any(".conv1x1." in k for k in names):
        raise CheckpointError(f"{path}: an ESRGAN+ file (extra conv1x1 layers); sdlab reads ESRGAN and Real-ESRGAN")
    if layout == "old":
        mapped = _old_layout_names(names, path)
    elif layout == "new":
        mapped = _new_layout_names(names, path)
    else:
        shown = ", ".join(names[:4])
        raise CheckpointError(f"{path}: not an ESRGAN / Real-ESRGAN upscaler (no conv_first + body.N.rdbK, "
                              f"model.0 + model.1.sub.N.RDBK or compact body.N tensors; it holds {len(names)} "
                              f"tensors: {shown}, ...)")
    return {inner[k]: v for k, v in mapped.items()}


def compact_config(shapes: Mapping[str, torch.Size], path: str | os.PathLike[str] = "upscaler") -> SRVGGConfig:
    """SRVGGNetCompact's sizes from its shapes: the last conv holds C_out * scale^2 channels, C_out = C_in."""
    last = max(int(k.split(".")[1]) for k in shapes)
    first, final = shapes["body.0.weight"], shapes.get(f"body.{last}.weight")
    if final is None or len(first) != 4 or len(final) != 4 or last % 2:
        raise CheckpointError(f"{path}: a compact upscaler whose last layer body.{last} is not a convolution")
    in_channels, sub_pixels = first[1], final[0]
    scale = math.isqrt(sub_pixels // in_channels)
    if scale < 1 or scale * scale * in_channels != sub_pixels:
        raise CheckpointError(f"{path}: the compact upscaler's last conv has {sub_pixels} channels, not "
                              f"{in_channels} x scale^2")
    return SRVGGConfig(in_channels=in_channels, out_channels=in_channels, features=first[0],
                       num_convs=(last - 2) // 2, scale=scale)


def config_from_shapes(shapes: Mapping[str, torch.Size], path: str | os.PathLike[str] = "upscaler") -> RRDBNetConfig:
    """The network's sizes, read from tensor shapes under `RRDBNet`'s names."""
    try:
        first, last = shapes["conv_first.weight"], shapes["conv_last.weight"]
        growth = shapes["body.0.rdb1.conv1.weight"][0]
    except KeyError as err:
        raise CheckpointError(f"{path}: the upscaler has no {err.args[0]} tensor") from None
    if len(first) != 4 or len(last) != 4:
        raise CheckpointError(f"{path}: conv_first / conv_last are not 3x3 convolutions ({tuple(first)}, {tuple(last)})")
    folded, out_channels = first[1], last[0]
    unshuffle = {4 * out_channels: 2, 16 * out_channels: 4}.get(folded, 1)     # Real-ESRGAN x2 / x1
    blocks = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("body."))
    ups = sum(1 for k in shapes if k.startswith("conv_ups.") and k.endswith(".weight"))
    return RRDBNetConfig(in_channels=folded // unshuffle ** 2, out_channels=out_channels, features=first[0],
                         growth=growth, num_blocks=blocks, num_upsamples=ups, unshuffle=unshuffle)


def _check_shapes(net: RRDBNet | SRVGGNetCompact, shapes: Mapping[str, torch.Size], path: Path) -> None:
    expected = {k: v.shape for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: the upscaler's tensors do not form an RRDBNet "
                              f"(missing: {', '.join(missing[:4]) or 'none'}; unexpected: {', '.join(extra[:4]) or 'none'})")
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(shapes[key])}, "
                                  f"the network read from the file needs {tuple(shape)}")


def _check_values(tensors: Mapping[str, Tensor], path: Path) -> None:
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key} holds {tensor.dtype}, not floating-point weights")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {key} holds NaN or infinite values")


def _network(state: Mapping[str, Tensor], where: Path) -> tuple[RRDBNet | SRVGGNetCompact, dict[str, str]]:
    """The network a state dict in any supported layout (module docstring) describes, on the meta device, and
    file key -> the network's name, from names and shapes only."""
    inner = _unwrap(list(state))
    layout = _layout(inner)
    compact = layout == "compact"
    if compact:
        names = {file_key: ours for ours, file_key in inner.items()}
    else:
        names = rrdbnet_names(inner, layout, where)
    file_shapes = shapes_of(state)
    shapes = {ours: file_shapes[key] for key, ours in names.items()}
    with meta_device_without_init():                                  # no initialiser runs on meta
        net = SRVGGNetCompact(compact_config(shapes, where)) if compact else RRDBNet(config_from_shapes(shapes, where))
    _check_shapes(net, shapes, where)
    return net, names


def upscaler_from_state(state: Mapping[str, Tensor], name: str = "upscaler", *, path: str | os.PathLike[str] | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Upscaler:
    """An `Upscaler` from a state dict in any supported layout (see the module docstring). A lazy state
    (`sdlab.checkpoints.io.LazyMapping`) is read only once names and shapes have been checked. `dtype` None is
    ``auto`` (`auto_dtype` for the network's size): fp32, every ESRGAN-family network being under 100 M parameters
    (the largest, RRDBNet x4, 16.7 M), where bf16 would move its pixels by up to 9/255 (README, sdlab upscale)."""
    where = Path(path) if path is not None else Path(name)
    net, names = _network(state, where)
    tensors = {ours: state[key] for key, ours in names.items()}
    _check_values(tensors, where)
    net.load_state_dict(tensors, assign=True)
    dtype = dtype or auto_dtype(device, sum(p.numel() for p in net.parameters()))
    return Upscaler(net.to(device=device, dtype=dtype).eval().requires_grad_(False), name)


def read_upscaler(path: str | os.PathLike[str]) -> RRDBNet | SRVGGNetCompact:
    """The network an upscaler file describes, on the meta device: read from its names and shapes only (a
    pickle's tensors on the meta device too), as `load_upscaler` would build it."""
    path = Path(path)
    state, _ = read_checkpoint(path, nested=True, shapes_only=True)
    return _network(state, path)[0]


def load_upscaler(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> Upscaler:
    """Read an upscaler file safely (`read_checkpoint`) and build its network (`dtype` None: ``auto``,
    `upscaler_from_state`)."""
    path = Path(path)
    state, _ = read_checkpoint(path, nested=True)
    return upscaler_from_state(state, path.stem, path=path, device=device, dtype=dtype)
