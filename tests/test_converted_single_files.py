"""Single files written from diffusers folders by diffusers' conversion scripts
(`convert_diffusers_to_original_stable_diffusion.py`, `convert_diffusers_to_original_sdxl.py`).

- SD2: the script copies the folder's 23-layer OpenCLIP-H as it is. The prompt must be encoded as diffusers'
  `from_single_file` encodes it (`last_hidden_state` of its 23-layer CLIPTextModel), which is also what A1111
  and ComfyUI compute (their 24-layer towers run to the penultimate block, the file's last, then the final
  norm); a full 24-layer tower keeps SD2's penultimate-layer rule.
- SDXL: the script renames CLIP-G's keys to OpenCLIP names but leaves the projection as
  `text_projection.weight` in `nn.Linear` layout (ComfyUI's `clip_text_transformers_convert` takes it as is).
- Both scripts leave a transformers < 4.31 tower's `position_ids` buffer under its Hugging Face name.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from bundle_fixtures import randomize_, tiny_bundle, tiny_text_configs, write_diffusers_folder, write_original
from sdlab.checkpoints import create
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.openclip import config_from_openclip, openclip_to_sdlab, sdlab_to_openclip
from sdlab.checkpoints.save import bundle_state_dict, save_bundle
from sdlab.families import get_family
from sdlab.families.loaded import ModelBundle
from sdlab.pipeline.conditioning import encode_prompt

PROMPT = "a photograph of an astronaut riding a horse"
TOL = 1e-5


def _sd2_bundle(layers: int) -> ModelBundle:
    """A reduced-width SD2 bundle whose OpenCLIP-H tower has `layers` layers (the family's has 24)."""
    text = replace(tiny_text_configs(get_family("sd2"))[0], layers=layers)
    bundle = create.new_bundle("sd2", tiny=True, text=(text,), seed=1)
    randomize_(bundle.unet, 1)
    randomize_(bundle.vae, 2)
    randomize_(bundle.text_encoders[0].model, 3)
    return bundle


def _assert_same_text_weights(a: ModelBundle, b: ModelBundle) -> None:
    for ta, tb in zip(a.text_encoders, b.text_encoders):
        sa, sb = ta.model.state_dict(), tb.model.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), ta.spec.name


