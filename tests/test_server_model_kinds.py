"""`POST /sdapi/v1/options` with an `sd_model_checkpoint` sdlab cannot draw with (a LoRA or a VAE in the models
folder, a Flux or SD3 file): refused with the clean one-line reason, the model in use kept, as A1111 refuses a
model it fails to load there."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from bundle_fixtures import tiny_bundle, write_original
from server_fixtures import start_server
from sdlab.checkpoints.errors import CheckpointError
from sdlab.server.registry import ModelRegistry


def _models(folder: Path) -> Path:
    folder.mkdir(parents=True)
    write_original(tiny_bundle("sd1"), folder / "tiny.safetensors", junk=False)
    save_file({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(8),
               "model.diffusion_model.img_in.weight": torch.zeros(8, 64)}, str(folder / "flux-aio.safetensors"))
    lora = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{lora}.lora_down.weight": torch.zeros(4, 320), f"{lora}.lora_up.weight": torch.zeros(320, 4),
               f"{lora}.alpha": torch.tensor(4.0)}, str(folder / "style.safetensors"))
    save_file({k: v.contiguous() for k, v in tiny_bundle("sd1").vae.state_dict().items()},
              str(folder / "anime-vae.safetensors"))
    return folder


REFUSED = {"flux-aio.safetensors": "this is a Flux model", "style.safetensors": "this is a LoRA, not a whole model",
           "anime-vae.safetensors": "this is a VAE, not a whole model"}


def test_a_listed_file_that_is_not_a_drawable_model_says_so_by_its_title(tmp_path):
    registry = ModelRegistry(_models(tmp_path / "models") / "tiny.safetensors", tmp_path / "models")
    registry.default.check_loadable()
    for name, says in REFUSED.items():
        checkpoint = registry.find(name)
        with pytest.raises(CheckpointError) as err:
            checkpoint.check_loadable()
        assert str(err.value).startswith(f"{checkpoint.title}: {says}") and str(tmp_path) not in str(err.value)


def test_the_image_encoders_folders_hold_no_checkpoints(tmp_path):
    """An IP-Adapter's image encoder where the adapters look for it, one folder up from ControlNet/ (image_encoder/,
    clip_vision/, Forge's ControlNetPreprocessor/): not listed as a checkpoint, which the model picker offered and
    every job then failed to load. Before: all three listed."""
    models = _models(tmp_path / "models")
    encoder = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4)}
    for place in ("image_encoder/model.safetensors", "clip_vision/clip_h.safetensors",
                  "ControlNetPreprocessor/clip_vision/CLIP-ViT-H-14.safetensors"):
        (models / place).parent.mkdir(parents=True, exist_ok=True)
        save_file(encoder, str(models / place))
    registry = ModelRegistry(models / "tiny.safetensors", models)
    assert sorted(c.name for c in registry.checkpoints) == sorted(["tiny.safetensors", *REFUSED])


def test_a_folder_of_an_encoders_name_deeper_down_is_listed(tmp_path):
    """Only the image encoders' places directly under --models-dir are left out: a checkpoint in
    sub/clip_vision/ or SDXL/Image_Encoder/ (the user's folders) is listed. Before: both left out."""
    import shutil

    models = _models(tmp_path / "models")
    for place in ("sub/clip_vision/x.safetensors", "SDXL/Image_Encoder/y.safetensors"):
        (models / place).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(models / "tiny.safetensors", models / place)
    registry = ModelRegistry(models / "tiny.safetensors", models)
    names = {c.name for c in registry.checkpoints}
    assert {"sub/clip_vision/x.safetensors", "SDXL/Image_Encoder/y.safetensors"} <= names


def test_options_refuse_a_model_sdlab_cannot_draw_with_and_keep_the_one_in_use(tmp_path):
    """Before: 200 null, GET options then showed the file, and every later job failed with a 400."""
    models = _models(tmp_path / "models")
    server = start_server(tmp_path / "outputs", "--models-dir", str(models), "--model", str(models / "tiny.safetensors"))
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            before = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
            for name, says in REFUSED.items():
                refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
                assert refused.status_code == 400, refused.text
                assert says in refused.json()["errors"] and str(models) not in refused.text
                assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == before
    finally:
        server.stop()


def test_the_files_inside_a_diffusers_folder_are_not_listed_apart(tmp_path):
    """A diffusers folder is one checkpoint: its unet/, text_encoder/ (and a sharded or .bin component's) weight
    files are not listed beside it, which the model picker offered and A1111 clients chose, each job then failing
    ('no key starting with model.diffusion_model.'). Before: the unet and text encoder files were listed."""
    from bundle_fixtures import write_diffusers_folder

    models = _models(tmp_path / "models")
    pipeline = write_diffusers_folder(tiny_bundle("sdxl"), models / "sub" / "xl-pipe")
    (pipeline / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"PK")          # another format beside it
    registry = ModelRegistry(models / "tiny.safetensors", models)
    assert sorted(c.name for c in registry.checkpoints) == sorted(["tiny.safetensors", "sub/xl-pipe", *REFUSED])
    registry.find("sub/xl-pipe").check_loadable()


def test_a_whole_checkpoint_beside_model_index_json_is_listed(tmp_path):
    """A cloned Hugging Face repo holds whole checkpoints beside its model_index.json (runwayml/stable-diffusion-v1-5:
    v1-5-pruned-emaonly.safetensors; SDXL base: sd_xl_base_1.0.safetensors), which A1111 lists: only the component
    folders model_index.json names are parts of the folder's model. A folder of another name inside it still lists
    its checkpoints. Before: everything under the folder was hidden."""
    from bundle_fixtures import write_diffusers_folder

    models = _models(tmp_path / "models")
    pipeline = write_diffusers_folder(tiny_bundle("sd1"), models / "stable-diffusion-v1-5")
    (pipeline / "v1-5-pruned-emaonly.safetensors").write_bytes((models / "tiny.safetensors").read_bytes())
    (pipeline / "safety_checker").mkdir()                       # [null, null] in model_index.json: still a slot
    (pipeline / "safety_checker" / "model.safetensors").write_bytes(b"")
    (pipeline / "older").mkdir()
    (pipeline / "older" / "v1-4.ckpt").write_bytes(b"")
    registry = ModelRegistry(models / "tiny.safetensors", models)
    listed = {"stable-diffusion-v1-5", "stable-diffusion-v1-5/v1-5-pruned-emaonly.safetensors",
              "stable-diffusion-v1-5/older/v1-4.ckpt"}
    assert sorted(c.name for c in registry.checkpoints) == sorted(["tiny.safetensors", *listed, *REFUSED])
    registry.find("stable-diffusion-v1-5/v1-5-pruned-emaonly.safetensors").check_loadable()


def test_a1111s_lycoris_folder_holds_loras_not_checkpoints(tmp_path):
    """models/LyCORIS (A1111's --lyco-dir-backcompat, read beside models/Lora since 1.5.1): its files are LoRAs the
    server lists (and <lyco:NAME> finds), not checkpoints. Before: a --models-dir without Stable-diffusion/ listed
    LyCORIS/locon.safetensors as a checkpoint, and no LoRA."""
    models = _models(tmp_path / "models")
    lora = "lora_unet_down_blocks_0_attentions_0_proj_in"
    (models / "LyCORIS").mkdir()
    save_file({f"{lora}.lora_down.weight": torch.zeros(4, 32), f"{lora}.lora_up.weight": torch.zeros(32, 4)},
              str(models / "LyCORIS" / "locon.safetensors"))
    registry = ModelRegistry(models / "tiny.safetensors", models)
    assert sorted(c.name for c in registry.checkpoints) == sorted(["tiny.safetensors", *REFUSED])
    assert registry.lora("locon") is not None
