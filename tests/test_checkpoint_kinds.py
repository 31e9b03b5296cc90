"""Checkpoint kinds people have beside SD 1.x / 2.x / SDXL: each is named in one line, or loads as A1111 loads it.

Files hold only the few keys that identify a kind (their real names: diffusers' single_file_utils
CHECKPOINT_KEY_NAMES, the original releases), with tiny tensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import _text_start, read_checkpoint
from sdlab.checkpoints.load import plan_checkpoint


def _file(folder: Path, name: str, keys: dict[str, tuple[int, ...]]) -> Path:
    path = folder / name
    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, str(path))
    return path


_DMP = "model.diffusion_model."

OTHER_ARCHITECTURE_FILES = {
    # SAI's SD3 medium all-in-one: the MMDiT under model.diffusion_model., three text encoders
    "sd3": ("Stable Diffusion 3 / 3.5", {_DMP + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (8,),
                                         _DMP + "x_embedder.proj.weight": (8, 16, 2, 2),
                                         "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
                                         "first_stage_model.decoder.conv_out.weight": (3, 8, 3, 3)}),
    "sd35_large": ("Stable Diffusion 3 / 3.5", {"joint_blocks.37.x_block.mlp.fc1.weight": (8, 8),
                                                "x_embedder.proj.weight": (8, 16, 2, 2)}),
    "flux_bfl": ("Flux", {"double_blocks.0.img_attn.norm.key_norm.scale": (8,), "img_in.weight": (8, 64),
                          "guidance_in.in_layer.bias": (8,)}),
    "flux_comfy": ("Flux", {_DMP + "double_blocks.0.img_attn.norm.key_norm.scale": (8,), _DMP + "img_in.weight": (8, 64),
                            "vae.decoder.conv_in.weight": (8, 16, 3, 3)}),
    "cascade_c": ("Stable Cascade", {"clip_txt_mapper.weight": (8, 8), "down_blocks.0.0.channelwise.0.weight": (8, 8)}),
    "cascade_b": ("Stable Cascade", {"down_blocks.1.0.channelwise.0.weight": (8, 8)}),
    "pixart": ("PixArt", {"x_embedder.proj.weight": (8, 4, 2, 2), "y_embedder.y_proj.fc1.weight": (8, 16),
                          "t_block.1.weight": (48, 8)}),
    "hunyuan_dit": ("Hunyuan-DiT", {"text_embedding_padding": (4, 8), "mlp_t5.0.weight": (8, 8),
                                    "x_embedder.proj.weight": (8, 4, 2, 2)}),
    "auraflow": ("AuraFlow", {"double_layers.0.attn.w2q.weight": (8, 8), "cond_seq_linear.weight": (8, 8)}),
    # Kolors' U-Net in the LDM layout: SDXL's, plus the ChatGLM projection
    "kolors": ("Kolors", {_DMP + "input_blocks.0.0.weight": (32, 4, 3, 3), _DMP + "label_emb.0.0.weight": (8, 5632),
                          _DMP + "encoder_hid_proj.weight": (32, 4096)}),
}


@pytest.mark.parametrize("name", OTHER_ARCHITECTURE_FILES)
def test_other_architecture_files_are_named(tmp_path, name):
    """Before: SD3 and ComfyUI's Flux got "U-Net keys present but ...input_blocks.0.0.weight is missing", the others
    "no key starting with model.diffusion_model."; the message never said what the file is."""
    kind, keys = OTHER_ARCHITECTURE_FILES[name]
    path = _file(tmp_path, f"{name}.safetensors", keys)
    with pytest.raises(CheckpointError) as err:
        plan_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: this is a") and f" {kind} model (key " in message, message
    assert message.endswith("sdlab draws SD 1.x / 2.x / SDXL models") and "\n" not in message


OTHER_PIPELINES = {
    "StableDiffusion3Pipeline": ("Stable Diffusion 3 / 3.5", "transformer"),
    "FluxPipeline": ("Flux", "transformer"),
    "FluxKontextPipeline": ("Flux", "transformer"),
    "PixArtSigmaPipeline": ("PixArt", "transformer"),
    "StableCascadeDecoderPipeline": ("Stable Cascade", "decoder"),
    "HunyuanDiTPipeline": ("Hunyuan-DiT", "transformer"),
    "AuraFlowPipeline": ("AuraFlow", "transformer"),
    "KolorsPipeline": ("Kolors", "unet"),
}


@pytest.mark.parametrize("class_name", OTHER_PIPELINES)
def test_other_architecture_folders_are_named_by_their_pipeline(tmp_path, class_name):
    """Before: "unet/config.json: missing" (Kolors: "encoder_hid_dim=4096 is not supported")."""
    kind, model = OTHER_PIPELINES[class_name]
    folder = tmp_path / "pipeline"
    (folder / model).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, model: ["diffusers", "Model"],
                                                         "vae": ["diffusers", "AutoencoderKL"]}))
    (folder / model / "config.json").write_text(json.dumps({"in_channels": 16, "encoder_hid_dim": 4096}))
    with pytest.raises(CheckpointError, match=rf"^{folder}: this is an? {kind} model \(model_index.json _class_name "
                                              rf"'{class_name}'\); sdlab draws SD 1.x / 2.x / SDXL models$"):
        plan_checkpoint(folder)


def test_a_folder_whose_model_is_a_transformer_is_refused_as_such(tmp_path):
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline",
                                                         "transformer": ["diffusers", "SanaTransformer2DModel"]}))
    with pytest.raises(CheckpointError, match=r"this is a diffusers SanaPipeline folder \(its model is a 'transformer', "
                                              r"not a U-Net\); sdlab draws SD 1.x / 2.x / SDXL models$"):
        plan_checkpoint(folder)


def _lfs_pointer(path: Path) -> None:
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4c8d1e\nsize 2132625894\n")


def _web_page(path: Path) -> None:
    path.write_text("\n<!DOCTYPE html><html><head><title>Sign in</title></head><body></body></html>")


def _zip_pickle(path: Path) -> None:
    torch.save({"state_dict": {_DMP + "input_blocks.0.0.weight": torch.zeros(1)}}, path)


def _legacy_pickle(path: Path) -> None:
    torch.save({"state_dict": {_DMP + "input_blocks.0.0.weight": torch.zeros(1)}}, path,
               _use_new_zipfile_serialization=False)


def _picture(kind: str):
    """A model page's preview picture saved under the model's name."""
    def write(path: Path) -> None:
        from PIL import Image

        Image.new("RGB", (64, 48), (200, 120, 40)).save(path, format=kind)
    write.__name__ = f"_{kind.lower()}_picture"
    return write


@pytest.mark.parametrize("name, write, says", [
    ("model.safetensors", _lfs_pointer, "it is a Git LFS pointer, not the weights (fetch them with git lfs pull"),
    ("model.ckpt", _lfs_pointer, "it is a Git LFS pointer, not the weights"),
    ("model.safetensors", _web_page, "it is a web page (HTML / XML), not the weights"),
    ("model.safetensors", _zip_pickle, "it is a PyTorch checkpoint (a zip archive, as .ckpt / .pt files are); rename it to .ckpt"),
    ("model.safetensors", _legacy_pickle, "it is a PyTorch checkpoint (a legacy pickle); rename it to .ckpt"),
    ("model.safetensors", _picture("PNG"), "it is a PNG picture, not the weights (download the file itself)"),
    ("model.ckpt", _picture("PNG"), "it is a PNG picture, not the weights (download the file itself)"),
    ("model.safetensors", _picture("JPEG"), "it is a JPEG picture, not the weights (download the file itself)"),
    ("model.pt", _picture("JPEG"), "it is a JPEG picture, not the weights (download the file itself)"),
    ("model.ckpt", _picture("GIF"), "it is a GIF picture, not the weights (download the file itself)"),
])
def test_a_file_of_another_format_says_what_it_is(tmp_path, name, write, says):
    """Before: `safe_open` spoke first, "not a readable safetensors file (Error while deserializing header: header
    too large)" for all of them (an LFS pointer named .ckpt: "refused to unpickle"). A picture named .safetensors
    was "its first 8 bytes give a header of ... bytes", named .ckpt "refused to unpickle: Unsupported operand 137
    ... code in a pickle would run on load", as though it might be hostile."""
    path = tmp_path / name
    write(path)
    with pytest.raises(CheckpointError) as err:
        plan_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a ") and says in message and "\n" not in message, message


