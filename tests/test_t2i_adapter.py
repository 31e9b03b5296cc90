"""T2I-Adapters as controls: sdlab's generate loop with a `ControlInput` whose model is a T2I-Adapter gives the
pictures of diffusers' StableDiffusionAdapterPipeline (full and light adapters) and StableDiffusionXLAdapterPipeline
(full_adapter_xl, with `adapter_conditioning_factor` as the control's end) on the same random weights, seed and
settings, within 2/255 per pixel. Each adapter is written as a diffusers folder, one diffusers-named file, and
TencentARC's original layout (safetensors and a .pth pickle); sdlab reads each, diffusers its own folder.

The reduced bundles have a factor-2 VAE, so the adapters pixel-unshuffle by 2 (SD1) and 4 (SDXL) where the
released ones take 8 and 16; their U-Nets have three levels so that every feature has its place.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionAdapterPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLAdapterPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import sdlab
from bundle_fixtures import as_released, randomize_, tiny_unet_config, write_diffusers_folder
from t2i_adapter_fixtures import diffusers_adapter, write_adapter
from picture_parity import CFG, MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, STEPS, max_pixel_diff
from sdlab.checkpoints import create
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.t2i_adapter import load_t2i_adapter, read_t2i_adapter
from sdlab.families import get_family
from sdlab.models.unet import adapter_blocks
from sdlab.cli import main
from sdlab.models import unet as unet_module
from sdlab.models.unet import copies_to
from sdlab.pipeline import control as control_module
from sdlab.pipeline.control import ControlInput, ControlledUNet, PreparedControl, adapter_features
from sdlab.pipeline.request import RequestError

NEGATIVE = "blurry"
EULER = dict(sampler="Euler", schedule="leading", init_noise="vp")
THREE_LEVELS = {"sd1": dict(channel_mult=(1, 2, 2), transformer_depth=(1, 1, 0)),
                "sdxl": dict(channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1), transformer_depth_middle=1)}
FOUR_LEVELS = dict(channel_mult=(1, 2, 2, 2), transformer_depth=(1, 1, 1, 0))
ODD = (40, 56)   # width, height: latents (h x w) 28 x 20 -> 14 x 10 -> 7 x 5, pooled to 4 x 3 rounding up, 3 x 2 down

pytestmark = pytest.mark.usefixtures("one_thread")


def _bundle(name: str, seed: int = 11, levels: dict | None = None):
    family = get_family(name)
    unet = replace(tiny_unet_config(family), **(levels or THREE_LEVELS[name]))
    bundle = create.new_bundle(name, tiny=True, unet=unet, seed=seed)
    randomize_(bundle.unet, seed)
    randomize_(bundle.vae, seed + 1)
    for i, te in enumerate(bundle.text_encoders):
        randomize_(te.model, seed + 2 + i)
    return bundle


def _pipeline(name: str, folder, levels: dict | None = None):
    bundle = _bundle(name, levels=levels)
    released = as_released(write_diffusers_folder(bundle, folder / "pipe"), SIZE // 2)
    base = (StableDiffusionPipeline if name == "sd1" else StableDiffusionXLPipeline).from_pretrained(
        released, local_files_only=True)
    base.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    return sdlab.load(released), base, bundle


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _pipeline("sd1", tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _pipeline("sdxl", tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def sd1_four(tmp_path_factory):
    """SD1 with four levels: at `ODD` a four-level adapter pools an odd side."""
    return _pipeline("sd1", tmp_path_factory.mktemp("sd1-four"), FOUR_LEVELS)


def _hint(seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (48, 40), "black")          # another size: both sides resize it to SIZE
    draw = ImageDraw.Draw(image)
    draw.rectangle([5 + seed * 7, 4, 30, 30], outline="white", width=3)
    draw.ellipse([20, 10 + seed * 3, 44, 36], fill=(200, 60 * seed, 90))
    return image


def _generators(batch):
    return [torch.Generator().manual_seed(SEED + i) for i in range(batch)]


def _not_vacuous(plain, reference):
    assert max_pixel_diff(plain, reference) > 5 * MAX_PIXEL_DIFF   # the adapter changes the picture


def test_features_join_the_blocks_a1111_names():
    """diffusers' placement in sdlab's blocks is the list A1111's extension and ComfyUI write down."""
    assert adapter_blocks(get_family("sd1").unet) == [2, 5, 8, 11]
    assert adapter_blocks(get_family("sd2").unet) == [2, 5, 8, 11]
    assert adapter_blocks(get_family("sdxl").unet) == [3, 5, 8]


