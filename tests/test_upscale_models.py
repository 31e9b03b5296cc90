"""RRDBNet upscalers (ESRGAN old arch, Real-ESRGAN new arch, BSRGAN names): parity with spandrel's network on
random weights, tiled against untiled, safe loading of .safetensors / .pth, and the errors of bad files."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.upscaler import load_upscaler, upscaler_from_state
from sdlab.pipeline.upscale import (
    LATENT_UPSCALE_MODES,
    PLAIN_UPSCALERS,
    UpscaleError,
    latent_mode,
    resize_image,
    run_upscaler,
    tile_overlap_limit,
    upscale_by,
    upscale_image,
    upscale_latent,
)
from sdlab.pipeline.images import read_image

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES, GROWTH, BLOCKS = 16, 32, 2       # spandrel's RRDB fixes the growth at 32


def _spandrel_esrgan():
    """spandrel's ESRGAN architecture module, imported without spandrel's package __init__ (which pulls in
    every architecture, some needing torchvision)."""
    if "spandrel" not in sys.modules:
        root = Path(importlib.util.find_spec("spandrel").submodule_search_locations[0])
        for name, folder in (("spandrel", root), ("spandrel.architectures", root / "architectures"),
                             ("spandrel.__helpers", root / "__helpers")):
            stub = types.ModuleType(name)
            stub.__path__ = [str(folder)]
            sys.modules[name] = stub
    from spandrel.architectures import ESRGAN

    return ESRGAN


def _randomize(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * (0.02 if k.endswith("bias") else 0.08) for k, v in state.items()}


def old_arch_state(scale: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """ESRGAN old-arch keys (model.0, model.1.sub.N.RDBk.convj.0, ...) of spandrel's network, random weights."""
    net = _spandrel_esrgan().ESRGAN(in_nc=3, out_nc=3, num_filters=FEATURES, num_blocks=BLOCKS, scale=scale)
    return _randomize(net.state_dict(), seed)


def new_arch_state(scale: int, seed: int = 0, names: str = "real-esrgan") -> dict[str, torch.Tensor]:
    """Real-ESRGAN new-arch keys (x2 / x1: pixel-unshuffled input) or BSRGAN's, random weights."""
    fold = {4: 1, 2: 2, 1: 4}[scale]
    shapes = {"conv_first": (FEATURES, 3 * fold * fold), "conv_body": (FEATURES, FEATURES), "conv_up1": (FEATURES, FEATURES),
              "conv_up2": (FEATURES, FEATURES), "conv_hr": (FEATURES, FEATURES), "conv_last": (3, FEATURES)}
    for n in range(BLOCKS):
        for k in (1, 2, 3):
            for j in range(1, 6):
                c_in = FEATURES + (j - 1) * GROWTH
                shapes[f"body.{n}.rdb{k}.conv{j}"] = (FEATURES if j == 5 else GROWTH, c_in)
    state = {}
    for name, (c_out, c_in) in shapes.items():
        if names == "bsrgan":
            name = (name.replace("body.", "RRDB_trunk.").replace(".rdb", ".RDB").replace("conv_body", "trunk_conv")
                    .replace("conv_up", "upconv").replace("conv_hr", "HRconv").replace("RRDB_trunk_conv", "trunk_conv"))
        state[f"{name}.weight"] = torch.empty(c_out, c_in, 3, 3)
        state[f"{name}.bias"] = torch.empty(c_out)
    return _randomize(state, seed)


def reference(state: dict[str, torch.Tensor]):
    """spandrel's model for `state` (it converts every layout to the old arch itself)."""
    esrgan = _spandrel_esrgan()
    return esrgan.ESRGANArch().load({k: v.clone() for k, v in state.items()}), esrgan


def _image(width: int, height: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))   # (1, 3, H, W)


CASES = [("old", 8), ("old", 4), ("old", 2), ("old", 1), ("new", 4), ("new", 2), ("new", 1), ("bsrgan", 4)]