def _plain_text(path: Path) -> None:
    path.write_text("hello world, this is not a model at all\n")


@pytest.mark.parametrize("name, says", [
    ("model.ckpt", "not a PyTorch checkpoint: it is text, not the weights (it begins 'hello world, this is')"),
    ("model.safetensors", "not a readable safetensors file: it is text, not the weights (it begins 'hello world, this is')"),
])
def test_a_text_file_of_no_known_kind_is_said_to_be_text(tmp_path, capsys, name, says):
    """Before: "not a readable PyTorch checkpoint (101)" (torch's KeyError on the first byte) for a .ckpt, and
    "its first 8 bytes give a header of 8031924123371070824 bytes" for a .safetensors."""
    from cli_helpers import run

    path = tmp_path / name
    _plain_text(path)
    with pytest.raises(CheckpointError) as err:
        plan_checkpoint(path)
    assert str(err.value) == f"{path}: {says}"
    code, stdout, stderr = run(["txt2img", "a cat", "--model", str(path), "--out", str(tmp_path / "a.png")], capsys)
    assert code == 2 and stderr.strip() == f"sdlab: error: {err.value}" and not (tmp_path / "a.png").exists()


_BOM_TEXT = "\ufeffhello world, this is not a model at all\n"                   # Notepad's UTF-8 with a BOM
_CYRILLIC_TEXT = "Привет, это не модель, а заметка о ней\n" * 20                # 2-byte characters, 1 KiB


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("text, begins", [(_BOM_TEXT, "hello world, this is"), (_CYRILLIC_TEXT, "Привет, это не модел")])
def test_utf8_text_with_a_bom_or_beyond_ascii_is_said_to_be_text(tmp_path, capsys, suffix, text, begins):
    """Before, the text check read the first 8 bytes as ASCII: a .ckpt was "refused to unpickle: Unsupported
    operand 239 (208) ... code in a pickle would run", a .safetensors "its first 8 bytes give a header of
    12885001739560918992 bytes"."""
    from cli_helpers import run

    path = tmp_path / f"model{suffix}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        plan_checkpoint(path)
    what = "not a PyTorch checkpoint" if suffix == ".ckpt" else "not a readable safetensors file"
    assert str(err.value) == f"{path}: {what}: it is text, not the weights (it begins {begins!r})"
    code, stdout, stderr = run(["txt2img", "a cat", "--model", str(path), "--out", str(tmp_path / "a.png")], capsys)
    assert code == 2 and stderr.strip() == f"sdlab: error: {err.value}" and not (tmp_path / "a.png").exists()