@pytest.mark.parametrize("adapter_type, channels, downscale", [
    ("full_adapter", (32, 64, 64, 64), 2), ("full_adapter_xl", (64, 128, 128, 128), 4), ("light_adapter", (32, 64), 2)])
@pytest.mark.parametrize("layout", ["folder", "diffusers-file", "original"])
def test_features_are_diffusers(tmp_path, adapter_type, channels, downscale, layout):
    """Every feature of every kind and layout, on a hint whose sides halve to odd sizes (pooling rounds up, as
    diffusers' and the U-Net's stride-2 convs): 1e-6. A file without config.json learns the SDXL levels from the
    file's unshuffle factor: twice the latent factor (2 here) is SDXL's."""
    net = diffusers_adapter(adapter_type, channels, downscale)
    loaded = load_t2i_adapter(write_adapter(net, layout, tmp_path), latent_factor=2)
    odd = (9, 11) if adapter_type == "full_adapter_xl" else (18, 22)   # odd where the pooling is: 9, 11
    hint = torch.rand(1, 3, odd[0] * downscale, odd[1] * downscale)
    with torch.no_grad():
        ours, theirs = loaded.model(hint), net(hint)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["folder", "diffusers-file", "original", "original-pth"])
def test_full_adapter_txt2img_is_diffusers(sd1, tmp_path, layout):
    ours, base, _ = sd1
    net = diffusers_adapter("full_adapter", (32, 64, 64), 2)
    path = write_adapter(net, layout, tmp_path)
    pipe = StableDiffusionAdapterPipeline(**{k: v for k, v in base.components.items() if k != "image_encoder"},
                                          adapter=net)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, _hint(), negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                     width=SIZE, height=SIZE, adapter_conditioning_scale=0.8, num_images_per_prompt=2,
                     generator=_generators(2), output_type="np").images
    args = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, batch_size=2, **EULER)
    plain = ours.txt2img(PROMPT, NEGATIVE, **args)
    result = ours.txt2img(PROMPT, NEGATIVE, controls=[ControlInput(path, _hint(), 0.8)], **args)
    _not_vacuous(plain.images, reference)
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF


def test_light_adapter_txt2img_is_diffusers(sd1, tmp_path):
    ours, base, _ = sd1
    net = diffusers_adapter("light_adapter", (32, 64), 2, blocks=1, std=0.2)
    path = write_adapter(net, "original", tmp_path)
    assert read_t2i_adapter(path).config.kind == "light"
    pipe = StableDiffusionAdapterPipeline(**{k: v for k, v in base.components.items() if k != "image_encoder"},
                                          adapter=net)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, _hint(1), negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                     width=SIZE, height=SIZE, generator=_generators(1), output_type="np").images
    args = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, **EULER)
    plain = ours.txt2img(PROMPT, NEGATIVE, **args)
    result = ours.txt2img(PROMPT, NEGATIVE, controls=[ControlInput(path, _hint(1))], **args)
    _not_vacuous(plain.images, reference)
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("layout", ["folder", "original"])
def test_sdxl_adapter_with_conditioning_factor_is_diffusers(sdxl, tmp_path, layout):
    """diffusers' `adapter_conditioning_factor` f runs the adapter on steps i < int(N * f): the control's end f
    under diffusers' step rule. The original layout says nothing of which levels downsample: its unshuffle factor,
    twice the VAE's, does."""
    ours, base, _ = sdxl
    net = diffusers_adapter("full_adapter_xl", (64, 128, 128, 128), 4, std=0.15)
    path = write_adapter(net, layout, tmp_path)
    pipe = StableDiffusionXLAdapterPipeline(**{k: v for k, v in base.components.items()
                                               if k not in ("image_encoder", "feature_extractor")}, adapter=net)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, image=_hint(), negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                     guidance_scale=CFG, width=SIZE, height=SIZE, adapter_conditioning_scale=0.9,
                     adapter_conditioning_factor=0.6, generator=_generators(1), output_type="np").images
    args = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=SIZE, height=SIZE, **EULER)
    whole = ours.txt2img(PROMPT, NEGATIVE, controls=[ControlInput(path, _hint(), 0.9)], **args)
    result = ours.txt2img(PROMPT, NEGATIVE, controls=[ControlInput(path, _hint(), 0.9, 0.0, 0.6)], **args)
    _not_vacuous(whole.images, reference)        # the factor matters
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF


