"""Reduced-width bundles of every family, with seeded random weights, for the checkpoint tests.

Each tiny config follows its family's conventions (SD1 U-Net: 8 heads; SD2 / SDXL U-Net and every text
encoder: 64-wide heads; GroupNorm with 32 groups; SD2 upcasts attention), so the loader infers exactly these
configs back from the tensors, as it does for the released models. Full-size key / shape tables are built
from the family specs on the `meta` device (`full_size_shapes`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from sdlab.checkpoints import create
from sdlab.checkpoints.io import write_safetensors_atomic
from sdlab.families.loaded import ModelBundle, TextEncoder
from sdlab.checkpoints.save import bundle_state_dict
from sdlab.families import FamilySpec, get_family
from sdlab.models.clip import CLIPTextConfig, CLIPTextModel
from sdlab.models.tokenizer import default_tokenizer
from sdlab.models.unet import UNet
from sdlab.models.vae import AutoencoderKL

TINY_VAE = create.TINY_VAE
tiny_text_configs = create.tiny_text_configs
tiny_unet_config = create.tiny_unet_config


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with seeded noise (norm weights around 1), so no tensor is a trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            is_norm_weight = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + noise if is_norm_weight else noise)
    return module.eval()


def tiny_bundle(name: str, seed: int = 0) -> ModelBundle:
    """A reduced-width bundle of family `name` with seeded random weights (fp32, CPU)."""
    bundle = create.new_bundle(name, tiny=True, seed=seed)
    randomize_(bundle.unet, seed)
    randomize_(bundle.vae, seed + 1)
    for i, te in enumerate(bundle.text_encoders):
        randomize_(te.model, seed + 2 + i)
    return bundle


# Keys real files carry beside the networks (CompVis / SGM training state); the loader lists and skips them.
def junk_keys(family: FamilySpec) -> dict[str, Tensor]:
    junk = {
        "betas": torch.linspace(1e-4, 2e-2, 10),
        "alphas_cumprod": torch.linspace(1.0, 0.1, 10),
        "alphas_cumprod_prev": torch.linspace(1.0, 0.1, 10),
        "sqrt_alphas_cumprod": torch.ones(10),
        "sqrt_one_minus_alphas_cumprod": torch.ones(10),
        "log_one_minus_alphas_cumprod": torch.ones(10),
        "sqrt_recip_alphas_cumprod": torch.ones(10),
        "sqrt_recipm1_alphas_cumprod": torch.ones(10),
        "posterior_variance": torch.ones(10),
        "posterior_log_variance_clipped": torch.ones(10),
        "posterior_mean_coef1": torch.ones(10),
        "posterior_mean_coef2": torch.ones(10),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
        "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(3),
    }
    for te in family.text_encoders:
        if te.layout == "hf":
            # stored position ids are often corrupted floats; the loader must never use them
            junk[te.prefix + "text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.float32)[None] + 0.3
        else:
            junk[te.prefix + "logit_scale"] = torch.tensor(4.6052)
    return junk


def write_original(bundle: ModelBundle, path: Path, *, junk: bool = True, metadata: dict[str, str] | None = None,
                   drop: tuple[str, ...] = ()) -> Path:
    """Write `bundle` in the original single-file layout WITHOUT sdlab's config metadata (as released files)."""
    state = bundle_state_dict(bundle)
    if junk:
        state |= junk_keys(bundle.family)
    state = {k: v for k, v in state.items() if not k.startswith(drop)} if drop else state
    return write_safetensors_atomic(path, state, metadata)


def full_size_shapes(name: str, *, junk: bool = True) -> dict[str, torch.Size]:
    """Key -> shape of a full-size original checkpoint of family `name`, built on `meta` (no memory)."""
    family = get_family(name)
    with torch.device("meta"):
        bundle = ModelBundle(
            family=family,
            unet=UNet(family.unet),
            vae=AutoencoderKL(family.vae),
            text_encoders=tuple(
                TextEncoder(spec=te, config=te.config, model=CLIPTextModel(te.config), tokenizer=None)  # type: ignore[arg-type]
                for te in family.text_encoders
            ),
            prediction=family.prediction,
            scaling_factor=family.latent_scaling_factor,
            unet_config=family.unet,
            vae_config=family.vae,
        )
        state = bundle_state_dict(bundle)
    shapes = {k: v.shape for k, v in state.items()}
    if junk:
        shapes |= {k: v.shape for k, v in junk_keys(family).items()}
    return shapes


# --- diffusers folders, written by diffusers / transformers themselves (test-only references) -------------


