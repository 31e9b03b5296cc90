"""Single files written from diffusers folders by diffusers' conversion scripts
(`convert_diffusers_to_original_stable_diffusion.py`, `convert_diffusers_to_original_sdxl.py`).

- SDXL: the script renames CLIP-G's keys to OpenCLIP names but leaves the projection as
  `text_projection.weight` in `nn.Linear` layout (ComfyUI's `clip_text_transformers_convert` takes it as is).
- Both scripts leave a transformers < 4.31 tower's `position_ids` buffer under its Hugging Face name.
"""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file

from bundle_fixtures import tiny_bundle, write_diffusers_folder
from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.openclip import config_from_openclip, openclip_to_sdlab, sdlab_to_openclip
from sdlab.checkpoints.save import bundle_state_dict
from sdlab.families.loaded import ModelBundle

PROMPT = "a photograph of an astronaut riding a horse"
TOL = 1e-5


def _assert_same_text_weights(a: ModelBundle, b: ModelBundle) -> None:
    for ta, tb in zip(a.text_encoders, b.text_encoders):
        sa, sb = ta.model.state_dict(), tb.model.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), ta.spec.name


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