def test_a_one_channel_adapter_reads_the_hints_first_channel(tmp_path):
    """The sketch adapters read one channel (conv_in of 64 = 1 x 8^2 inputs); A1111's extension gives them the
    hint's first channel."""
    net = diffusers_adapter("full_adapter", (32, 64), 2, in_channels=1)
    loaded = load_t2i_adapter(write_adapter(net, "original", tmp_path))
    assert loaded.config.hint_channels == 1
    from sdlab.models.t2i_adapter import hint_input
    hint = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ours = loaded.model(hint_input(hint, loaded.config))
        theirs = net(hint[:, :1])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_soft_injection_takes_a1111s_adapter_scales(tmp_path):
    net = load_t2i_adapter(write_adapter(diffusers_adapter("full_adapter", (32, 64, 64, 64), 2), "folder", tmp_path))
    prepared = PreparedControl(net, torch.zeros(1, 3, 8, 8), 0.5, 0.0, 1.0, control_mode="prompt")
    assert prepared.scales(4) == pytest.approx([0.125, 0.31, 0.4125, 0.5])
    assert PreparedControl(net, torch.zeros(1, 3, 8, 8), 0.5, 0.0, 1.0).scales(4) == [0.5] * 4


def test_an_adapter_of_another_family_is_refused_with_one_line(sd1, sdxl, tmp_path):
    sd1_model, sdxl_model = sd1[0], sdxl[0]
    sd1_adapter = write_adapter(diffusers_adapter("full_adapter", (32, 64, 64), 2), "original", tmp_path / "a")
    with pytest.raises(RequestError, match=r"control 0: .*this T2I-Adapter gives features 32 at 1/2, 64 at 1/4, 64 "
                                           r"at 1/8 \(of the picture\) but the sdxl model takes 64 at 1/4, 128 at 1/4"):
        sdxl_model.txt2img(PROMPT, steps=1, width=SIZE, height=SIZE, controls=[ControlInput(sd1_adapter, _hint())])
    xl_adapter = load_t2i_adapter(write_adapter(diffusers_adapter("full_adapter_xl", (64, 128, 128, 128), 4),
                                                "folder", tmp_path / "b"))
    with pytest.raises(RequestError, match=r"control 2: .*reads pictures in steps of 4 pixels; 38x40 is not one"):
        adapter_features(xl_adapter, torch.zeros(1, 3, 40, 38), 2)


@pytest.mark.parametrize("keys, what", [
    ({"style_embedding": torch.zeros(1, 8, 16), "proj": torch.zeros(16, 8)}, "StyleAdapter"),
    ({"task_embedding.weight": torch.zeros(4, 4), "spatial_feat_mapping.0.weight": torch.zeros(4, 4)},
     "CoAdapter fuser"),
])
def test_style_adapters_and_coadapter_fusers_are_refused(sd1, tmp_path, keys, what):
    path = tmp_path / "t2iadapter_style_sd14v1.safetensors"
    save_file(keys, path)
    with pytest.raises(CheckpointError, match=what):
        read_t2i_adapter(path)
    with pytest.raises(RequestError, match=f"control 0: .*{what}"):
        sd1[0].txt2img(PROMPT, steps=1, width=SIZE, height=SIZE, controls=[ControlInput(path, _hint())])