# --- SD2: 23 of OpenCLIP-H's 24 layers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd2_23(tmp_path_factory) -> tuple[Path, Any]:
    """An SD2 file holding a 23-layer tower, and diffusers' StableDiffusionPipeline.from_single_file on it."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("sd2_23")
    bundle = _sd2_bundle(23)
    path = write_original(bundle, folder / "sd2_23.safetensors")
    config = write_diffusers_folder(bundle, folder / "config", weights=False)
    unet_config = config / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "sample_size": 8}))
    index = json.loads((config / "model_index.json").read_text())             # SD2's text_encoder class
    (config / "model_index.json").write_text(json.dumps(index | {"text_encoder": ["transformers", "CLIPTextModel"]}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    return path, pipe


@torch.no_grad()
def test_sd2_file_with_23_layers_encodes_as_diffusers_from_single_file(sd2_23):
    path, pipe = sd2_23
    loaded = load_bundle(path)
    assert loaded.text_configs[0].layers == 23 and pipe.text_encoder.config.num_hidden_layers == 23
    ref, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)                          # (1, 77, D)
    ours = encode_prompt(loaded.text_encoders, PROMPT).context
    assert (ours - ref).abs().max() < TOL * ref.abs().max()
    # clip skip 2 (diffusers' clip_skip=1): the final norm of the 22nd layer's output, as encode_prompt makes it
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]   # (1, 77, D)
    ref = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(hidden)
    ours = encode_prompt(loaded.text_encoders, PROMPT, clip_skip=2).context
    assert (ours - ref).abs().max() < TOL * ref.abs().max()


@torch.no_grad()
def test_sd2_23_layer_tower_keeps_its_reading_through_a_save(sd2_23, tmp_path):
    path, _ = sd2_23
    loaded = load_bundle(path)
    saved = load_bundle(save_bundle(loaded, tmp_path / "resaved.safetensors"))
    assert [te.spec.hidden_state for te in saved.text_encoders] == ["last"]
    assert torch.equal(encode_prompt(saved.text_encoders, PROMPT).context,
                       encode_prompt(loaded.text_encoders, PROMPT).context)


@torch.no_grad()
def test_sd2_file_with_24_layers_conditions_on_the_penultimate_layer(tmp_path):
    loaded = load_bundle(write_original(_sd2_bundle(24), tmp_path / "sd2_24.safetensors"))
    encoder = loaded.text_encoders[0]
    assert encoder.spec.hidden_state == "penultimate_norm"
    out = encoder.model(encoder.tokenizer([PROMPT]))
    penultimate = encoder.model.final_layer_norm(out.hidden_states[23])          # (1, 77, D)
    assert torch.equal(encode_prompt(loaded.text_encoders, PROMPT).context, penultimate)


# --- the projection and position ids as diffusers' scripts leave them -----------------------------------


_POSITION_IDS = {   # where each script leaves the buffer, under the tower's prefix
    "sd2": "transformer.text_model.embeddings.position_ids",
    "sdxl": "text_model.embeddings.position_ids",
    "sdxl-refiner": "text_model.embeddings.position_ids",
}


def _as_converted(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """`bundle`'s original-layout state with the OpenCLIP projection in nn.Linear layout under
    `text_projection.weight` and a position-ids buffer under its Hugging Face name."""
    state = {k: v.contiguous() for k, v in bundle_state_dict(bundle).items()}
    prefix = next(te.spec.prefix for te in bundle.text_encoders if te.spec.layout == "openclip")
    state[prefix + "text_projection.weight"] = state.pop(prefix + "text_projection").t().contiguous()   # (P, D)
    state[prefix + _POSITION_IDS[bundle.family.name]] = torch.arange(77)[None]                         # (1, 77)
    return state


@pytest.mark.parametrize("name", ["sd2", "sdxl", "sdxl-refiner"])
def test_linear_projection_and_position_ids_load_the_same_weights(tmp_path, name):
    built = tiny_bundle(name, seed=4)
    path = tmp_path / f"{name}.safetensors"
    save_file(_as_converted(built), str(path))
    loaded = load_bundle(path)
    _assert_same_text_weights(loaded, built)
    ignored = [key for component in loaded.report.components for key in component.ignored]
    assert [key for key in ignored if key.endswith("position_ids")] == [
        next(te.spec.prefix for te in built.text_encoders if te.spec.layout == "openclip") + _POSITION_IDS[name]]


def test_projection_under_both_names_is_refused(tmp_path):
    built = tiny_bundle("sdxl", seed=4)
    prefix = built.text_encoders[1].spec.prefix
    state = _as_converted(built)
    state[prefix + "text_projection"] = state[prefix + "text_projection.weight"].t().contiguous()
    path = tmp_path / "both.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="text projection is stored twice"):
        load_bundle(path)


@torch.no_grad()
def test_sdxl_file_from_a_transformers_clip_g_matches_transformers(tmp_path):
    """CLIP-G as the SDXL script writes it from a folder that transformers saved: OpenCLIP names for the
    tower, the folder's own `text_projection.weight` and `position_ids`; sdlab's pooled output and hidden
    states equal transformers' on that folder."""
    from transformers import CLIPTextModelWithProjection

    built = tiny_bundle("sdxl", seed=7)
    folder = write_diffusers_folder(built, tmp_path / "folder")
    hf_state = load_file(str(folder / "text_encoder_2" / "model.safetensors"))
    tower = {k.removeprefix("text_model."): v for k, v in hf_state.items() if k.startswith("text_model.")}
    clip_g = sdlab_to_openclip(tower) | {
        "text_projection.weight": hf_state["text_projection.weight"],
        "text_model.embeddings.position_ids": torch.arange(77)[None],
    }
    prefix = built.text_encoders[1].spec.prefix
    state = {k: v.contiguous() for k, v in bundle_state_dict(built).items() if not k.startswith(prefix)}
    state |= {prefix + k: v.contiguous() for k, v in clip_g.items()}
    path = tmp_path / "sdxl_converted.safetensors"
    save_file(state, str(path))

    ours = load_bundle(path).text_encoders[1]
    theirs = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()
    ids = ours.tokenizer([PROMPT, ""])
    out, ref = ours.model(ids), theirs(ids, output_hidden_states=True)
    assert (out.pooled - ref.text_embeds).abs().max() < TOL
    assert (out.hidden_states[-2] - ref.hidden_states[-2]).abs().max() < TOL


def test_openclip_names_take_the_linear_projection_as_is():
    built = tiny_bundle("sdxl", seed=2).text_encoders[1]
    projection = built.model.text_projection.weight.detach()                     # (P, D)
    tower = sdlab_to_openclip(built.model.state_dict())
    linear = {k: v for k, v in tower.items() if k != "text_projection"} | {"text_projection.weight": projection}
    assert openclip_to_sdlab(linear)["text_projection.weight"] is projection
    assert config_from_openclip(linear) == config_from_openclip(tower) == built.config
