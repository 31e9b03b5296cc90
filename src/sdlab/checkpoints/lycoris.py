"""The weight change each kind of LoRA / LyCORIS module makes to the layer it names, as A1111
(extensions-builtin/Lora/network_*.py) and ComfyUI (comfy/weight_adapter/*.py) merge them.

A module is a dict of its tensors by field name (the key's suffix: ``hada_w1_a``, ...; a LoRA's
``lora_down.weight`` / ``lora_up.weight`` / ``lora_mid.weight`` (or peft's ``lora_A`` / ``lora_B``) are
``down`` / ``up`` / ``mid``);
`module_kind` tells the kind from the fields present and `module_delta` returns ``(dW, db)``, the change
to the layer's weight and bias at multiplier 1, so that merging at multiplier ``m`` is ``W + m * dW``
(DoRA is the one non-linear kind: `merged_weight` handles it). ``scale`` below is ``alpha / rank`` (1 when
a file has no ``alpha``).

- LoRA / LoCon (``down`` (r, in[, kh, kw]), ``up`` (out, r[, 1, 1]), optional ``mid`` (r, r, kh, kw),
  the Tucker core of a conv): ``dW = scale * up @ down``; with a core,
  ``dW[o, i, k, l] = scale * sum_{m, n} up[o, m] * mid[m, n, k, l] * down[n, i]``
  (A1111 lyco_helpers.rebuild_cp_decomposition).
- LoHa (``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in*kh*kw), ``hada_w2_a``, ``hada_w2_b``, optional Tucker
  cores ``hada_t1`` / ``hada_t2`` (r, r, kh, kw)): ``dW = scale * (w1a @ w1b) * (w2a @ w2b)`` (element-wise
  product); with cores each factor is ``einsum("i j k l, j r, i p -> p r k l", t, wb, wa)`` (ComfyUI loha.py);
  rank = ``hada_w1_b.shape[0]``.
- LoKr (``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a @ lokr_w2_b`` or, with
  ``lokr_t2``, the Tucker rebuild as LoHa's): ``dW = scale * kron(w1, w2)`` where w1 gains two trailing
  unit dims when w2 is a conv kernel; ``scale = alpha / rank`` only when a factor is decomposed (rank = the
  decomposed ``*_b.shape[0]``, w2's when both are), else 1 (ComfyUI lokr.py, LyCORIS lokr).
- GLoRA (``a1.weight`` / ``a2.weight`` / ``b1.weight`` / ``b2.weight``, fields ``glora_a1`` ...): LyCORIS's layout,
  a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in[, kh, kw]): ``dW = scale * (W a1 a2 + b1 b2)`` (W's input axis
  contracted with a1, then a2), rank = ``a2.shape[0]``; the older layout, a1 (r, in), a2 (in, r), b1 (r, in),
  b2 (out, r): ``dW = scale * (b2 b1 + W a2 a1)``, rank = ``a1.shape[0]``, read where the shapes fit only it
  or the layer is square with a2 (out, r) (ComfyUI weight_adapter/glora.py, as LyCORIS's GLoRAModule draws them).
- (IA)^3 (``weight`` and ``on_input``): ``dW = W * w`` with w a column (out, 1) or, ``on_input``, a row
  (1, in) (A1111 network_ia3.py); no alpha.
- Full (``diff``, optional ``diff_b``): ``dW = diff``, ``db = diff_b``, no alpha (A1111 network_full.py);
  LyCORIS's ``train_norm`` diffs of GroupNorm / LayerNorm layers (``w_norm``, ``b_norm``) are read as these
  (A1111 network_norm.py, ComfyUI lora.py).
- DoRA (``dora_scale`` beside any of the above): ``W' = W + m * ((W + dW) * dora_scale / ||W + dW|| - W)``,
  the norm taken over every axis where ``dora_scale`` has size 1 (LyCORIS ``wd_on_out``: one norm per
  output row, shape (out, 1, ...); A1111 / ComfyUI's layout: one per input column, shape (1, in, ...)).
- peft's DoRA (``magnitude``, peft's ``lora_magnitude_vector``, one norm per output row, beside a LoRA):
  ``W' = W_m * magnitude / ||W_m||`` with ``W_m = W + m * dW``, as peft merges it at a scale (diffusers'
  ``fuse_lora(lora_scale=m)``, ``set_adapters``): the multiplier scales the LoRA product, then the rows are
  renormalised, where A1111 / ComfyUI's rule above scales the whole change (the two agree at 1).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["FIELDS", "KINDS", "merged_weight", "module_delta", "module_kind"]

# field name -> the kind it marks (fields shared by every kind, like alpha, map to None)
FIELDS: dict[str, str | None] = {
    "down": "lora", "up": "lora", "mid": "lora",
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha",
    "hada_t1": "loha", "hada_t2": "loha",
    "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr", "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr", "lokr_t2": "lokr",
    "weight": "ia3", "on_input": "ia3",
    "diff": "full", "diff_b": "full",
    "glora_a1": "glora", "glora_a2": "glora", "glora_b1": "glora", "glora_b2": "glora",
    "alpha": None, "dora_scale": None, "magnitude": None,
}

# kind -> the fields it needs (one of each tuple)
KINDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "lora": (("down",), ("up",)),
    "loha": (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
    "ia3": (("weight",), ("on_input",)),
    "full": (("diff",),),
    "glora": (("glora_a1",), ("glora_a2",), ("glora_b1",), ("glora_b2",)),
}


def module_kind(module: Mapping[str, Tensor]) -> str:
    """The kind of a module from its fields; ValueError when they mix kinds or miss a needed one."""
    kinds = {FIELDS[f] for f in module if FIELDS.get(f)}
    if len(kinds) != 1:
        raise ValueError(f"fields {sorted(module)} are not one LoRA / LyCORIS module kind")
    kind = kinds.pop()
    missing = [" or ".join(options) for options in KINDS[kind] if not any(o in module for o in options)]
    pairs = {"lokr_w1_a": "lokr_w1_b", "lokr_w2_a": "lokr_w2_b", "hada_t1": "hada_t2", "hada_t2": "hada_t1"}
    missing += [b for a, b in pairs.items() if a in module and b not in module]
    if missing:
        raise ValueError(f"a {kind} module without {', '.join(missing)}")
    return kind


def _f32(module: Mapping[str, Tensor], field: str) -> Tensor:
    return module[field].to(torch.float32)


def module_rank(module: Mapping[str, Tensor], weight_shape: tuple[int, ...] | None = None) -> int | None:
    """The rank a module's alpha is divided by (A1111's `dim`): the rows of a LoRA's down, a LoHa's hada_w1_b, a
    LoKr's lokr_w2_b (else its lokr_w1_b), a GLoRA's by its layout (`_glora_is_old`; the layer's (out, in)
    `weight_shape` breaks a tie); None where there is none (a LoKr of whole factors, (IA)^3, a diff)."""
    if "glora_a1" in module:
        a1, a2 = module["glora_a1"], module["glora_a2"]
        return a1.shape[0] if _glora_is_old(module, weight_shape) else a2.shape[0]
    return next((module[field].shape[0] for field in ("down", "hada_w1_b", "lokr_w2_b", "lokr_w1_b")
                 if field in module), None)


def _glora_is_old(module: Mapping[str, Tensor], weight_shape: tuple[int, ...] | None) -> bool:
    """Whether a GLoRA module is in the older layout (a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r)), not
    LyCORIS's (a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in)), by its shapes; where both fit, the older one
    only on a square layer of a2's rows (ComfyUI weight_adapter/glora.py; unknown layer: LyCORIS's)."""
    a1, a2, b1, b2 = (module[f].flatten(1).shape for f in ("glora_a1", "glora_a2", "glora_b1", "glora_b2"))
    old = b2[1] == b1[0] == a1[0] == a2[1]
    new = b2[0] == b1[1] == a1[1] == a2[0]
    square = weight_shape is not None and a2[0] == weight_shape[0] == weight_shape[1]
    return old and (not new or square)


def _alpha_scale(module: Mapping[str, Tensor], rank: int) -> float:
    return float(module["alpha"]) / rank if "alpha" in module else 1.0


def _tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """``einsum("i j k l, j r, i p -> p r k l", t, wb, wa)``: wa (out, r), t (r, r, kh, kw), wb (r, in)."""
    return torch.einsum("ijkl,jr,ip->prkl", t, wb.flatten(1), wa.flatten(1))          # (out, in, kh, kw)


def _lora(module: Mapping[str, Tensor], shape: torch.Size) -> Tensor:
    down, up = _f32(module, "down"), _f32(module, "up")
    rank = down.shape[0]
    if "mid" in module:                                                               # conv Tucker core
        delta = torch.einsum("mnkl,om,ni->oikl", _f32(module, "mid"), up.flatten(1), down.flatten(1))
    elif len(shape) == 4 and down.ndim == 4 and down.shape[-2:] != (1, 1):           # kxk down, 1x1 up
        delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
    else:
        delta = up.flatten(1) @ down.flatten(1)                                       # (out, in*kh*kw)
    return delta.reshape(shape).mul_(_alpha_scale(module, rank))                        # delta is new: scaled in place


def _loha(module: Mapping[str, Tensor], shape: torch.Size) -> Tensor:
    w1a, w1b, w2a, w2b = (_f32(module, f) for f in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if "hada_t1" in module:
        m1 = _tucker(_f32(module, "hada_t1"), w1a, w1b)
        m2 = _tucker(_f32(module, "hada_t2"), w2a, w2b)
    else:
        m1, m2 = w1a @ w1b, w2a @ w2b                                                 # (out, in*kh*kw) each
    return (m1 * m2).reshape(shape) * _alpha_scale(module, module_rank(module))


def _lokr(module: Mapping[str, Tensor], shape: torch.Size) -> Tensor:
    if "lokr_w1" in module:
        w1 = _f32(module, "lokr_w1")
    else:
        w1 = _f32(module, "lokr_w1_a") @ _f32(module, "lokr_w1_b")
    if "lokr_w2" in module:
        w2 = _f32(module, "lokr_w2")
    else:
        wa, wb = _f32(module, "lokr_w2_a"), _f32(module, "lokr_w2_b")
        w2 = _tucker(_f32(module, "lokr_t2"), wa, wb) if "lokr_t2" in module else wa @ wb
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]                                                     # (o1, i1, 1, 1)
    rank = module_rank(module)
    scale = _alpha_scale(module, rank) if rank is not None else 1.0
    return torch.kron(w1, w2.contiguous()).reshape(shape) * scale


def _glora(module: Mapping[str, Tensor], weight: Tensor) -> Tensor:
    a1, a2, b1, b2 = (_f32(module, f).flatten(1) for f in ("glora_a1", "glora_a2", "glora_b1", "glora_b2"))
    w = weight.to(torch.float32)
    if _glora_is_old(module, tuple(w.shape)):
        delta = b2 @ b1 + w.flatten(1) @ a2 @ a1                                          # (out, in*kh*kw)
    else:
        wa = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", w, a1), a2)  # (out, in[, kh, kw])
        delta = wa.reshape(w.shape) + (b1 @ b2).reshape(w.shape)
    return delta.reshape(w.shape) * _alpha_scale(module, module_rank(module, tuple(w.shape)))


def _ia3(module: Mapping[str, Tensor], weight: Tensor) -> Tensor:
    w = _f32(module, "weight").flatten()
    on_input = bool(module["on_input"].flatten()[0])
    w = w.reshape(1, -1, *([1] * (weight.ndim - 2))) if on_input else w.reshape(-1, *([1] * (weight.ndim - 1)))
    return weight.to(torch.float32) * w


def module_delta(module: Mapping[str, Tensor], weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """(dW shaped as `weight`, db or None) in float32 at multiplier 1, before any DoRA rescaling.
    ValueError when the module's tensors do not fit `weight`."""
    kind = module_kind(module)
    shape = weight.shape
    try:
        if kind == "lora":
            return _lora(module, shape), None
        if kind == "loha":
            return _loha(module, shape), None
        if kind == "lokr":
            return _lokr(module, shape), None
        if kind == "ia3":
            return _ia3(module, weight), None
        if kind == "glora":
            return _glora(module, weight), None
        diff_b = _f32(module, "diff_b").flatten() if "diff_b" in module else None
        return _f32(module, "diff").reshape(shape), diff_b                              # no alpha (A1111)
    except RuntimeError as exc:                     # matmul / reshape / broadcast of mismatched sizes
        sizes = ", ".join(f"{f} {tuple(t.shape)}" for f, t in module.items() if t.ndim)
        raise ValueError(f"{kind} tensors ({sizes}) do not fit the layer's weight {tuple(shape)}") from exc


def _renormalised(merged: Tensor, scale: Tensor, per_output: bool) -> Tensor:
    """``merged * scale / ||merged||``, the norm taken per output row (`per_output`) or per input column."""
    if per_output:
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *([1] * (merged.ndim - 1)))     # (out, 1, ...)
        scale = scale.reshape(-1, *([1] * (merged.ndim - 1)))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *([1] * (merged.ndim - 2)))  # (1, in, ...)
        scale = scale.reshape(1, -1, *([1] * (merged.ndim - 2)))
    return merged * (scale / norm)


def merged_weight(module: Mapping[str, Tensor], weight: Tensor, multiplier: float) -> tuple[Tensor, Tensor | None]:
    """(the new weight, in float32; db to add to the bias or None) after merging `module` at `multiplier`."""
    w = weight.to(torch.float32)
    delta, delta_bias = module_delta(module, weight)
    delta_bias = None if delta_bias is None else multiplier * delta_bias
    if "magnitude" in module:                                                         # peft's DoRA
        magnitude = _f32(module, "magnitude")
        if magnitude.numel() != w.shape[0]:
            raise ValueError(f"lora_magnitude_vector {tuple(magnitude.shape)} does not fit the weight {tuple(w.shape)}")
        return _renormalised(w + multiplier * delta, magnitude, per_output=True), delta_bias
    if "dora_scale" not in module:
        return w + multiplier * delta, delta_bias
    dora = _f32(module, "dora_scale")
    if dora.numel() not in (w.shape[0], w.shape[1]):
        raise ValueError(f"dora_scale {tuple(dora.shape)} fits neither axis of the weight {tuple(w.shape)}")
    per_output = dora.numel() == w.shape[0] and (dora.ndim == 1 or dora.shape[0] == w.shape[0])
    return w + multiplier * (_renormalised(w + delta, dora, per_output) - w), delta_bias