class _OriginalResnetBlock(torch.nn.Module):
    """TencentARC's `ResnetBlock` with sk=True, transcribed from Mikubill/sd-webui-controlnet scripts/adapter.py
    (commit 6e7e1d8, the second definition, the one in force) for the layouts diffusers cannot write: kernel 3
    and the stride-2 conv `down_opt.op` (use_conv=True)."""

    def __init__(self, in_c, out_c, down, ksize, use_conv):
        super().__init__()
        ps = ksize // 2
        self.in_conv = torch.nn.Conv2d(in_c, out_c, ksize, 1, ps) if in_c != out_c else None
        self.block1 = torch.nn.Conv2d(out_c, out_c, 3, 1, 1)
        self.act = torch.nn.ReLU()
        self.block2 = torch.nn.Conv2d(out_c, out_c, ksize, 1, ps)
        self.down = down
        if down:
            self.down_opt = torch.nn.Module()
            self.down_opt.op = (torch.nn.Conv2d(in_c, in_c, 3, stride=2, padding=1) if use_conv
                                else torch.nn.AvgPool2d(2, 2))

    def forward(self, x):
        if self.down:
            x = self.down_opt.op(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        h = self.block2(self.act(self.block1(x)))
        return h + x


class _OriginalAdapter(torch.nn.Module):
    """TencentARC's `Adapter` (same source): PixelUnshuffle(8), conv_in, nums_rb blocks per level, every level
    but the first downsampling."""

    def __init__(self, channels, nums_rb, cin, ksize, use_conv, unshuffle=8):
        super().__init__()
        self.unshuffle = torch.nn.PixelUnshuffle(unshuffle)   # 8 in the source; the reduced VAEs take 2
        self.channels, self.nums_rb = channels, nums_rb
        self.body = torch.nn.ModuleList(
            _OriginalResnetBlock(channels[i - 1] if i and not j else channels[i], channels[i], bool(i and not j),
                                 ksize, use_conv)
            for i in range(len(channels)) for j in range(nums_rb))
        self.conv_in = torch.nn.Conv2d(cin, channels[0], 3, 1, 1)

    def forward(self, x):
        x = self.conv_in(self.unshuffle(x))
        features = []
        for i in range(len(self.channels)):
            for j in range(self.nums_rb):
                x = self.body[i * self.nums_rb + j](x)
            features.append(x)
        return features


@pytest.mark.parametrize("ksize, use_conv", [(3, True), (1, True), (3, False)])
def test_original_adapters_with_kernel_3_or_conv_downsampling_are_tencentarcs(tmp_path, ksize, use_conv):
    reference = _OriginalAdapter([16, 32, 64, 64], 2, 192, ksize, use_conv).eval()
    randomize_(reference, 3)
    path = tmp_path / "t2iadapter_x_sd14v1.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    cfg = load_t2i_adapter(path).config
    assert (cfg.kernel_size, cfg.conv_downsample, cfg.num_res_blocks, cfg.channels) == (ksize, use_conv, 2, (16, 32, 64, 64))
    loaded = load_t2i_adapter(path)
    hint = torch.rand(1, 3, 128, 64)   # even at every halving: the original's pooling rounds odd sizes down
    with torch.no_grad():
        for a, b in zip(loaded.model(hint), reference(hint), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _aligned_adding(base, x):
    """A1111's ControlNet extension adding a T2I-Adapter feature to an input block's output, transcribed from
    Mikubill/sd-webui-controlnet scripts/hook.py (commit 003bcda) `aligned_adding`, require_channel_alignment
    False (its inpainting case)."""
    base_h, base_w = base.shape[-2:]
    xh, xw = x.shape[-2:]
    if base_h != xh or base_w != xw:
        x = torch.nn.functional.interpolate(x, size=(base_h, base_w), mode="nearest")
    return base + x


def _extension_adapter(loaded, unshuffle):
    """TencentARC's `Adapter` as the extension runs it (`_OriginalAdapter`: its `Downsample(use_conv=False)` is
    `AvgPool2d(2, 2)`, rounding odd sizes down) with the weights of `loaded`."""
    cfg = loaded.config
    reference = _OriginalAdapter(list(cfg.channels), cfg.num_res_blocks, cfg.hint_channels * unshuffle ** 2,
                                 cfg.kernel_size, cfg.conv_downsample, unshuffle).eval()
    reference.load_state_dict(loaded.model.state_dict(), strict=True)
    return reference


def test_odd_sizes_are_diffusers_under_its_convention(sd1_four, tmp_path):
    """At `ODD` the adapter pools 7 x 5 latents; under diffusers' convention (the default) its features round up
    onto the U-Net's grid as diffusers' do: the picture within 2/255 of StableDiffusionAdapterPipeline's."""
    ours, base, _ = sd1_four
    net = diffusers_adapter("full_adapter", (32, 64, 64, 64), 2, std=0.15)
    path = write_adapter(net, "original", tmp_path)
    pipe = StableDiffusionAdapterPipeline(**{k: v for k, v in base.components.items() if k != "image_encoder"},
                                          adapter=net)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, _hint(), negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                     width=ODD[0], height=ODD[1], adapter_conditioning_scale=0.8, generator=_generators(1),
                     output_type="np").images
    args = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=ODD[0], height=ODD[1], **EULER)
    plain = ours.txt2img(PROMPT, NEGATIVE, **args)
    result = ours.txt2img(PROMPT, NEGATIVE, controls=[ControlInput(path, _hint(), 0.8)], **args)
    _not_vacuous(plain.images, reference)
    assert max_pixel_diff(result.images, reference) <= MAX_PIXEL_DIFF