def test_a_protocol_0_pickle_is_text_and_still_refused(tmp_path):
    """A pickle of protocol 0 is text too: one calling a function is refused as a pickle, not called text."""
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    with pytest.raises(CheckpointError, match=r"refused to unpickle: Trying to load unsupported GLOBAL os\.system"):
        read_checkpoint(path)


@pytest.mark.parametrize("write", [_zip_pickle, _legacy_pickle, None], ids=["zip", "legacy", "safetensors"])
def test_real_checkpoints_do_not_read_as_text_and_load(tmp_path, write):
    """The text check's counterpart: a zip (PK), a legacy pickle (0x80) and a safetensors file (8-byte length,
    then '{') are no text, and still load."""
    if write is None:
        path = _file(tmp_path, "model.safetensors", {_DMP + "input_blocks.0.0.weight": (1,)})
    else:
        write(path := tmp_path / "model.ckpt")
    assert _text_start(path.read_bytes()[:512]) is None
    tensors, _ = read_checkpoint(path)
    assert [tuple(tensor.shape) for tensor in tensors.values()] == [(1,)]


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_a_safetensors_file_under_a_pickles_name_loads_as_what_it_is(tmp_path, suffix):
    """A safetensors file renamed .ckpt / .pt / .bin is read as safetensors (nothing unpickled), the same
    model as under its own name. Before: "refused to unpickle: Unsupported operand 216. sdlab only loads
    weights-only pickles (code in a pickle would run on load)"."""
    from bundle_fixtures import tiny_bundle, write_original

    model = write_original(tiny_bundle("sd1"), tmp_path / "model.safetensors")
    renamed = tmp_path / f"model{suffix}"
    renamed.write_bytes(model.read_bytes())
    ours, theirs = read_checkpoint(renamed)[0], read_checkpoint(model)[0]
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert plan_checkpoint(renamed).report.to_json()["family"] == plan_checkpoint(model).report.to_json()["family"]