@pytest.mark.parametrize("layout,scale", CASES, ids=[f"{a}-x{s}" for a, s in CASES])
def test_rrdbnet_matches_spandrel(layout: str, scale: int) -> None:
    state = old_arch_state(scale) if layout == "old" else new_arch_state(scale, names="bsrgan" if layout == "bsrgan" else "real-esrgan")
    descriptor, _ = reference(state)
    ours = upscaler_from_state(state, "test")
    assert ours.scale == descriptor.scale == scale
    cfg = ours.net.config
    assert (cfg.features, cfg.growth, cfg.num_blocks, cfg.in_channels, cfg.out_channels) == (FEATURES, GROWTH, BLOCKS, 3, 3)
    x = _image(22, 18)                            # not a multiple of the unshuffle fold: padded and cropped
    with torch.no_grad():
        want = descriptor.model(x)
        got = ours.net(x)
    assert got.shape == want.shape == (1, 3, 18 * scale, 22 * scale)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_full_size_rrdbnet_matches_spandrel() -> None:
    """ESRGAN x4 at its real size (64 features, 23 blocks, spandrel's default init). Measured: max diff 0.0."""
    net = _spandrel_esrgan().ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4).eval()
    ours = upscaler_from_state(net.state_dict(), "full")
    x = _image(32, 24)
    with torch.no_grad():
        assert (ours.net(x) - net(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_compact_srvgg_matches_spandrel(scale: int, tmp_path: Path) -> None:
    """Real-ESRGAN's compact network (realesr-general-x4v3, animevideov3), read from a params wrapper."""
    _spandrel_esrgan()
    from spandrel.architectures.Compact import CompactArch, Compact

    state = _randomize(Compact(num_feat=FEATURES, num_conv=3, upscale=scale).state_dict(), 4)
    path = tmp_path / "realesr-general-x4v3.pth"
    torch.save({"params": state}, path)
    ours = load_upscaler(path)
    descriptor = CompactArch().load({k: v.clone() for k, v in state.items()})
    assert ours.scale == descriptor.scale == scale and ours.net.config.num_convs == 3
    x = _image(13, 11)
    with torch.no_grad():
        assert (ours.net(x) - descriptor.model(x)).abs().max().item() <= 1e-5
    image = Image.fromarray((_image(40, 36, seed=2)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    whole = np.asarray(run_upscaler(ours, image, tile=0), dtype=np.int16)
    tiled = np.asarray(run_upscaler(ours, image, tile=24, overlap=12), dtype=np.int16)
    diff = np.abs(whole - tiled)          # 5 convs: each tile's outer 5 px are disturbed and weigh up to 0.46
    assert diff.max() <= 6 and diff.mean() <= 0.3                # measured: max 2-4, mean 0.05-0.18



class _CountInitialisers(torch.overrides.TorchFunctionMode):
    """The `torch.nn.init` initialisers and in-place fills a build runs (those that reach this mode)."""

    NAMES = {"normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "constant_", "zeros_", "ones_", "zero_", "fill_", "erfinv_", "orthogonal_"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["old", "new", "compact"])
def test_the_network_is_built_on_meta_without_its_initialisers(layout: str) -> None:
    """The file's network is built on meta under `meta_device_without_init`, as the other builders are (plain
    ``torch.device("meta")`` ran every RRDBNet layer's initialisers: 702 calls for the full-size x4), and loads the
    same weights."""
    state = {"old": lambda: old_arch_state(4, seed=6), "new": lambda: new_arch_state(2, seed=6),
             "compact": lambda: _compact_state(6)}[layout]()
    with _CountInitialisers() as counted:
        ours = upscaler_from_state(dict(state))
    assert counted.calls == []
    assert all(not p.is_meta for p in ours.net.parameters())
    assert sorted(v.sum().item() for v in ours.net.state_dict().values()) == sorted(v.sum().item() for v in state.values())

def test_channels_blocks_and_features_come_from_the_tensors() -> None:
    esrgan = _spandrel_esrgan()
    net = esrgan.ESRGAN(in_nc=1, out_nc=1, num_filters=8, num_blocks=3, scale=2)
    state = _randomize(net.state_dict(), 3)
    ours = upscaler_from_state(state, "grey")
    cfg = ours.net.config
    assert (cfg.in_channels, cfg.out_channels, cfg.features, cfg.num_blocks, cfg.scale) == (1, 1, 8, 3, 2)
    net.load_state_dict(state)
    x = _image(9, 7)[:, :1]
    with torch.no_grad():
        assert (ours.net(x) - net(x)).abs().max().item() <= 1e-5
    grey = run_upscaler(ours, Image.new("RGB", (9, 7), (200, 10, 10)), tile=0)
    assert grey.mode == "L" and grey.size == (18, 14)


def test_pictures_smaller_than_the_fold_are_refused() -> None:
    upscaler = upscaler_from_state(new_arch_state(1), "x1")
    with pytest.raises(UpscaleError, match="at least 4 px"):
        run_upscaler(upscaler, Image.new("RGB", (3, 40)))
    assert run_upscaler(upscaler, Image.new("RGB", (5, 6)), tile=0).size == (5, 6)


@pytest.mark.parametrize("wrapper", ["params_ema", "params"])
def test_pth_wrappers_load_safely(tmp_path: Path, wrapper: str) -> None:
    state = new_arch_state(4, seed=1)
    other = new_arch_state(4, seed=2)
    path = tmp_path / "RealESRGAN_x4plus.pth"
    payload = {wrapper: state} if wrapper == "params" else {"params_ema": state, "params": other}
    torch.save(payload, path)
    ours = load_upscaler(path)
    assert ours.name == "RealESRGAN_x4plus" and ours.scale == 4
    descriptor, _ = reference(state)                 # params_ema wins over params
    x = _image(12, 10)
    with torch.no_grad():
        assert (ours.net(x) - descriptor.model(x)).abs().max().item() <= 1e-5


def _compact_state(seed: int) -> dict[str, torch.Tensor]:
    _spandrel_esrgan()
    from spandrel.architectures.Compact import Compact

    return _randomize(Compact(num_feat=FEATURES, num_conv=3, upscale=4).state_dict(), seed)


WRAPS = {
    "model_state_dict": lambda state: {"model_state_dict": state, "epoch": 3},
    "params-ema": lambda state: {"params-ema": state},
    "model": lambda state: {"model": state},
    "net": lambda state: {"net": state},
    "one key": lambda state: {"generator": state},
    "module.": lambda state: {f"module.{k}": v for k, v in state.items()},
    "netG.": lambda state: {f"netG.{k}": v for k, v in state.items()},
    "net, module.": lambda state: {"net": {f"module.{k}": v for k, v in state.items()}},
}


@pytest.mark.parametrize("wrap", list(WRAPS))
@pytest.mark.parametrize("layout", ["old", "new", "compact"])
def test_spandrels_wrappers_and_prefixes_are_unwrapped(tmp_path: Path, layout: str, wrap: str) -> None:
    """spandrel's canonicalize_state_dict (A1111's and ComfyUI's loader): wrapper keys, a lone key, and a
    common module. / netG. prefix; an ESRGAN file's own model.N and a compact one's body.N stay as they are."""
    state = {"old": old_arch_state(2, seed=5), "new": new_arch_state(2, seed=5), "compact": _compact_state(5)}[layout]
    path = tmp_path / "wrapped.pth"
    torch.save(WRAPS[wrap](state), path)
    ours = load_upscaler(path).net.state_dict()
    bare = upscaler_from_state(state).net.state_dict()
    assert ours.keys() == bare.keys() and all(torch.equal(ours[k], bare[k]) for k in bare)


def test_legacy_pickle_without_wrapper_loads(tmp_path: Path) -> None:
    """ESRGAN's own files: a bare state dict in torch's pre-1.6 (non-zip) format."""
    path = tmp_path / "ESRGAN_4x.pth"
    torch.save(old_arch_state(4), path, _use_new_zipfile_serialization=False)
    assert load_upscaler(path).scale == 4


def test_safetensors_in_fp16_loads_in_the_asked_dtype(tmp_path: Path) -> None:
    state = {k: v.half() for k, v in old_arch_state(2).items()}
    path = tmp_path / "2x_test.safetensors"
    save_file(state, str(path))
    ours = load_upscaler(path)
    assert ours.scale == 2 and next(ours.net.parameters()).dtype == torch.float32


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickle_with_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"params_ema": old_arch_state(4), "x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_upscaler(path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_bad_files_say_what_they_are(tmp_path: Path) -> None:
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3), "first_stage_model.x": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="not an ESRGAN / Real-ESRGAN upscaler"):
        upscaler_from_state(sd, "sd")
    state = new_arch_state(4)
    state["conv_hr.weight"] = torch.zeros(FEATURES, FEATURES + 1, 3, 3)
    with pytest.raises(CheckpointError, match="conv_hr.weight has shape"):
        upscaler_from_state(state, "bad")
    state = new_arch_state(4)
    del state["body.1.rdb2.conv3.bias"]
    with pytest.raises(CheckpointError, match="missing: body.1.rdb2.conv3.bias"):
        upscaler_from_state(state, "bad")
    state = new_arch_state(4)
    state["conv_last.bias"] = torch.full((3,), float("nan"))
    with pytest.raises(CheckpointError, match="NaN"):
        upscaler_from_state(state, "bad")
    plus = old_arch_state(4)
    plus["model.1.sub.0.RDB1.conv1x1.weight"] = torch.zeros(GROWTH, FEATURES, 1, 1)
    with pytest.raises(CheckpointError, match="ESRGAN\\+"):
        upscaler_from_state(plus, "plus")


TILED = [("old", 4, 2, 0.05), ("new", 2, 4, 0.05), ("new", 1, 16, 0.6)]


@pytest.mark.parametrize("layout,scale,max_diff,mean_diff", TILED, ids=[f"{a}-x{s}" for a, s, _, _ in TILED])
def test_tiled_matches_untiled(layout: str, scale: int, max_diff: int, mean_diff: float) -> None:
    """64 px tiles overlapping by 32 blend into the untiled picture: each tile's border (disturbed by zero
    padding) gets little weight. Pixel-unshuffled models (Real-ESRGAN x2, x1) are tiled on the fold's grid;
    their receptive field is 2x / 4x wider in pixels, so the same tile leaves more difference. Measured with
    these random weights (0..255): max 1 / 3 / 13, mean 0.012 / 0.029 / 0.47."""
    state = old_arch_state(scale) if layout == "old" else new_arch_state(scale)
    upscaler = upscaler_from_state(state, "t")
    image = Image.fromarray((_image(70, 54, seed=5)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    whole = np.asarray(run_upscaler(upscaler, image, tile=0), dtype=np.int16)
    tiled = np.asarray(run_upscaler(upscaler, image, tile=64, overlap=32), dtype=np.int16)
    assert tiled.shape == whole.shape == (54 * scale, 70 * scale, 3)
    diff = np.abs(whole - tiled)
    assert diff.max() <= max_diff and diff.mean() <= mean_diff
    one_tile = np.asarray(run_upscaler(upscaler, image, tile=96, overlap=32), dtype=np.int16)
    assert np.array_equal(one_tile, whole)          # a picture inside one tile is one untiled call


def test_a1111_scale_semantics() -> None:
    """Network passes until the picture is large enough, then Lanczos to the target (A1111's Upscaler.upscale)."""
    upscaler = upscaler_from_state(old_arch_state(2), "x2")
    image = Image.new("RGB", (10, 6), (40, 90, 200))
    assert upscale_image(image, upscaler, (20, 12), tile=0).size == (20, 12)     # one pass, no resize
    assert upscale_image(image, upscaler, (15, 9), tile=0).size == (15, 9)       # one pass, Lanczos down
    assert upscale_image(image, upscaler, (70, 42), tile=0).size == (70, 42)     # three passes (x8), then down
    once = run_upscaler(upscaler, image, tile=0)
    exact = upscale_image(image, upscaler, (20, 12), tile=0)
    assert np.array_equal(np.asarray(once), np.asarray(exact))
    assert np.array_equal(np.asarray(upscale_image(image, "None", (25, 15))), np.asarray(upscale_image(image, "lanczos", (25, 15))))
    lanczos = upscale_image(image, "Lanczos", (25, 15))
    assert np.array_equal(np.asarray(lanczos), np.asarray(image.resize((25, 15), Image.Resampling.LANCZOS)))
    with pytest.raises(UpscaleError, match="unknown upscaler .*Lanczos, Nearest or None"):
        upscale_image(image, "bicubic-ish", (20, 12))
    with pytest.raises(UpscaleError, match="beyond the limit"):
        upscale_image(image, "Lanczos", (100_000, 100_000))


def test_a1111_first_pass_and_one_x_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111's Upscaler.upscale: a first pass even at scale 1 (then Lanczos back), none below 1, and a pass that
    leaves the size unchanged (a 1x model) is the last."""
    from sdlab.pipeline import upscale as upscale_module

    passes = []
    real = upscale_module.run_upscaler
    monkeypatch.setattr(upscale_module, "run_upscaler", lambda *a, **k: passes.append(1) or real(*a, **k))
    image = Image.new("RGB", (12, 8), (40, 90, 200))
    one_x = upscaler_from_state(old_arch_state(1), "x1")
    once = real(one_x, image, tile=0)
    assert once.size == image.size and np.asarray(once).tolist() != np.asarray(image).tolist()
    assert np.array_equal(np.asarray(upscale_image(image, one_x, (12, 8), tile=0)), np.asarray(once))
    assert len(passes) == 1                                   # at its own scale: run once
    twice = upscale_image(image, one_x, (24, 16), tile=0)
    assert len(passes) == 2                                   # scale 2: one pass, then Lanczos (not three)
    assert np.array_equal(np.asarray(twice), np.asarray(once.resize((24, 16), Image.Resampling.LANCZOS)))
    x2 = upscaler_from_state(old_arch_state(2), "x2")
    assert upscale_image(image, x2, (12, 8), tile=0).size == (12, 8) and len(passes) == 3   # scale 1: a pass
    assert upscale_image(image, x2, (6, 4), tile=0).size == (6, 4) and len(passes) == 3     # below 1: none


def test_resize_image_runs_the_upscaler_only_to_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111's `images.resize_image` (the hires fix): no network pass unless the target is larger (cover scale
    > 1); then `Upscaler.upscale` by that scale (its size rounded down to 8) and Lanczos to the target."""
    from sdlab.pipeline import upscale as upscale_module

    passes = []
    real = upscale_module.run_upscaler
    monkeypatch.setattr(upscale_module, "run_upscaler", lambda *a, **k: passes.append(1) or real(*a, **k))
    x2 = upscaler_from_state(old_arch_state(2), "x2")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(resize_image(image, x2, (24, 16), tile=0)), np.asarray(image)) and not passes
    smaller = resize_image(image, x2, (16, 8), tile=0)                             # cover scale 2/3: Lanczos only
    assert not passes and np.array_equal(np.asarray(smaller), np.asarray(image.resize((16, 8), Image.Resampling.LANCZOS)))
    larger = resize_image(image, x2, (36, 20), tile=0)             # scale 1.5: one pass, 48x32 -> 32x24 -> 36x20
    once = real(x2, image, tile=0).resize((32, 24), Image.Resampling.LANCZOS).resize((36, 20), Image.Resampling.LANCZOS)
    assert len(passes) == 1 and np.array_equal(np.asarray(larger), np.asarray(once))
    for name in ("None", "none"):
        none = resize_image(image, name, (48, 32))
        assert np.array_equal(np.asarray(none), np.asarray(image.resize((48, 32), Image.Resampling.LANCZOS)))


def test_alpha_is_resized_and_kept() -> None:
    upscaler = upscaler_from_state(old_arch_state(2), "x2")
    image = Image.new("RGBA", (8, 8), (10, 20, 30, 128))
    out = run_upscaler(upscaler, image, tile=0)
    assert out.mode == "RGBA" and out.size == (16, 16) and out.getpixel((3, 3))[3] == 128
    grey = upscaler_from_state(_randomize(_spandrel_esrgan().ESRGAN(in_nc=1, out_nc=1, num_filters=8, num_blocks=2,
                                                                    scale=2).state_dict(), 4), "grey")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 10, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    out = run_upscaler(grey, image, tile=0)           # a grey model: its L picture, and the alpha put back
    assert out.mode == "LA" and out.size == (20, 16)
    plain = run_upscaler(grey, image.convert("L"), tile=0)
    assert np.array_equal(np.asarray(out.getchannel("L")), np.asarray(plain))
    alpha = image.getchannel("A").resize((20, 16), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(alpha))


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_grey_pictures_are_scaled_as_files_are_read(channels: int, tmp_path: Path) -> None:
    """A 16-bit greyscale picture given to the Python API is scaled to 8 bits as the CLI's reader scales it
    from a file (`read_image`), not clipped to white by Pillow's convert."""
    net = _spandrel_esrgan().ESRGAN(in_nc=channels, out_nc=channels, num_filters=8, num_blocks=2, scale=2)
    upscaler = upscaler_from_state(_randomize(net.state_dict(), 5), "model")
    wide = np.random.default_rng(1).integers(0, 65536, (9, 11), dtype=np.uint16)
    picture = Image.fromarray(wide)                    # mode I;16
    picture.save(tmp_path / "grey16.png")
    as_read = read_image(tmp_path / "grey16.png")
    assert as_read.mode == "L" and np.asarray(as_read).mean() < 200
    for image in (picture, picture.convert("I")):
        out = run_upscaler(upscaler, image, tile=0)
        assert np.array_equal(np.asarray(out), np.asarray(run_upscaler(upscaler, as_read, tile=0)))
        assert np.array_equal(np.asarray(upscale_by(image, upscaler, 2.0)), np.asarray(upscale_by(as_read, upscaler, 2.0)))


@pytest.mark.parametrize("name", list(LATENT_UPSCALE_MODES))
def test_latent_upscale_modes_are_a1111s(name: str) -> None:
    z = torch.randn(1, 4, 8, 12)
    mode, antialias = latent_mode(name)
    got = upscale_latent(z, 12, 18, name)
    want = torch.nn.functional.interpolate(z, size=(12, 18), mode=mode, antialias=antialias)
    assert torch.equal(got, want)


def test_latent_short_names_and_errors() -> None:
    assert latent_mode("bicubic-antialiased") == ("bicubic", True)
    assert latent_mode("  latent (NEAREST-exact) ") == ("nearest-exact", False)
    assert latent_mode("antialiased") == ("bilinear", True)
    with pytest.raises(UpscaleError, match="unknown latent upscale mode"):
        latent_mode("lanczos")
    assert math.isclose(upscale_latent(torch.ones(1, 4, 4, 4), 8, 8, "nearest-exact").mean().item(), 1.0)


@pytest.mark.parametrize("name", ["Nearest", "nearest", " NEAREST "])
def test_nearest_is_a1111s_pixel_upscaler_not_a_latent_mode(name: str) -> None:
    """A1111's "Nearest" is `UpscalerNearest` (a PIL resize); its latent mode is "Latent (nearest)"."""
    with pytest.raises(UpscaleError, match="unknown latent upscale mode"):
        latent_mode(name)
    assert latent_mode("Latent (nearest)") == ("nearest", False)
    assert name.strip().lower() in PLAIN_UPSCALERS


def test_a_tile_overlap_past_half_the_tile_is_named_with_its_limit() -> None:
    """The one rule `sdlab upscale --tile-overlap` and the A1111 API's ESRGAN_tile_overlap refuse by: tiles share
    at most half a tile (rounded down); no tiles (0) have no limit."""
    assert tile_overlap_limit(16, 8) is None and tile_overlap_limit(17, 8) is None
    assert tile_overlap_limit(16, 9) == 8 and tile_overlap_limit(16, 15) == 8 and tile_overlap_limit(17, 9) == 8
    assert tile_overlap_limit(192, 97) == 96 and tile_overlap_limit(192, 32) is None
    assert tile_overlap_limit(0, 500) is None


def test_a_request_whose_hires_tiles_overlap_past_half_a_tile_is_refused() -> None:
    """The Python API's hires upscaler tiles (GenerationRequest.hr_upscaler_tile / _overlap) keep the rule the A1111
    API's ESRGAN_tile options and `sdlab upscale` keep: 16 / 15 (a network run per pixel) is refused by the request,
    whatever door sends it; half a tile and no tiles draw."""
    from sdlab.pipeline.request import GenerationRequest, RequestError, resolve

    def resolved(tile: int, overlap: int) -> GenerationRequest:
        return resolve(GenerationRequest(prompt="x", hr_scale=2, hr_upscaler="Lanczos", hr_upscaler_tile=tile,
                                         hr_upscaler_tile_overlap=overlap),
                       default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)

    with pytest.raises(RequestError, match=r"hr_upscaler_tile_overlap must be at most half of hr_upscaler_tile: "
                                           r"15 with a tile of 16 \(at most 8\)"):
        resolved(16, 15)
    assert (resolved(16, 8).hr_upscaler_tile_overlap, resolved(0, 500).hr_upscaler_tile) == (8, 0)


@pytest.mark.parametrize("tile", [1, 8, 15])
def test_a_request_whose_hires_tiles_are_below_16_pixels_is_refused(tile: int) -> None:
    """A hires upscaler tile of 1..15 pixels (a network run per few pixels) is refused by the request, as `sdlab
    upscale --tile` and the A1111 API's ESRGAN_tile refuse it (`upscale.tile_too_small`); before, the Python API
    drew it. 0 (no tiles) and 16 draw."""
    from sdlab.pipeline.request import GenerationRequest, RequestError, resolve
    from sdlab.pipeline.upscale import tile_too_small

    def resolved(tile: int) -> GenerationRequest:
        return resolve(GenerationRequest(prompt="x", hr_scale=2, hr_upscaler="Lanczos", hr_upscaler_tile=tile,
                                         hr_upscaler_tile_overlap=0),
                       default_size=64, default_sampler="Euler", default_schedule="karras", factor=8)

    with pytest.raises(RequestError, match=rf"hr_upscaler_tile {tile} is too small; use 16 or more pixels"):
        resolved(tile)
    assert tile_too_small(tile) and not tile_too_small(0) and not tile_too_small(16)
    assert (resolved(0).hr_upscaler_tile, resolved(16).hr_upscaler_tile) == (0, 16)


@pytest.mark.parametrize("tile, overlap", [(8, 0), (15, 4), (-1, 0), (32, 17), (64, -1)])
def test_the_python_apis_upscaler_tiles_keep_the_doors_rule(tile: int, overlap: int) -> None:
    """`run_upscaler` / `upscale_by` (the Python API) refuse the tiles the doors refuse (`tile_too_small`,
    `tile_overlap_limit`): before, a tile of 8 px ran the network once per few pixels. 0 and 16 / 8 draw."""
    upscaler = upscaler_from_state(new_arch_state(1), "x1")
    picture = Image.new("RGB", (20, 20), (120, 60, 30))
    with pytest.raises(UpscaleError, match="upscaler tile"):
        run_upscaler(upscaler, picture, tile=tile, overlap=overlap)
    with pytest.raises(UpscaleError, match="upscaler tile"):
        upscale_by(picture, upscaler, 2, tile=tile, overlap=overlap)
    assert run_upscaler(upscaler, picture, tile=0).size == run_upscaler(upscaler, picture, tile=16, overlap=8).size
