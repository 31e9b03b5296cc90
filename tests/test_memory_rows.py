"""The memory estimate counts the U-Net rows guidance runs: `memory.unet_rows` against the batches `generate` hands
the U-Net, on reduced random-weight SD1 and SD1 edit (InstructPix2Pix) models.

Plain CFG runs [uncond, cond] (2 rows a picture), CFG 1 the prompt alone (1), PAG one perturbed row more (3, or 2
at CFG 1), an edit model's image formula [prompt + picture, negative + picture, negative + zero picture] (3) at any
CFG under A1111's convention, its image scale 1 / none plain CFG (2), diffusers' convention below image scale 1 the
prompt's pass alone (1); FreeU adds no pass.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from bundle_fixtures import init_picture, tiny_bundle

from sdlab.models.freeu import FreeU
from sdlab.pipeline.generate import generate
from sdlab.pipeline.memory import estimate_bytes, unet_rows
from sdlab.pipeline.plan import resolve_for
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE, STEPS, BATCH = 16, 2, 2


@pytest.fixture(scope="module")
def bundles():
    return {"sd1": tiny_bundle("sd1", seed=3), "sd1-edit": tiny_bundle("sd1-edit", seed=4)}


def _drawn_rows(bundle, request: GenerationRequest) -> set[int]:
    """The rows per picture of every U-Net call `generate` makes for `request`."""
    batches: list[int] = []
    hook = bundle.unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        generate(bundle, request)
    finally:
        hook.remove()
    return {batch / BATCH for batch in batches}


CASES = [   # (family, request options, rows a picture)
    ("sd1", dict(cfg_scale=7.0), 2),
    ("sd1", dict(cfg_scale=1.0), 1),
    ("sd1", dict(cfg_scale=7.0, pag_scale=3.0), 3),
    ("sd1", dict(cfg_scale=1.0, pag_scale=3.0), 2),
    ("sd1", dict(cfg_scale=7.0, freeu=FreeU()), 2),
    ("sd1-edit", dict(cfg_scale=7.0, image_cfg_scale=1.5), 3),
    ("sd1-edit", dict(cfg_scale=1.0, image_cfg_scale=1.5, img2img_convention="a1111"), 3),
    ("sd1-edit", dict(cfg_scale=7.0, image_cfg_scale=1.0), 2),
    ("sd1-edit", dict(cfg_scale=7.0, image_cfg_scale=None), 2),
    ("sd1-edit", dict(cfg_scale=7.0, image_cfg_scale=0.5), 1),
    ("sd1-edit", dict(cfg_scale=7.0, image_cfg_scale=0.5, img2img_convention="a1111"), 3),
    ("sd1-edit", dict(cfg_scale=7.0, image_cfg_scale=1.5, pag_scale=3.0), 3),   # PAG is not applied to edit models
]


@pytest.mark.parametrize(("family", "options", "rows"), CASES)
def test_the_estimate_counts_the_rows_guidance_runs(bundles, family, options, rows):
    bundle = bundles[family]
    picture = {"init_image": init_picture(SIZE), "strength": 1.0} if family == "sd1-edit" else {}
    request = GenerationRequest("a red cube", "blurry", steps=STEPS, seed=7, width=SIZE, height=SIZE,
                                batch_size=BATCH, sampler="Euler", **picture, **options)
    resolved = resolve_for(bundle, request)
    assert unet_rows(bundle, resolved) == rows
    assert _drawn_rows(bundle, request) == {rows}


def test_the_estimate_grows_with_the_rows(bundles):
    """PAG's third row and an edit model's image row each cost a third more U-Net memory than plain CFG."""
    sd1, edit = bundles["sd1"], bundles["sd1-edit"]
    big = dict(width=1024, height=1024, batch_size=4, sampler="Euler", cfg_scale=7.0)   # the U-Net phase dominates
    plain = estimate_bytes(sd1, resolve_for(sd1, GenerationRequest("x", **big)))
    assert estimate_bytes(sd1, resolve_for(sd1, GenerationRequest("x", **big, pag_scale=3.0))) == plain * 3 // 2
    assert estimate_bytes(sd1, resolve_for(sd1, GenerationRequest("x", **big, freeu=FreeU()))) == plain
    edit_plain, edit_image = (
        estimate_bytes(edit, resolve_for(edit, GenerationRequest("x", **big, init_image=init_picture(SIZE),
                                                                 image_cfg_scale=scale)))
        for scale in (1.0, 1.5))
    assert edit_image == edit_plain * 3 // 2


def test_the_estimate_adds_the_ip_adapters_and_encoder_it_loads(bundles, tmp_path):
    """An IP-Adapter request's estimate is the plain request's plus its adapter's and image encoder's tensors in
    the model's dtype (fp32 here, 4 bytes; the .bin pickle's nested parts too) while they are not loaded; once a
    drawing has kept them, plus nothing."""
    from ip_adapter_fixtures import SAMPLE_PICTURE, ip_adapter_state, write_image_encoder, write_ip_adapter
    from PIL import Image
    from safetensors.torch import load_file

    from sdlab.models.ip_adapter import cross_attentions
    from sdlab.pipeline.image_prompt import IPAdapterInput, forget_image_prompt_models

    sd1 = bundles["sd1"]
    encoder = write_image_encoder(tmp_path / "image_encoder", projection=32)
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(sd1.unet)]
    state = ip_adapter_state(widths, sd1.unet_config.context_dim, 32)
    adapter_numel = sum(t.numel() for part in state.values() for t in part.values())
    encoder_numel = sum(t.numel() for t in load_file(str(tmp_path / "image_encoder" / "model.safetensors")).values())
    assert encoder_numel == sum(p.numel() for p in encoder.parameters())
    picture = Image.open(SAMPLE_PICTURE).convert("RGB")
    plain = GenerationRequest("a red cube", steps=STEPS, seed=7, width=SIZE, height=SIZE, batch_size=BATCH,
                              sampler="Euler", cfg_scale=7.0)
    before = estimate_bytes(sd1, resolve_for(sd1, plain))
    forget_image_prompt_models()
    try:
        for suffix in (".safetensors", ".bin"):
            path = write_ip_adapter(tmp_path / f"ip-adapter_tiny{suffix}", state)
            request = replace(plain, ip_adapters=(IPAdapterInput(path, picture, 0.5),))
            assert estimate_bytes(sd1, resolve_for(sd1, request)) - before == 4 * (adapter_numel + encoder_numel)
        generate(sd1, request)                                                 # the .bin adapter and encoder kept
        assert estimate_bytes(sd1, resolve_for(sd1, request)) == before
    finally:
        forget_image_prompt_models()


def test_the_estimate_adds_a_controlnets_weights_and_residuals(bundles, tmp_path):
    """A ControlNet request's estimate is the plain one's plus the ControlNet file's tensors in the model's dtype
    (fp32, 4 bytes) and, in the U-Net phase, what the ControlNets hold through the U-Net's call
    (`controlnet_held_bytes`): one set of residuals for two ControlNets (summed as they run one after another),
    each one's hint features and weights."""
    from controlnet_fixtures import diffusers_controlnet, write_layout
    from PIL import Image
    from safetensors.torch import load_file

    from sdlab.pipeline.control import ControlInput
    from sdlab.pipeline.memory import controlnet_residual_elements

    sd1 = bundles["sd1"]
    factor = sd1.vae_config.downsample_factor
    net = write_layout(diffusers_controlnet(sd1.unet_config, 3, hint_widths=(16, 32, 96, 256)[: factor.bit_length()]),
                       "diffusers-file", tmp_path)
    weights = 4 * sum(t.numel() for t in load_file(str(net)).values())
    big = dict(width=1024, height=1024, batch_size=4, sampler="Euler", cfg_scale=7.0)   # the U-Net phase dominates
    plain = estimate_bytes(sd1, resolve_for(sd1, GenerationRequest("x", **big)))
    hint = Image.new("RGB", (64, 64))
    side, c0, rows = 1024 // factor, sd1.unet_config.model_channels, 4 * 2
    residuals = controlnet_residual_elements(sd1.unet_config, side, side) * rows * 4
    assert residuals == 3.25 * c0 * side * side * rows * 4          # channel_mult (1, 2), one ResBlock
    for count in (1, 2):
        request = GenerationRequest("x", **big, controls=(ControlInput(str(net), hint),) * count)
        hints = count * c0 * side * side * rows * 4
        assert estimate_bytes(sd1, resolve_for(sd1, request)) - plain == residuals + hints + count * weights


def _layouts():
    """U-Net configs at small width: the reduced SD1 and SDXL of the tests (channel_mult (1, 2), one ResBlock), and
    SD1's (1, 2, 4, 4) and SDXL's (1, 2, 4) level structure with two ResBlocks."""
    sd1, sdxl = tiny_bundle("sd1", seed=3).unet_config, tiny_bundle("sdxl", seed=3).unet_config
    return {"reduced sd1": (sd1, 3.25), "reduced sdxl": (sdxl, 3.25),
            "sd1 levels": (replace(sd1, channel_mult=(1, 2, 4, 4), num_res_blocks=2, transformer_depth=(1, 1, 1, 0)),
                           5.125),
            "sdxl levels": (replace(sdxl, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 1, 1)),
                            5.125)}


@pytest.mark.parametrize("layout", ["reduced sd1", "reduced sdxl", "sd1 levels", "sdxl levels"])
def test_the_residuals_counted_are_those_a_controlnet_hands_the_unet(layout):
    """`controlnet_residual_elements` against the residual tensors of a ControlNet forward, exactly, at a latent
    whose sides halve evenly (3.25 c0 x N a row for channel_mult (1, 2) with one ResBlock, 5.125 for SD1's and
    SDXL's levels) and at one whose Downsamples round up (9 x 7)."""
    import torch

    from sdlab.models.controlnet import ControlNet, ControlNetConfig
    from sdlab.pipeline.memory import controlnet_residual_elements

    cfg, per_c0n = _layouts()[layout]
    torch.manual_seed(0)
    net = ControlNet(ControlNetConfig(cfg, hint_widths=(16, 32))).eval()
    rows = 2
    for height, width in ((16, 16), (9, 7)):
        x = torch.randn(rows, cfg.in_channels, height, width)
        hint = torch.rand(rows, 3, height * 2, width * 2)
        y = None if cfg.adm_in_channels is None else torch.randn(rows, cfg.adm_in_channels)
        with torch.inference_mode():
            residuals, middle = net(x, torch.full((rows,), 500.0), torch.randn(rows, 77, cfg.context_dim), hint, y)
        held = sum(r.numel() * r.element_size() for r in [*residuals, middle])
        assert controlnet_residual_elements(cfg, height, width) * rows * 4 == held
    assert controlnet_residual_elements(cfg, 16, 16) == per_c0n * cfg.model_channels * 16 * 16


def test_cuda_memory_the_caching_allocator_holds_unused_counts_as_free(monkeypatch):
    """A tensor let go on CUDA (a refiner the next job does not draw with, the last job's activations) stays in
    PyTorch's caching allocator, which `mem_get_info` reports as used: the free memory counts the reserve not
    allocated, which the next allocations take first (mocked: no GPU needed)."""
    import torch

    from sdlab.pipeline.memory import available_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1200)
    assert available_bytes(torch.device("cuda", 0)) == 1000 + 1800
