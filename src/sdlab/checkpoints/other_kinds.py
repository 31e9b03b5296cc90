"""What a file that is not a whole model is: a LoRA, a ControlNet, a T2I-Adapter, an IP-Adapter, a VAE, an
upscaler, a textual-inversion embedding, a CLIP image encoder, one component folder of a diffusers pipeline, a
U-Net saved alone, or an ``sdlab train`` run checkpoint (`sdlab inspect` on it).

Each kind is recognised by the reader that loads it for generation (`load_lora_file`, `read_controlnet`,
`read_t2i_adapter`, `load_vae_source`, `read_upscaler`, `load_embedding`), tried in that order (the embedding reader last: it
takes any single 2-D tensor), so what is described here is what `--lora`, `--control`, `--vae`,
`sdlab upscale --model` and `--embeddings-dir` would load; a file with LoRA keys that no reader accepts
gets the LoRA reader's error (an OFT / BOFT file, a module without its ``lora_down``), as `--lora` gives
it. The readers go by names, shapes and metadata (a LoRA's alphas, an embedding's vectors: a few
numbers): the weights of a LoRA, ControlNet, VAE or upscaler are not read (from a pickle, where its format lets torch skip them), nor checked for NaN. Every
description has the same fields: `source`, `kind`, `facts` (name -> a number, a list of numbers, a count per
part or text, as `inspect --json` gives them; `format_description` writes each as text) and `use` (the option
that takes the file). The same description makes the one-line error for such a file given as a whole model
(`not_a_model`: "this is a LoRA, not a whole model; use it with --lora ...").
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


from sdlab.checkpoints.errors import CheckpointError
from sdlab.checkpoints.io import shapes_of

Description = dict[str, Any]

_LORA_PARTS = {"unet": "U-Net", "te": "text encoder", "te1": "text encoder 1", "te2": "text encoder 2"}


def describe_other_kind(path: str | os.PathLike[str]) -> Description | None:
    """The description of `path` by the first reader that accepts it (module docstring); None when none does,
    or the error of a file its reader recognises and refuses: the `UnusableLoRAError` of LoRA keys sdlab cannot
    merge, the `RefusedAdapterError` of a T2I StyleAdapter or CoAdapter fuser."""
    from sdlab.checkpoints.lora import UnusableLoRAError
    from sdlab.checkpoints.t2i_adapter import RefusedAdapterError

    path = Path(path)
    readers: tuple[Callable[[Path], Description], ...] = (_run_checkpoint, _lora, _controlnet, _t2i_adapter,
                                                          _ip_adapter, _vae, _upscaler, _embedding, _image_encoder,
                                                          _component, _unet_alone)
    refused = None
    for describe in readers:
        try:
            return {"source": str(path), **describe(path)}
        except (UnusableLoRAError, RefusedAdapterError) as exc:
            refused = refused or exc
        except CheckpointError:
            continue
    if refused is not None:
        raise refused
    return None


def not_a_model(path: str | os.PathLike[str]) -> CheckpointError | None:
    """The one-line error for `path` given as a whole model when it is a file of another kind: what it is and
    the option that takes it, from its description (`describe_other_kind`, as `sdlab inspect` gives it); None
    when it is of none of these kinds."""
    from sdlab.checkpoints.lora import UnusableLoRAError
    from sdlab.checkpoints.t2i_adapter import RefusedAdapterError

    try:
        described = describe_other_kind(path)
    except (UnusableLoRAError, RefusedAdapterError) as exc:   # a kind its reader refuses: says so
        return exc
    if described is None:
        return None
    return CheckpointError(f"{path}: this is a {described['kind']}, not a whole model; use it with {described['use']}")


def _values(values) -> list:
    """Distinct values, sorted: [32] or [4, 8, 16]."""
    return sorted(set(values))


_RUN_STATE = frozenset(("format", "step", "config", "modules", "optimizer"))   # as `io.read_checkpoint` tells it


def _run_checkpoint(path: Path) -> Description:
    """An ``sdlab train`` run checkpoint (``checkpoints/step-N.pt``: the state of a run, not weights), from its
    stored settings; its tensors are memory-mapped, not read (first: every other reader would load them whole)."""
    import zipfile

    import torch

    if not (path.is_file() and zipfile.is_zipfile(path)):
        raise CheckpointError(f"{path}: not an sdlab train run checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch zip file, or not weights-only: torch raises many types
        raise CheckpointError(f"{path}: not an sdlab train run checkpoint") from None
    if not (isinstance(state, Mapping) and _RUN_STATE <= state.keys() and isinstance(state["config"], Mapping)):
        raise CheckpointError(f"{path}: not an sdlab train run checkpoint")
    config, step = state["config"], int(state["step"])
    facts = {"task": config.get("task"), "step": step, "max steps": config.get("max_steps"),
             "global batch": state.get("global_batch"), "lora rank": config.get("lora_rank"),
             "embedding word": config.get("embedding_word"), "EMA decay": config.get("ema_decay"),
             "model": config.get("model"), "data": config.get("data_dir")}
    return {"kind": "sdlab train run checkpoint (the training state of a run, not weights)",
            "facts": {name: value for name, value in facts.items() if value is not None},
            "use": f"sdlab train --resume {path} --output-dir NEW_FOLDER --max-steps {step} (writes its weights; a "
                   f"higher --max-steps trains on)"}


def _lora(path: Path) -> Description:
    from sdlab.checkpoints.io import read_checkpoint
    from sdlab.checkpoints.lora import load_lora_file
    from sdlab.checkpoints.lycoris import module_kind, module_rank

    modules = load_lora_file(path, weights=False)
    metadata = read_checkpoint(path)[1]
    parts = Counter(_LORA_PARTS.get(name.split("_")[1], "other") if name.startswith("lora_") else "other"
                    for name in modules)
    facts = {
        "modules": dict(sorted(parts.items())),
        "module kinds": _values(module_kind(m) for m in modules.values()),
        "parameters": sum(t.numel() for m in modules.values() for f, t in m.items() if f != "alpha"),
    }
    ranks = [rank for m in modules.values() if (rank := module_rank(m)) is not None]
    if ranks:
        facts["rank"] = _values(ranks)
    alphas = [round(float(m["alpha"]), 4) for m in modules.values() if "alpha" in m]
    if alphas:
        facts["alpha"] = _values(alphas)
    for key, label in (("ss_base_model_version", "trained for"), ("modelspec.architecture", "architecture"),
                       ("ss_output_name", "name")):
        if metadata.get(key):
            facts[label] = metadata[key]
    return {"kind": "LoRA", "facts": facts,
            "use": "--lora FILE[:WEIGHT], or <lora:NAME:WEIGHT> in the prompt with the file in --lora-dir"}


def _controlnet(path: Path) -> Description:
    from sdlab.checkpoints.components import meta_device_without_init
    from sdlab.checkpoints.controlnet import family_label, read_controlnet
    from sdlab.models.controlnet import ControlNet

    found = read_controlnet(path, shapes_only=True)
    cfg = found.config
    with meta_device_without_init():
        parameters = sum(p.numel() for p in ControlNet(cfg).parameters())
    facts = {"for": f"{family_label(cfg.unet)} models", "layout": found.layout, "hint": cfg.hint_channels}
    if cfg.hint_bgr:
        facts["hint order"] = "BGR"
    if cfg.global_pool:
        facts["residuals"] = "pooled over the picture (shuffle)"
    facts["parameters"] = parameters
    return {"kind": "ControlNet", "facts": facts, "use": "--control FILE:IMAGE[:STRENGTH]"}


def _t2i_adapter(path: Path) -> Description:
    from sdlab.checkpoints.components import meta_device_without_init
    from sdlab.checkpoints.t2i_adapter import read_t2i_adapter
    from sdlab.models.t2i_adapter import T2IAdapter

    found = read_t2i_adapter(path, shapes_only=True)
    cfg = found.config
    with meta_device_without_init():
        parameters = sum(p.numel() for p in T2IAdapter(cfg).parameters())
    facts = {"for": "SDXL models" if cfg.downsampled[1:2] == (False,) else "SD1 / SD2 models", "kind": cfg.kind,
             "layout": found.layout, "hint": cfg.hint_channels, "features": list(cfg.channels),
             "parameters": parameters}
    return {"kind": "T2I-Adapter", "facts": facts, "use": "--control FILE:IMAGE[:STRENGTH]"}


def _ip_adapter(path: Path) -> Description:
    from sdlab.checkpoints.image_encoder import TOWERS_BY_WIDTH
    from sdlab.checkpoints.ip_adapter import read_ip_adapter

    cfg, tensors = read_ip_adapter(path)
    hidden = cfg.resampler is not None or cfg.full
    towers = [name for width, (name, tower) in TOWERS_BY_WIDTH.items()
              if (width if hidden else tower.projection_dim) == cfg.embed_dim]
    reads = "hidden states" if hidden else "face embeddings (InsightFace)" if cfg.face_id else "image embeddings"
    towers = [] if cfg.face_id else towers
    if cfg.face_id_plus:
        clip = TOWERS_BY_WIDTH.get(cfg.clip_width)
        reads += f" and {cfg.clip_width}-wide image encoder hidden states" + (f" ({clip[0]})" if clip else "")
    projection = ("Plus (resampler)" if cfg.resampler is not None else "Full-face (MLP)" if cfg.full
                  else "FaceID Plus (MLP, resampler)" if cfg.face_id_plus else "FaceID (MLP)" if cfg.face_id
                  else "base")
    facts = {"for": f"U-Nets of a {cfg.context_dim}-wide text context, {len(cfg.widths)} cross-attentions",
             "image projection": projection, "tokens": cfg.tokens or "one per image encoder position",
             "reads": f"{cfg.embed_dim}-wide {reads}" + (f" ({' or '.join(towers)})" if towers else ""),
             "parameters": sum(shape.numel() for shape in shapes_of(tensors).values())}
    if cfg.unet_lora:
        facts["U-Net LoRA"] = "for the attentions, merged at weight 1 while the adapter draws (as diffusers)"
    use = ("--ip-adapter FILE --ip-adapter-image PICTURE --ip-adapter-face-embedding FACE.npy, an InsightFace face "
           "embedding (sdlab computes none); Python: IPAdapterInput(FILE, PICTURE, face_embedding=FACE)"
           if cfg.face_id_plus else
           "--ip-adapter FILE --ip-adapter-image FACE.npy, an InsightFace face embedding (sdlab computes none); "
           "Python: IPAdapterInput(FILE, FACE)" if cfg.face_id else
           "--ip-adapter FILE --ip-adapter-image PICTURE (its image encoder beside it or --ip-adapter-encoder)")
    return {"kind": "IP-Adapter", "facts": facts, "use": use}


def _image_encoder(path: Path) -> Description:
    from sdlab.checkpoints.image_encoder import TOWERS_BY_WIDTH, read_image_encoder

    cfg, tensors = read_image_encoder(path)
    known = TOWERS_BY_WIDTH.get(cfg.width)
    facts = {"tower": known[0] if known else f"{cfg.width} wide", "layers": cfg.layers, "heads": cfg.heads,
             "image embeddings": cfg.projection_dim,
             "parameters": sum(shape.numel() for shape in shapes_of(tensors).values())}
    return {"kind": "CLIP image encoder", "facts": facts, "use": "--ip-adapter-encoder PATH (an IP-Adapter's)"}


def _vae(path: Path) -> Description:
    from sdlab.checkpoints.single_file import load_vae_source

    source = load_vae_source(path)
    cfg = source.config
    _, parameters = source.check()
    facts = {"latent": cfg.latent_channels, "downsampling": cfg.downsample_factor,
             "widths": _values(cfg.base_channels * m for m in cfg.channel_mult), "parameters": parameters}
    return {"kind": "VAE", "facts": facts, "use": "--vae PATH (in place of the model's own VAE)"}


def _upscaler(path: Path) -> Description:
    from sdlab.checkpoints.upscaler import read_upscaler

    net = read_upscaler(path)
    cfg = net.config
    facts = {"architecture": type(net).__name__, "scale": cfg.scale, "features": cfg.features,
             "parameters": sum(p.numel() for p in net.parameters())}
    return {"kind": "upscaler", "facts": facts, "use": "sdlab upscale IMAGE --model FILE (or the hires fix's upscaler)"}


def _embedding(path: Path) -> Description:
    from sdlab.checkpoints.embeddings import load_embedding

    embedding = load_embedding(path)
    widths = embedding.widths()
    families = _families_with_text_widths(widths)
    if not families:                      # any lone 2-D tensor reads as vectors: only a family's widths count
        raise CheckpointError(f"{path}: no model family has text encoders {widths} wide")
    facts = {"vectors": embedding.num_vectors, "width": list(widths), "for": families}
    if embedding.step is not None:
        facts["trained steps"] = embedding.step
    if embedding.sd_checkpoint_name:
        facts["trained on"] = embedding.sd_checkpoint_name
    return {"kind": "textual-inversion embedding", "facts": facts,
            "use": f"--embeddings-dir DIR (the file in DIR), then {embedding.name!r} in the prompt"}


def _families_with_text_widths(widths: tuple[int, ...]) -> list[str]:
    """The model families (inpainting and edit variants left out) whose text encoders have these widths, in order."""
    from sdlab.families import registered_families

    return [spec.name for spec in registered_families() if not spec.name.endswith(("-inpaint", "-edit"))
            and tuple(te.config.width for te in spec.text_encoders) == widths]


def _component(path: Path) -> Description:
    """One component folder of a diffusers pipeline (`unet/`, `text_encoder/`): what its config.json says."""
    from sdlab.checkpoints.diffusers_folder import component_weights, read_config_json

    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    config = read_config_json(path / "config.json")
    shown = ("in_channels", "out_channels", "cross_attention_dim", "sample_size", "block_out_channels",
             "latent_channels", "hidden_size", "num_hidden_layers", "projection_dim")
    facts: dict[str, Any] = {key: config[key] for key in shown if config.get(key) is not None}
    facts["parameters"] = sum(s.numel() for s in shapes_of(component_weights(path)).values())
    pipeline = path.resolve().parent
    where = pipeline if (pipeline / "model_index.json").is_file() else "the folder above it with model_index.json"
    name = config.get("_class_name") or next(iter(config.get("architectures") or []), "component")
    return {"kind": f"diffusers {name} folder (one part of a pipeline)", "facts": facts,
            "use": f"--model with the whole pipeline: {where}"}


# a U-Net's own keys, without the checkpoint's model.diffusion_model. prefix: (layout, input conv, output conv,
# the top-level modules its keys are under)
_UNET_ALONE = (("original (LDM) layout", "input_blocks.0.0.weight", "out.2.weight",
                {"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out"}),
               ("diffusers layout", "conv_in.weight", "conv_out.weight",
                {"conv_in", "time_embedding", "add_embedding", "class_embedding", "encoder_hid_proj", "down_blocks",
                 "mid_block", "up_blocks", "conv_norm_out", "conv_out"}))


def _unet_alone(path: Path) -> Description:
    """A denoising U-Net saved alone (ComfyUI's UNETLoader files, a diffusers `unet/` weights file downloaded by
    itself): its input conv, output conv and timestep embedding at the top level, or each key under a whole
    checkpoint's ``model.diffusion_model.`` prefix; nothing else of a model (every key under a U-Net module of
    its layout: no VAE, no text encoder)."""
    from sdlab.checkpoints.io import read_checkpoint
    from sdlab.families.base import UNET_PREFIX

    if path.is_dir():
        raise CheckpointError(f"{path}: a folder")
    shapes = shapes_of(read_checkpoint(path, shapes_only=True)[0])
    if shapes and all(k.startswith(UNET_PREFIX) for k in shapes):
        shapes = {k.removeprefix(UNET_PREFIX): s for k, s in shapes.items()}
    layout = next((name for name, conv_in, conv_out, _ in _UNET_ALONE if conv_in in shapes and conv_out in shapes),
                  None)
    if layout is None or not any(k.startswith(("time_embed.", "time_embedding.")) for k in shapes):
        raise CheckpointError(f"{path}: not a U-Net")
    conv_in, modules = next((conv_in, modules) for name, conv_in, _, modules in _UNET_ALONE if name == layout)
    others = sorted({k.split(".", 1)[0] for k in shapes} - modules)
    if others:
        raise CheckpointError(f"{path}: not a U-Net alone (also {', '.join(others[:3])})")
    conv_in = shapes[conv_in]
    contexts = {tuple(s)[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight") and len(s) == 2}
    facts: dict[str, Any] = {"layout": layout, "input channels": conv_in[1]}
    if contexts:
        facts["context width"] = _values(contexts)
    facts["parameters"] = sum(s.numel() for s in shapes.values())
    where = ("a copy of its base model's diffusers folder holding it as unet/ (with the config.json it came with)"
             if layout.startswith("diffusers") else
             "a checkpoint of its base model holding it under model.diffusion_model. in place of the base's U-Net")
    return {"kind": "U-Net alone (no text encoder, no VAE)", "facts": facts, "use": f"--model with {where}"}


# how a fact reads as text where its value alone does not say it
_TEXT: dict[str, Callable[[Any], str]] = {
    "modules": lambda parts: f"{sum(parts.values())} ({', '.join(f'{part} {n}' for part, n in parts.items())})",
    "hint": "{} channels".format,
    "latent": "{} channels".format,
    "downsampling": "1/{} of the picture's size".format,
    "scale": "{}x".format,
    "width": lambda widths: " + ".join(map(str, widths)),
}


def _fact_text(name: str, value: Any) -> str:
    """A fact's value as text: by `_TEXT`, else an integer with thousands separators, a list comma-separated."""
    if name in _TEXT:
        return _TEXT[name](value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def format_description(description: Mapping[str, Any]) -> str:
    """The text `sdlab inspect` prints for a description (`describe_other_kind`)."""
    lines = [f"{'file':<16}{description['source']}", f"{'kind':<16}{description['kind']}"]
    lines += [f"{name:<15} {_fact_text(name, value)}" for name, value in description["facts"].items()]
    lines.append(f"{'use':<16}{description['use']}")
    return "\n".join(lines)


__all__ = ["describe_other_kind", "format_description", "not_a_model"]