def test_a1111_convention_pools_down_and_resizes_as_the_extension(sd1_four, tmp_path, monkeypatch):
    """Under A1111's convention (its API's units, --from-png of its pictures) the extension's rule: TencentARC's
    pooling rounds 7 x 5 down to 3 x 2 and `aligned_adding` resizes that onto the U-Net's 4 x 3 with nearest
    interpolation. sdlab's picture equals the one drawn with the transcribed adapter and aligned_adding in its
    place (measured 0/255), and is far from diffusers' rounding under the same convention (measured 120/255)."""
    ours = sd1_four[0]
    net = diffusers_adapter("full_adapter", (32, 64, 64, 64), 2, std=0.15)
    path = write_adapter(net, "original", tmp_path)
    args = dict(steps=STEPS, cfg_scale=CFG, seed=SEED, width=ODD[0], height=ODD[1], control_convention="a1111",
                **EULER)
    drawn = ours.txt2img(PROMPT, NEGATIVE, controls=[ControlInput(path, _hint(), 0.8)], **args).images
    extension = _extension_adapter(load_t2i_adapter(path, latent_factor=2), 2)
    with torch.no_grad():
        assert [tuple(f.shape[-2:]) for f in extension(torch.zeros(1, 3, ODD[1], ODD[0]))][-1] == (3, 2)
        assert [tuple(f.shape[-2:]) for f in net(torch.zeros(1, 3, ODD[1], ODD[0]))][-1] == (4, 3)
    with monkeypatch.context() as patch:
        patch.setattr(control_module, "adapter_features",
                      lambda _net, hint, _index, _convention="diffusers": tuple(extension(hint)))
        patch.setattr(unet_module, "_with_feature",
                      lambda h, feature, rows, *_: _aligned_adding(copies_to(h, rows), feature.to(h.dtype)))
        expected = ours.txt2img(PROMPT, NEGATIVE, controls=[ControlInput(path, _hint(), 0.8)], **args).images
    with monkeypatch.context() as patch:
        patch.setattr(control_module, "adapter_features",
                      lambda _net, hint, _index, _convention="diffusers": tuple(net(hint)))
        rounded_up = ours.txt2img(PROMPT, NEGATIVE, controls=[ControlInput(path, _hint(), 0.8)], **args).images
    assert max_pixel_diff(rounded_up, expected) > 5 * MAX_PIXEL_DIFF
    assert max_pixel_diff(drawn, expected) <= 1


@pytest.mark.parametrize("use_conv", [False, True])
def test_a1111_convention_features_are_the_extensions(tmp_path, use_conv):
    """The features themselves, on a hint whose sides pool odd (18 x 22 -> 9 x 11 -> 4 x 5 -> 2 x 2): TencentARC's
    AvgPool2d(2, 2) as transcribed (scripts/adapter.py @ 6e7e1d8) within 1e-5; a stride-2 conv rounds up under
    both conventions. A picture the floor pools to nothing is one error."""
    reference = _OriginalAdapter([16, 32, 64, 64], 2, 192, 1, use_conv).eval()
    randomize_(reference, 4)
    path = tmp_path / "t2iadapter_x_sd14v1.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    loaded = load_t2i_adapter(path)
    hint = torch.rand(1, 3, 18 * 8, 22 * 8)
    ours = adapter_features(loaded, hint, 0, "a1111")
    with torch.no_grad():
        theirs = reference(hint)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert ours[-1].shape[-2:] == ((3, 3) if use_conv else (2, 2))
    assert adapter_features(loaded, hint, 0)[-1].shape[-2:] == (3, 3)          # diffusers': rounded up
    if not use_conv:
        with pytest.raises(RequestError, match=r"control 1: .*pools pictures down to 1/64 of their size; 64x56 is"):
            adapter_features(loaded, torch.zeros(1, 3, 56, 64), 1, "a1111")


@pytest.mark.parametrize("mode, scales, uncond", [("balanced", (1, 1, 1, 1), True),
                                                  ("prompt", (0.25, 0.62, 0.825, 1.0), True),
                                                  ("control", (0.25, 0.62, 0.825, 1.0), False)])
def test_control_modes_on_an_adapter(tmp_path, mode, scales, uncond):
    """A1111's control modes on an adapter's features (hook.py: cfg_injection multiplies them by cond_mark, soft
    injection by strength x (0.25, 0.62, 0.825, 1)): "ControlNet is more important" gives the negative prompt's
    rows none and the prompt's rows the soft-scaled ones."""
    net = load_t2i_adapter(write_adapter(diffusers_adapter("full_adapter", (32, 64, 64, 64), 2), "folder", tmp_path))
    features = adapter_features(net, torch.rand(1, 3, 16, 16), 0)
    prepared = PreparedControl(net, torch.zeros(1, 3, 16, 16), 0.5, 0.0, 1.0, control_mode=mode, features=features)
    seen = {}

    def unet(x, t, context, y=None, **kwargs):
        seen.update(kwargs)
        return x

    ControlledUNet(unet, [prepared])(torch.zeros(4, 4, 8, 8), torch.zeros(4), torch.zeros(4, 3, 8),
                                     cond_mark=torch.tensor([0.0, 0.0, 1.0, 1.0]))
    for feature, given, scale in zip(features, seen["adapter"], scales, strict=True):
        cond = (feature * 0.5 * scale).expand(2, -1, -1, -1)
        torch.testing.assert_close(given[2:], cond, atol=1e-7, rtol=0)
        torch.testing.assert_close(given[:2], cond if uncond else torch.zeros_like(cond), atol=1e-7, rtol=0)


@pytest.mark.parametrize("adapter_type, unshuffle, factors, models", [
    ("full_adapter", 8, [8, 16, 32, 64], "SD1 / SD2"), ("full_adapter_xl", 16, [16, 16, 32, 32], "SDXL")])
def test_the_file_says_which_models_an_adapter_is_for(tmp_path, capsys, adapter_type, unshuffle, factors, models):
    """Without config.json the unshuffle factor decides, as the extension's conv_in width (256 / 768: SDXL's),
    whatever model the adapter is given to: an SD1 adapter on SDXL is described as SD1's."""
    path = write_adapter(diffusers_adapter(adapter_type, (32, 64, 64, 64), unshuffle), "original", tmp_path)
    loaded = load_t2i_adapter(path)
    assert loaded.config.feature_factors() == factors
    assert main(["inspect", str(path)]) == 0
    assert f"for             {models} models" in capsys.readouterr().out
    if models != "SDXL":
        with pytest.raises(CheckpointError, match=r"gives features 32 at 1/8, 64 at 1/16, 64 at 1/32, 64 at 1/64 "
                                                  r"\(of the picture\) but the sdxl model takes 320 at 1/16"):
            loaded.check_compatible(get_family("sdxl").unet, 8, "sdxl")


def test_a_style_adapter_is_named_by_inspect_and_as_a_model(tmp_path, capsys):
    path = tmp_path / "t2iadapter_style_sd14v1.safetensors"
    save_file({"style_embedding": torch.zeros(1, 8, 16), "proj": torch.zeros(16, 8), "ln_pre.weight": torch.zeros(16)},
              path)
    assert main(["inspect", str(path)]) != 0
    err = capsys.readouterr().err
    assert "a T2I StyleAdapter (style_embedding)" in err and "model.diffusion_model" not in err, err
    with pytest.raises(CheckpointError, match="a T2I StyleAdapter"):
        sdlab.load(path)
