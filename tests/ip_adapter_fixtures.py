"""Reduced-width CLIP image encoders (transformers' CLIPVisionModelWithProjection) and IP-Adapter files with
random weights, written in the layouts users have (h94/IP-Adapter's `image_encoder` folder, `.safetensors`
with `image_proj.` / `ip_adapter.` prefixes, and the `.bin` pickle of {"image_proj": ..., "ip_adapter": ...})."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from server_fixtures import cli_txt2img, start_server
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

SAMPLE_PICTURE = Path(__file__).resolve().parents[1] / "docs" / "samples.png"
"""A real picture shipped with the project (sdlab-tiny's samples)."""


def hf_vision_config(width: int = 128, layers: int = 2, projection: int = 32, act: str = "gelu") -> CLIPVisionConfig:
    """A ViT-H-like tower (GELU, 14-px patches, 224 px) at `width` with 64-wide heads."""
    return CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=width // 64, patch_size=14, image_size=224,
                            projection_dim=projection, hidden_act=act, layer_norm_eps=1e-5)


def hf_vision_model(seed: int = 0, std: float = 0.05, **config) -> CLIPVisionModelWithProjection:
    """A CLIPVisionModelWithProjection with every parameter drawn from N(0, std) (LayerNorm weights 1 + that)."""
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(hf_vision_config(**config)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if "norm" in name and "weight" in name else 0.0))
    return model


def write_image_encoder(folder: Path, seed: int = 0, **config) -> CLIPVisionModelWithProjection:
    """The h94/IP-Adapter `image_encoder` folder layout (config.json + model.safetensors)."""
    model = hf_vision_model(seed, **config)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def ip_adapter_state(cross_widths: list[int], context_dim: int, embed_dim: int, tokens: int = 4,
                     seed: int = 1, std: float = 0.1) -> dict[str, dict[str, torch.Tensor]]:
    """A base IP-Adapter's two parts with random weights: image_proj (proj: embed_dim -> tokens x context_dim,
    norm) and ip_adapter.{2k+1}.to_k_ip / to_v_ip for the k-th cross-attention (width cross_widths[k])."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    image_proj = {"proj.weight": draw(tokens * context_dim, embed_dim), "proj.bias": draw(tokens * context_dim),
                  "norm.weight": 1 + draw(context_dim), "norm.bias": draw(context_dim)}
    ip_adapter = {}
    for k, width in enumerate(cross_widths):
        ip_adapter[f"{2 * k + 1}.to_k_ip.weight"] = draw(width, context_dim)
        ip_adapter[f"{2 * k + 1}.to_v_ip.weight"] = draw(width, context_dim)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def write_ip_adapter(path: Path, state: dict[str, dict[str, torch.Tensor]]) -> Path:
    """`path` in its suffix's layout: .safetensors flat with `image_proj.` / `ip_adapter.` prefixes, .bin the
    pickled dict of both parts."""
    if path.suffix == ".safetensors":
        save_file({f"{part}.{key}": value.contiguous() for part, tensors in state.items()
                   for key, value in tensors.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def ip_adapter_plus_state(cross_widths: list[int], context_dim: int, hidden_dim: int, tokens: int = 16,
                          width: int = 128, depth: int = 4, seed: int = 1, std: float = 0.1) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter Plus in h94's layout with random weights: image_proj is the Perceiver resampler (latents,
    proj_in from the encoder's `hidden_dim`, layers.i.0 = norm1 / norm2 / to_q / to_kv / to_out with 64-wide
    heads, layers.i.1 = LayerNorm, Linear, GELU, Linear at 4x, proj_out, norm_out); ip_adapter as the base's."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    proj = {"latents": draw(1, tokens, width) * 5, "proj_in.weight": draw(width, hidden_dim), "proj_in.bias": draw(width),
            "proj_out.weight": draw(context_dim, width), "proj_out.bias": draw(context_dim),
            "norm_out.weight": 1 + draw(context_dim), "norm_out.bias": draw(context_dim)}
    for i in range(depth):
        for norm in ("norm1", "norm2"):
            proj[f"layers.{i}.0.{norm}.weight"], proj[f"layers.{i}.0.{norm}.bias"] = 1 + draw(width), draw(width)
        proj[f"layers.{i}.0.to_q.weight"] = draw(width, width)
        proj[f"layers.{i}.0.to_kv.weight"] = draw(2 * width, width)
        proj[f"layers.{i}.0.to_out.weight"] = draw(width, width)
        proj[f"layers.{i}.1.0.weight"], proj[f"layers.{i}.1.0.bias"] = 1 + draw(width), draw(width)
        proj[f"layers.{i}.1.1.weight"] = draw(4 * width, width)
        proj[f"layers.{i}.1.3.weight"] = draw(width, 4 * width)
    base = ip_adapter_state(cross_widths, context_dim, 8, seed=seed + 1, std=std)
    return {"image_proj": proj, "ip_adapter": base["ip_adapter"]}


def write_shipped_model_ip_adapter(models: Path) -> Path:
    """A server's models folder for the shipped model: ip-adapter_tiny.safetensors in its ControlNet folder (base
    adapter for the shipped U-Net's cross-attentions) and the image encoder in models/image_encoder."""
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    (models / "ControlNet").mkdir(parents=True)
    bundle = sdlab.load().bundle
    write_image_encoder(models / "image_encoder", seed=2, projection=32)
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    write_ip_adapter(models / "ControlNet" / "ip-adapter_tiny.safetensors",
                     ip_adapter_state(widths, bundle.unet_config.context_dim, 32, seed=3, std=0.3))
    return models