def hf_text_config(cfg: CLIPTextConfig) -> dict:
    """transformers `CLIPTextConfig` arguments for an sdlab text config."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_width, hidden_act=cfg.activation,
        max_position_embeddings=cfg.max_positions, layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.projection_dim or cfg.width, bos_token_id=49406, eos_token_id=cfg.eos_token_id,
        pad_token_id=1,
    )


def write_tokenizer_files(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, generated from sdlab's shipped vocabulary."""
    import json

    tok = default_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False))
    merges = sorted(tok.merge_ranks, key=tok.merge_ranks.__getitem__)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
    }))


def write_diffusers_folder(bundle: ModelBundle, folder: Path, *, weights: bool = True,
                           dtype: torch.dtype | None = None) -> Path:
    """`bundle` as a diffusers pipeline folder, each component saved by diffusers' / transformers' own
    `save_pretrained` (or only the configs, `weights=False`, as `from_single_file(config=...)` wants), in
    `dtype` when given (else the float32 the modules are built in)."""
    import json

    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig as HFTextConfig
    from transformers import CLIPTextModel as HFText
    from transformers import CLIPTextModelWithProjection as HFTextWithProjection

    from sdlab.checkpoints.diffusers_unet import unet_config_to_diffusers, unet_state_dict_to_diffusers
    from sdlab.checkpoints.diffusers_vae import vae_config_to_diffusers, vae_state_dict_to_diffusers

    family = bundle.family
    folder.mkdir(parents=True, exist_ok=True)
    unet_cfg = unet_config_to_diffusers(bundle.unet_config)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    unet.load_state_dict(unet_state_dict_to_diffusers(bundle.unet.state_dict(), bundle.unet_config), strict=True)
    vae = DiffusersVAE.from_config(vae_config_to_diffusers(bundle.vae_config, bundle.scaling_factor, 64))
    vae.load_state_dict(vae_state_dict_to_diffusers(bundle.vae.state_dict(), bundle.vae_config), strict=True)
    if dtype is not None:
        unet, vae = unet.to(dtype), vae.to(dtype)
    if weights:
        unet.save_pretrained(folder / "unet")
        vae.save_pretrained(folder / "vae")
    else:
        unet.save_config(folder / "unet")
        vae.save_config(folder / "vae")

    index = {"_class_name": family.diffusers_pipeline, "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    if not family.is_sdxl:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    else:
        index |= {"text_encoder": [None, None], "tokenizer": [None, None], "force_zeros_for_empty_prompt": True}
    for te in bundle.text_encoders:
        cls = HFTextWithProjection if te.config.projection_dim is not None else HFText
        hf = cls(HFTextConfig(**hf_text_config(te.config)))
        state = te.model.state_dict()
        if cls is HFTextWithProjection:
            state = {k if k == "text_projection.weight" else "text_model." + k: v for k, v in state.items()}
        hf.load_state_dict(state, strict=True)
        if dtype is not None:
            hf = hf.to(dtype)
        sub = te.spec.diffusers_folder
        if weights:
            hf.save_pretrained(folder / sub)
        else:
            hf.config.save_pretrained(folder / sub)
        tokenizer = sub.replace("text_encoder", "tokenizer")
        write_tokenizer_files(folder / tokenizer, "<|endoftext|>" if te.spec.pad_token_id == 49407 else "!")
        index[sub] = ["transformers", cls.__name__]
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
        "prediction_type": "v_prediction" if bundle.prediction.value == "v" else "epsilon",
    }))
    return folder


def init_picture(size: int):
    """A deterministic size x size init image with gradients and a hard-edged red block (PIL RGB)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    rgb = np.stack([x, y, 1 - (x + y) / 2], axis=-1) * 255                        # (H, W, 3)
    rgb[size // 4: size // 2, size // 4: 3 * size // 4] = (250, 30, 60)
    return Image.fromarray(rgb.round().astype(np.uint8))


def lower_right_mask(size: int):
    """An inpainting mask (PIL L): white (repaint) lower-right block, black elsewhere."""
    import numpy as np
    from PIL import Image

    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 2:, size // 3:] = 255
    return Image.fromarray(mask)


def as_released(folder: Path, sample_size: int) -> Path:
    """Two details of released diffusers folders that `write_diffusers_folder` leaves out and diffusers needs:
    `unet/config.json` has a `sample_size` (the img2img / inpainting pipelines compare it with 64 on
    construction), and SD2's `text_encoder` is a plain `CLIPTextModel` (whose first output is the hidden
    states), not `CLIPTextModelWithProjection`."""
    import json

    from transformers import CLIPTextModel as HFTextModel
    from transformers import CLIPTextModelWithProjection

    unet_config = folder / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "sample_size": sample_size}))
    index = json.loads((folder / "model_index.json").read_text())
    if "text_encoder_2" not in index and index.get("text_encoder") == ["transformers", "CLIPTextModelWithProjection"]:
        with_projection = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder")
        plain = HFTextModel(with_projection.config)
        state = with_projection.state_dict()
        plain.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items() if k != "text_projection.weight"})
        plain.save_pretrained(folder / "text_encoder")
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder
