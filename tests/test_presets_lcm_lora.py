"""An LCM-LoRA in each layout it is published and converted in draws, with the lcm preset, diffusers' picture.

LCM-LoRA (latent-consistency/lcm-lora-sdv1-5, -sdxl) is trained by diffusers' train_lcm_distill_lora_*.py
with peft on the U-Net only, on every attention, feed-forward and ResNet layer: to_q / to_k / to_v /
to_out.0, proj_in / proj_out, ff.net.0.proj / ff.net.2, conv1 / conv2, conv_shortcut, time_emb_proj and the
down- / upsampler convs. The files travel in three namings:

- ``kohya``: ``lora_unet_<diffusers path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (what
  A1111 / ComfyUI users download; diffusers' ``convert_state_dict_to_kohya`` writes it),
- ``peft``: ``unet.<diffusers path>.lora_A.weight`` / ``.lora_B.weight`` (``save_lora_weights``),
- ``diffusers_old``: ``unet.<diffusers path>.lora.down.weight`` / ``.lora.up.weight`` (older diffusers).

Each synthetic file (random rank-4 adapters on a reduced-width random model, every target above) must reach
every layer it names in sdlab, and sdlab with the file and ``--preset lcm`` must draw the picture of diffusers'
``load_lora_weights`` + ``LCMScheduler`` at guidance 1 within 2/255 (tests/test_pipeline_parity.py's tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from safetensors.torch import save_file
from picture_parity import MAX_PIXEL_DIFF, PROMPT, SEED, SIZE, max_pixel_diff, uint8_pictures
from test_pipeline_parity import BATCH, NEGATIVE, SD_SCHEDULER_KEYS, _folder, _generators, _quiet

import sdlab
from sdlab.checkpoints.lora import apply_lora, load_lora_file
from sdlab.pipeline.presets import apply_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
RANK = 4
STEPS = 4


def _peft_unet_layers(folder, cls) -> dict[str, torch.Tensor]:
    """``<diffusers path>.lora_A.weight`` / ``.lora_B.weight`` of random rank-4 adapters on every LCM-LoRA target."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=LCM_LORA_TARGETS, init_lora_weights=False))
    g = torch.Generator().manual_seed(21)
    layers = get_peft_model_state_dict(pipe.unet)
    return {key: torch.randn(value.shape, generator=g) * 0.15 for key, value in layers.items()}


def _write(layers: dict[str, torch.Tensor], layout: str, path) -> str:
    unet = {f"unet.{key}": value.contiguous() for key, value in layers.items()}
    if layout == "kohya":
        state = convert_state_dict_to_kohya(unet)
    elif layout == "peft":
        state = unet
    else:
        state = {key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): value
                 for key, value in unet.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = _folder(tmp_path_factory, "sd1")
    return folder, _peft_unet_layers(folder, StableDiffusionPipeline)


def _reference(cls, folder, lora_file: str | None, steps: int) -> np.ndarray:
    pipe = _quiet(cls.from_pretrained(folder, local_files_only=True))
    config = {key: pipe.scheduler.config[key] for key in SD_SCHEDULER_KEYS}
    pipe.scheduler = LCMScheduler.from_config(config)
    if lora_file is not None:
        pipe.load_lora_weights(lora_file)
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=BATCH, num_inference_steps=steps,
                guidance_scale=1.0, width=SIZE, height=SIZE, generator=_generators(), output_type="np").images


def _ours(folder, lora_file: str, steps: int):
    pipe = sdlab.load(folder, loras=[(lora_file, 1.0)])
    options = apply_preset("lcm", dict(steps=steps, seed=SEED, width=SIZE, height=SIZE, batch_size=BATCH))
    return pipe.txt2img(PROMPT, NEGATIVE, **options).images


@pytest.mark.parametrize("layout", ["kohya", "peft", "diffusers_old"])
def test_sd1_lcm_lora_layouts_reach_every_layer_and_draw_diffusers_picture(sd1, layout, tmp_path):
    folder, layers = sd1
    lora_file = _write(layers, layout, tmp_path / f"lcm-lora-{layout}.safetensors")
    modules = load_lora_file(lora_file)
    assert len(modules) == len(layers) // 2                               # one module per adapted layer
    assert apply_lora(sdlab.load(folder).bundle, lora_file, 1.0) == len(modules)   # every one finds its layer
    reference = _reference(StableDiffusionPipeline, folder, lora_file, STEPS)
    assert max_pixel_diff(_ours(folder, lora_file, STEPS), reference) <= MAX_PIXEL_DIFF


def test_the_lora_changes_the_picture(sd1, tmp_path):
    """Without the LoRA both draw another picture, far from the one with it: the comparison above is not vacuous."""
    folder, layers = sd1
    options = apply_preset("lcm", dict(steps=STEPS, seed=SEED, width=SIZE, height=SIZE, batch_size=BATCH))
    without = sdlab.load(folder).txt2img(PROMPT, NEGATIVE, **options).images
    assert max_pixel_diff(without, _reference(StableDiffusionPipeline, folder, None, STEPS)) <= MAX_PIXEL_DIFF
    drawn = _ours(folder, _write(layers, "kohya", tmp_path / "lcm-lora.safetensors"), STEPS)
    assert np.abs(uint8_pictures(drawn).astype(int) - uint8_pictures(without).astype(int)).max() > 20


def test_sdxl_lcm_lora_in_kohya_layout(tmp_path_factory, tmp_path):
    """SDXL's LCM-LoRA names the U-Net the diffusers way (kohya's own SDXL files use SGM names): both reach it."""
    folder = _folder(tmp_path_factory, "sdxl")
    lora_file = _write(_peft_unet_layers(folder, StableDiffusionXLPipeline), "kohya", tmp_path / "lcm-lora-sdxl.safetensors")
    assert any(name.startswith("lora_unet_down_blocks_") for name in load_lora_file(lora_file))
    assert apply_lora(sdlab.load(folder).bundle, lora_file, 1.0) == len(load_lora_file(lora_file))
    reference = _reference(StableDiffusionXLPipeline, folder, lora_file, 2)
    assert max_pixel_diff(_ours(folder, lora_file, 2), reference) <= MAX_PIXEL_DIFF