def test_a_truncated_safetensors_file_is_still_said_to_be_one(tmp_path):
    path = _file(tmp_path, "model.safetensors", {"a": (64, 64)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file \(") as err:
        plan_checkpoint(path)
    assert "it is" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# A LoRA, VAE, ControlNet or embedding given as the model


def _lora(folder: Path) -> Path:
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    return _file(folder, "style.safetensors", {f"{name}.lora_down.weight": (4, 320), f"{name}.lora_up.weight": (320, 4),
                                               f"{name}.alpha": ()})


def _vae(folder: Path) -> Path:
    from bundle_fixtures import tiny_bundle

    path = folder / "anime-vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_bundle("sd1").vae.state_dict().items()}, str(path))
    return path


def _controlnet(folder: Path) -> Path:
    from controlnet_fixtures import ENCODERS, diffusers_controlnet, write_layout

    return write_layout(diffusers_controlnet(ENCODERS["sd1"], seed=1), "original", folder)


def _embedding(folder: Path) -> Path:
    return _file(folder, "mystyle.safetensors", {"emb_params": (2, 768)})


def _unet_alone(folder: Path) -> Path:
    """A U-Net saved alone in the original layout, as ComfyUI's UNETLoader files are."""
    from bundle_fixtures import tiny_bundle

    path = folder / "unet-only.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_bundle("sd1").unet.state_dict().items()}, str(path))
    return path


def _prefixed_unet_alone(family: str) -> Callable[[Path], Path]:
    """A U-Net saved alone with its keys still under a whole checkpoint's model.diffusion_model. prefix (what
    ComfyUI's UNETLoader also takes)."""
    def write(folder: Path) -> Path:
        from bundle_fixtures import tiny_bundle, write_original
        from safetensors.torch import load_file

        whole = write_original(tiny_bundle(family), folder / "whole.safetensors", junk=False)
        path = folder / f"{family}-unet.safetensors"
        save_file({k: v.contiguous() for k, v in load_file(str(whole)).items()
                   if k.startswith("model.diffusion_model.")}, str(path))
        whole.unlink()
        return path
    return write


def _diffusers_unet_weights(folder: Path) -> Path:
    """A diffusers pipeline's unet/ weights file downloaded alone."""
    from bundle_fixtures import tiny_bundle
    from sdlab.checkpoints.diffusers_unet import unet_state_dict_to_diffusers

    bundle = tiny_bundle("sd1")
    path = folder / "diffusion_pytorch_model.safetensors"
    state = unet_state_dict_to_diffusers(bundle.unet.state_dict(), bundle.unet_config)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("write, kind, option", [
    (_lora, "LoRA", "--lora FILE[:WEIGHT]"), (_vae, "VAE", "--vae PATH"),
    (_controlnet, "ControlNet", "--control FILE:IMAGE[:STRENGTH]"),
    (_embedding, "textual-inversion embedding", "--embeddings-dir DIR"),
    (_unet_alone, "U-Net alone (no text encoder, no VAE)",
     "--model with a checkpoint of its base model holding it under model.diffusion_model."),
    (_diffusers_unet_weights, "U-Net alone (no text encoder, no VAE)",
     "--model with a copy of its base model's diffusers folder holding it as unet/"),
    (_prefixed_unet_alone("sd1"), "U-Net alone (no text encoder, no VAE)",
     "--model with a checkpoint of its base model holding it under model.diffusion_model."),
    (_prefixed_unet_alone("sdxl"), "U-Net alone (no text encoder, no VAE)",
     "--model with a checkpoint of its base model holding it under model.diffusion_model."),
])
def test_a_file_of_another_kind_given_as_the_model_says_what_it_is(tmp_path, capsys, write, kind, option):
    """What `sdlab inspect` says of it (`describe_other_kind`), as one line from loading it as the model. Before:
    "no key starting with model.diffusion_model. (the U-Net); top-level prefixes: ..." (a U-Net alone, in either
    layout, until it was described too)."""
    from cli_helpers import run
    from sdlab.checkpoints.other_kinds import describe_other_kind

    path = write(tmp_path)
    assert describe_other_kind(path)["kind"] == kind
    with pytest.raises(CheckpointError) as err:
        plan_checkpoint(path)
    assert str(err.value).startswith(f"{path}: this is a {kind}, not a whole model; use it with {option}")
    code, _, stderr = run(["txt2img", "a cat", "--model", str(path), "--out", str(tmp_path / "a.png")], capsys)
    assert code == 2 and stderr.strip() == f"sdlab: error: {err.value}"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_whole_model_without_its_unet_prefix_is_no_unet_alone(tmp_path, family):
    """A U-Net alone holds nothing else of a model: a whole checkpoint whose U-Net keys lost their
    model.diffusion_model. prefix (its first_stage_model. and cond_stage_model. / conditioner. keys beside them)
    is not one, and loading it says what is missing. Before: described as 'U-Net alone (no text encoder, no VAE)'."""
    from bundle_fixtures import tiny_bundle, write_original
    from safetensors.torch import load_file
    from sdlab.checkpoints.other_kinds import describe_other_kind

    whole = write_original(tiny_bundle(family), tmp_path / "whole.safetensors", junk=False)
    path = tmp_path / "stripped.safetensors"
    save_file({k.removeprefix("model.diffusion_model."): v.contiguous() for k, v in load_file(str(whole)).items()},
              str(path))
    assert describe_other_kind(path) is None
    with pytest.raises(CheckpointError, match="no key starting with model.diffusion_model."):
        plan_checkpoint(path)


# ----------------------------------------------------------------------------------------------------------
# Whole models with a training run's extra parts beside them


def _vae_loss(_: Path) -> dict[str, torch.Tensor]:
    return {"first_stage_model.loss.logvar": torch.zeros(()),
            "first_stage_model.loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
            "first_stage_model.loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}


def _controlnet_1_0(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(_controlnet(folder)))                      # control_model.* beside the whole SD1.5


def _embedding_manager(_: Path) -> dict[str, torch.Tensor]:
    return {"embedding_manager.string_to_param_dict.*": torch.zeros(1, 768),
            "embedding_manager.embedder.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 8)}


@pytest.mark.parametrize("extra, says", [
    (_vae_loss, "VAE training loss"), (_controlnet_1_0, "ControlNet 1.0 (lllyasviel's file"),
    (_embedding_manager, "textual-inversion training state"),
])
def test_a_whole_model_with_training_parts_beside_it_loads_as_a1111_loads_it(tmp_path, caplog, extra, says):
    """A1111 loads such files with load_state_dict(strict=False), which skips the keys its model lacks; so does
    sdlab, naming the part in a warning and listing its keys as ignored. Before: refused ("vae (VAEConfig):
    unexpected 3 keys: loss.discriminator..." / "... keys belong to no sd1 component (prefixes control_model.)")."""
    from bundle_fixtures import tiny_bundle, write_original
    from safetensors.torch import load_file

    from sdlab.checkpoints.load import load_bundle

    plain = write_original(tiny_bundle("sd1", seed=3), tmp_path / "plain.safetensors", junk=False)
    added = extra(tmp_path)
    path = tmp_path / "with-extra.safetensors"
    save_file(load_file(str(plain)) | added, str(path))
    with caplog.at_level("WARNING"):
        loaded = load_bundle(path, dtype=torch.float32)
    assert set(added) <= set(loaded.report.ignored)
    assert any(says in r.getMessage() and "with-extra.safetensors" in r.getMessage() for r in caplog.records)
    reference = load_bundle(plain, dtype=torch.float32)
    for a, b in ((loaded.unet, reference.unet), (loaded.vae, reference.vae)):
        assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


# ----------------------------------------------------------------------------------------------------------
# A file's own DDPM buffers (alphas_cumprod / betas)


def _ldm_betas() -> torch.Tensor:
    """LDM's make_beta_schedule("linear", 0.00085, 0.012) in float64, as register_schedule computes it."""
    return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2


def _a1111_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """A1111 1.10 sd_models.rescale_zero_terminal_snr_abar, without its final alphas_bar[-1] = 4.897e-08."""
    s = alphas_cumprod.sqrt()
    s0, s_t = s[0].clone(), s[-1].clone()
    s = (s - s_t) * s0 / (s0 - s_t)
    return s ** 2


_SD = torch.cumprod(1 - _ldm_betas(), 0)

STORED_SCHEDULES = {
    "sd fp32": ({"alphas_cumprod": _SD.float(), "betas": _ldm_betas().float()}, None),
    "sd fp16": ({"alphas_cumprod": _SD.half(), "betas": _ldm_betas().half()}, None),
    "sd bf16": ({"alphas_cumprod": _SD.bfloat16()}, None),
    "sd betas only": ({"betas": _ldm_betas().float()}, None),
    "zero terminal snr": ({"alphas_cumprod": _a1111_zero_terminal_snr(_SD).float()}, "zero-terminal-SNR"),
    "linear 1e-4..0.02": ({"betas": torch.linspace(1e-4, 0.02, 1000)}, "(betas)"),
}


@pytest.mark.parametrize("name", STORED_SCHEDULES)
def test_a_stored_schedule_that_is_not_sds_is_warned_of_and_sds_is_not(tmp_path, caplog, name):
    """A1111 1.10 samples SD 1.x / 2.x on the file's alphas_cumprod (load_state_dict(strict=False) fills LDM's
    buffer); diffusers' from_single_file and ComfyUI ignore it. sdlab keeps SD's schedule, so pictures never
    change, and warns where the stored one is another beyond fp16 (bf16) rounding. Before: silence."""
    from bundle_fixtures import tiny_bundle, write_original
    from safetensors.torch import load_file

    buffers, says = STORED_SCHEDULES[name]
    plain = write_original(tiny_bundle("sd1"), tmp_path / "plain.safetensors", junk=False)
    path = tmp_path / "stored.safetensors"
    save_file(load_file(str(plain)) | buffers, str(path))
    with caplog.at_level("WARNING", logger="sdlab.checkpoints.load"):
        plan = plan_checkpoint(path)
    assert plan.report.schedule is None and set(buffers) <= set(plan.report.ignored)
    warned = [r.getMessage() for r in caplog.records if "stores its own training schedule" in r.getMessage()]
    if says is None:
        assert not warned, warned
    else:
        assert len(warned) == 1 and says in warned[0] and "A1111 samples SD 1.x / 2.x files on the stored one" in warned[0]