def reference_png() -> bytes:
    """A reference picture's PNG bytes: a 200x160 corner of the sample sheet."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.open(SAMPLE_PICTURE).convert("RGB").crop((0, 0, 200, 160)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- a server with a tiny IP-Adapter

ADAPTER_JOB = {"prompt": "a red apple", "steps": 3, "seed": 11, "width": 64, "height": 64, "cfg_scale": 5,
               "sampler": "Euler"}
"""The native job the server tests draw with `adapter_server`'s adapter (`cli_adapter_picture` draws it too)."""


@pytest.fixture(scope="module")
def adapter_server(tmp_path_factory: pytest.TempPathFactory):
    """`sdlab serve` whose ControlNet folder holds ip-adapter_tiny for the shipped model (its image encoder in
    models/image_encoder) and lone/ip-adapter_lone (no image encoder beside it or one folder up):
    {"server", "adapter" (its file), "picture" (a reference picture file)}."""
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    root = tmp_path_factory.mktemp("server-ip-adapter")
    models = root / "models"
    (models / "ControlNet").mkdir(parents=True)
    bundle = sdlab.load().bundle                    # the shipped model the server draws with
    write_image_encoder(models / "image_encoder", seed=2, projection=32)
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    adapter = write_ip_adapter(models / "ControlNet" / "ip-adapter_tiny.safetensors",
                               ip_adapter_state(widths, bundle.unet_config.context_dim, 32, seed=3, std=0.3))
    (models / "ControlNet" / "lone").mkdir()
    (models / "ControlNet" / "lone" / "ip-adapter_lone.safetensors").write_bytes(adapter.read_bytes())
    picture = root / "reference.png"
    Image.open(SAMPLE_PICTURE).convert("RGB").crop((0, 0, 200, 160)).save(picture)
    server = start_server(root / "outputs", "--models-dir", str(models))
    yield {"server": server, "adapter": adapter, "picture": picture}
    server.stop()


def cli_adapter_picture(adapter_server: dict, tmp_path: Path, scale: str) -> Image.Image:
    """`sdlab txt2img` of ADAPTER_JOB with `adapter_server`'s adapter and picture at --ip-adapter-scale `scale`
    (written to tmp_path / "cli.png")."""
    return cli_txt2img(tmp_path, ADAPTER_JOB["prompt"], "--steps", "3", "--seed", "11", "--width", "64", "--height",
                       "64", "--cfg", "5", "--sampler", "Euler", "--ip-adapter", str(adapter_server["adapter"]),
                       "--ip-adapter-image", str(adapter_server["picture"]), "--ip-adapter-scale", scale)
