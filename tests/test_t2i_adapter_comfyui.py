"""T2I-Adapters under control_convention "comfyui", against ComfyUI's own lines transcribed below
(comfyanonymous/ComfyUI, comfy/t2i_adapter/adapter.py `Downsample` / `ResnetBlock` / `Adapter` / `extractor` /
`Adapter_light`, comfy/controlnet.py `T2IAdapter.scale_image_to` / `get_control`, master of 2024-2025): its average
pooling pads an odd side by one zero on each end (`padding = [h % 2, w % 2]`, counted in the mean) where diffusers
rounds up with ceil_mode; a one-channel adapter reads the mean of the hint's channels; the hint is drawn at the
picture's size rounded up to a multiple of the adapter's pixel-unshuffle. The reduced bundles have a factor-2
VAE, so the adapters unshuffle by 2 (SD1) and 4 (SDXL) where ComfyUI's take 8 and 16."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from t2i_adapter_fixtures import diffusers_adapter, write_adapter
from test_comfyui_controlnet import common_upscale, load_image
from test_t2i_adapter import _bundle, _hint
from sdlab.checkpoints.t2i_adapter import load_t2i_adapter
from sdlab.pipeline.control import ControlInput, adapter_features, prepare_controls
from sdlab.pipeline.request import RequestError

pytestmark = pytest.mark.usefixtures("one_thread")


class _Downsample(torch.nn.Module):
    """ComfyUI's `Downsample` (adapter.py): a stride-2 conv, or AvgPool2d(2, 2) whose padding is set per call."""

    def __init__(self, channels, use_conv):
        super().__init__()
        self.use_conv = use_conv
        self.op = (torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv
                   else torch.nn.AvgPool2d(kernel_size=2, stride=2))

    def forward(self, x):
        if not self.use_conv:
            padding = [x.shape[2] % 2, x.shape[3] % 2]
            self.op.padding = padding
        return self.op(x)


class _ResnetBlock(torch.nn.Module):
    """ComfyUI's `ResnetBlock` with sk=True (the loader's): [down_opt] [in_conv], x + block2(relu(block1(x)))."""

    def __init__(self, in_c, out_c, down, ksize, use_conv):
        super().__init__()
        ps = ksize // 2
        self.in_conv = torch.nn.Conv2d(in_c, out_c, ksize, 1, ps) if in_c != out_c else None
        self.block1 = torch.nn.Conv2d(out_c, out_c, 3, 1, 1)
        self.act = torch.nn.ReLU()
        self.block2 = torch.nn.Conv2d(out_c, out_c, ksize, 1, ps)
        self.down = down
        if down:
            self.down_opt = _Downsample(in_c, use_conv)

    def forward(self, x):
        if self.down:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.block2(self.act(self.block1(x))) + x


class _Adapter(torch.nn.Module):
    """ComfyUI's `Adapter`: SD levels 1..3 downsample, xl's level 2 alone (level 1 widens without it);
    `unshuffle` is `unshuffle_amount` (8, 16 for xl) scaled to the reduced VAE."""

    def __init__(self, channels, nums_rb, cin, ksize, use_conv, xl, unshuffle):
        super().__init__()
        no_down, down = ([1], [2]) if xl else ([], [3, 2, 1])
        self.unshuffle_amount = unshuffle
        self.unshuffle = torch.nn.PixelUnshuffle(unshuffle)
        self.channels, self.nums_rb = channels, nums_rb
        self.body = torch.nn.ModuleList(
            _ResnetBlock(channels[i - 1] if (i in down or i in no_down) and j == 0 else channels[i], channels[i],
                         i in down and j == 0, ksize, use_conv)
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


class _LightBlock(torch.nn.Module):
    def __init__(self, in_c):
        super().__init__()
        self.block1 = torch.nn.Conv2d(in_c, in_c, 3, 1, 1)
        self.act = torch.nn.ReLU()
        self.block2 = torch.nn.Conv2d(in_c, in_c, 3, 1, 1)

    def forward(self, x):
        return self.block2(self.act(self.block1(x))) + x


class _Extractor(torch.nn.Module):
    """ComfyUI's `extractor` (Adapter_light's level): [Downsample(use_conv=False)], 1x1 in, light blocks, 1x1 out."""

    def __init__(self, in_c, inter_c, out_c, nums_rb, down):
        super().__init__()
        self.in_conv = torch.nn.Conv2d(in_c, inter_c, 1, 1, 0)
        self.body = torch.nn.Sequential(*(_LightBlock(inter_c) for _ in range(nums_rb)))
        self.out_conv = torch.nn.Conv2d(inter_c, out_c, 1, 1, 0)
        self.down = down
        if down:
            self.down_opt = _Downsample(in_c, use_conv=False)

    def forward(self, x):
        if self.down:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class _AdapterLight(torch.nn.Module):
    def __init__(self, channels, nums_rb, cin, unshuffle):
        super().__init__()
        self.unshuffle_amount = unshuffle
        self.unshuffle = torch.nn.PixelUnshuffle(unshuffle)
        self.body = torch.nn.ModuleList(
            _Extractor(cin if i == 0 else channels[i - 1], channels[i] // 4, channels[i], nums_rb, i != 0)
            for i in range(len(channels)))

    def forward(self, x):
        x = self.unshuffle(x)
        features = []
        for level in self.body:
            x = level(x)
            features.append(x)
        return features


def scale_image_to(t2i_model, width, height):
    """comfy/controlnet.py `T2IAdapter.scale_image_to`."""
    unshuffle_amount = t2i_model.unshuffle_amount
    width = math.ceil(width / unshuffle_amount) * unshuffle_amount
    height = math.ceil(height / unshuffle_amount) * unshuffle_amount
    return width, height


def comfyui_features(t2i_model, channels_in, picture, width, height):
    """comfy/controlnet.py `T2IAdapter.get_control`'s hint and features for a picture of `width` x `height`
    (LoadImage, scale_image_to, common_upscale nearest-exact / center, the mean of a one-channel adapter)."""
    width, height = scale_image_to(t2i_model, width, height)
    cond_hint = common_upscale(load_image(picture).movedim(-1, 1), width, height, "nearest-exact", "center").float()
    if channels_in == 1 and cond_hint.shape[1] > 1:
        cond_hint = torch.mean(cond_hint, 1, keepdim=True)
    with torch.no_grad():
        return t2i_model(cond_hint)


def _comfyui_model(loaded, xl=False):
    """ComfyUI's network of `loaded`'s kind with `loaded`'s weights."""
    cfg, unshuffle = loaded.config, loaded.config.unshuffle
    cin = cfg.hint_channels * unshuffle ** 2
    if cfg.kind == "light":
        model = _AdapterLight(list(cfg.channels), cfg.num_res_blocks, cin, unshuffle)
    else:
        model = _Adapter(list(cfg.channels), cfg.num_res_blocks, cin, cfg.kernel_size, cfg.conv_downsample, xl,
                         unshuffle)
    model.load_state_dict(loaded.model.state_dict(), strict=True)
    return model.eval()


@pytest.mark.parametrize("adapter_type, channels, downscale, xl", [
    ("full_adapter", (32, 64, 64, 64), 2, False), ("light_adapter", (32, 64, 64, 64), 2, False),
    ("full_adapter_xl", (64, 128, 128, 128), 4, True)])
def test_comfyui_convention_features_are_comfyuis(tmp_path, adapter_type, channels, downscale, xl):
    """On a hint whose sides pool odd (18 x 22 -> 9 x 11 -> 5 x 6 -> 3 x 3; xl: 9 x 11 -> 5 x 6), the features
    under comfyui are ComfyUI's padded pooling within 1e-5, and not diffusers' ceil_mode (which averages other
    cells)."""
    net = diffusers_adapter(adapter_type, channels, downscale, std=0.15)
    loaded = load_t2i_adapter(write_adapter(net, "original", tmp_path), latent_factor=2)
    reference = _comfyui_model(loaded, xl)
    odd = (9, 11) if xl else (18, 22)
    hint = torch.rand(1, 3, odd[0] * downscale, odd[1] * downscale)
    ours = adapter_features(loaded, hint, 0, "comfyui")
    with torch.no_grad():
        theirs = reference(hint)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    diffusers = adapter_features(loaded, hint, 0)
    assert [f.shape for f in diffusers] == [f.shape for f in ours]            # both round up ...
    assert (diffusers[-1] - ours[-1]).abs().max() > 1e-3                        # ... averaging other cells


def test_a_one_channel_adapter_reads_the_channels_mean_under_comfyui(tmp_path):
    """ComfyUI gives a one-channel adapter (the sketch models) torch.mean of the hint's channels; A1111's rule
    (the first channel) stays that of the other conventions."""
    net = diffusers_adapter("full_adapter", (32, 64), 2, in_channels=1)
    loaded = load_t2i_adapter(write_adapter(net, "original", tmp_path), latent_factor=2)
    reference = _comfyui_model(loaded)
    hint = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        theirs = reference(torch.mean(hint, 1, keepdim=True))
        first = net(hint[:, :1])
    for a, b in zip(adapter_features(loaded, hint, 0, "comfyui"), theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(adapter_features(loaded, hint, 0), first, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def sdxl_bundle():
    return _bundle("sdxl")


@pytest.mark.parametrize("channels_in", [3, 1])
def test_a_comfyui_hint_is_drawn_at_the_size_rounded_to_the_unshuffle(sdxl_bundle, tmp_path, channels_in):
    """An SDXL adapter unshuffles by twice the latent factor (here 4): a 42 x 34 picture (latents 21 x 17) is no
    multiple of it. ComfyUI draws the hint at 44 x 36 (scale_image_to, the picture cut about its centre to that
    shape) and pools it onto the U-Net's grid; sdlab's prepared features under comfyui are those within 1e-5 of
    their largest value.
    Under diffusers' convention the size is still refused."""
    net = diffusers_adapter("full_adapter_xl", (64, 128, 128, 128), 4, std=0.15, in_channels=channels_in)
    path = write_adapter(net, "original", tmp_path)
    loaded = load_t2i_adapter(path, latent_factor=2)
    picture = _hint(1)
    [prepared] = prepare_controls(sdxl_bundle, [ControlInput(loaded, picture, 0.7)], 42, 34, "comfyui",
                                  t_to_sigma=sdxl_bundle.model_sampling.t_to_sigma)
    theirs = comfyui_features(_comfyui_model(loaded, xl=True), channels_in, picture, 42, 34)
    assert tuple(prepared.hint.shape[-2:]) == (36, 44)
    assert [tuple(f.shape[-2:]) for f in prepared.features] == [(9, 11), (9, 11), (5, 6), (5, 6)]
    for a, b in zip(prepared.features, theirs, strict=True):     # features of up to ~1e6: float32 rounding
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    with pytest.raises(RequestError, match="reads pictures in steps of 4 pixels; 42x34 is not one"):
        prepare_controls(sdxl_bundle, [ControlInput(loaded, picture, 0.7)], 42, 34)



def test_the_rounded_hints_features_land_on_the_unets_grid(sdxl_bundle, tmp_path):
    """The rounded hint's features (a 42 x 34 picture: 21 x 17 latents) are the sizes of the U-Net's levels, so
    its forward adds them where they belong (a wrong size would fail to add) and they change its output."""
    net = diffusers_adapter("full_adapter_xl", (64, 128, 128, 128), 4, std=0.15)
    loaded = load_t2i_adapter(write_adapter(net, "original", tmp_path), latent_factor=2)
    [prepared] = prepare_controls(sdxl_bundle, [ControlInput(loaded, _hint(1), 0.9)], 42, 34, "comfyui",
                                  t_to_sigma=sdxl_bundle.model_sampling.t_to_sigma)
    unet, cfg = sdxl_bundle.unet, sdxl_bundle.unet_config
    x = torch.randn(1, cfg.in_channels, 17, 21, generator=torch.Generator().manual_seed(0))     # (1, C, h, w)
    context = torch.randn(1, 4, cfg.context_dim, generator=torch.Generator().manual_seed(1))
    y = torch.randn(1, cfg.adm_in_channels, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500.0])
    with torch.no_grad():
        plain = unet(x, t, context, y)
        added = unet(x, t, context, y, adapter=list(prepared.features))
    assert added.shape == plain.shape and (added - plain).abs().max() > 1e-3
