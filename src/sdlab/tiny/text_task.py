"""Training objective for a text encoder from scratch: CLIP-style contrastive pairs (Radford et al. 2021).

A text tower (``sdlab.models.clip.CLIPTextModel`` with a ``text_projection``, fed by the real CLIP BPE
tokenizer: 49,408 tokens, 77 positions) and an image tower (``sdlab.tiny.image_tower.ImageTower``) map
a batch of N (image, caption) pairs into one embedding space. With L2-normalised embeddings i_n, t_m and a
learned temperature, the logits are ``s_nm = exp(tau) * <i_n, t_m>`` and the loss is the symmetric
cross-entropy of CLIP's pseudocode (fig. 3)::

    L = 1/2 [ CE(S, targets) + CE(S^T, targets^T) ]

``exp(tau)`` starts at 1/0.07 and is clamped to at most 100 (paper, sec. 2.5). Captions that occur more
than once in a batch (common on small caption vocabularies) are positives for one another: each row's
target spreads evenly over the identical captions instead of declaring all but one of them negatives,
which would ask for different embeddings of the same string. With distinct captions this is exactly
CLIP's loss.

Which output conditions a U-Net: the per-token hidden states, not the pooled embedding. The text tower
trained here is meant to be used like SD1's: the *last* layer after the final LayerNorm
(``model(ids).last_hidden_state``, (B, 77, width)); that is what the contrastive loss trains directly,
since the pooled end-of-text state is read from it. ``save_weights`` records this as
``sdlab.text_hidden_states = ["last"]``. The pooled, projected vector is the retrieval embedding.

Deliverables: the text tower as ``CLIPTextModel.state_dict()`` (sdlab's names, those of Hugging Face's
``CLIPTextModel.text_model`` plus ``text_projection.weight``), its ``CLIPTextConfig`` as JSON under
``sdlab.config``; and beside it the image tower (``<stem>.image_tower.safetensors``, with the learned
``logit_scale``), for retrieval evaluation.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.checkpoints.file_format import (
    META_COMPONENT,
    META_CONFIG,
    META_HIDDEN_STATES,
    META_LOGIT_SCALE,
    META_WEIGHTS,
    config_from_json,
    config_to_json,
)
from sdlab.checkpoints.io import read_checkpoint, write_safetensors_atomic
from sdlab.families.loaded import ModelBundle
from sdlab.models.clip import CLIPTextConfig, CLIPTextModel
from sdlab.tiny.image_tower import ImageTower, ImageTowerConfig
from sdlab.models.tokenizer import CLIPTokenizer, default_tokenizer
from sdlab.train.config import TrainConfig
from sdlab.train.task import Batch

logger = logging.getLogger(__name__)

__all__ = [
    "LogitScale",
    "TextTask",
    "build_task",
    "contrastive_loss",
    "image_tower_path",
    "load_trained_image_tower",
    "load_trained_text_encoder",
]

INITIAL_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


class LogitScale(nn.Module):
    """The learned temperature, kept as log(scale) (CLIP's parametrisation); ``forward`` gives the clamped
    scale min(exp(log_scale), 100)."""

    def __init__(self, initial: float = 1.0 / INITIAL_TEMPERATURE):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(initial)))

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, scale: Tensor, same_caption: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch (see module docstring).

    image_embeds, text_embeds: (N, D), L2-normalised. scale: () tensor. same_caption: (N, N) bool, True where
    captions n and m are equal (the diagonal at least).
    """
    logits = scale * image_embeds @ text_embeds.T  # (N, N): image n vs caption m
    targets = same_caption.float() / same_caption.sum(dim=1, keepdim=True)  # (N, N) rows sum to 1
    image_to_text = F.cross_entropy(logits, targets)
    text_to_image = F.cross_entropy(logits.T, targets.T / targets.T.sum(dim=1, keepdim=True))
    return 0.5 * (image_to_text + text_to_image)


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def image_tower_path(text_encoder_path: str | Path) -> Path:
    """Where ``save_weights`` puts the image tower: ``<stem>.image_tower.safetensors`` beside the text tower."""
    path = Path(text_encoder_path)
    return path.with_name(f"{path.stem}.image_tower.safetensors")


@dataclass(frozen=True)
class Retrieval:
    """Result of ``TextTask.retrieve``: for each image, the index of its best caption and all similarities."""

    best: Tensor  # (N_images,) int64
    similarity: Tensor  # (N_images, N_captions) cosine similarities


class TextTask:
    """Contrastive text-image training; see the module docstring."""

    name = "text"
    ddp_names: tuple[str, ...] = ()  # no DDP wrappers: the loop averages the gradients itself (all_reduce_grads)

    def __init__(
        self,
        text_encoder: CLIPTextModel | CLIPTextConfig,
        image_encoder: ImageTower | ImageTowerConfig,
        *,
        tokenizer: CLIPTokenizer | None = None,
    ):
        self.text_encoder = text_encoder if isinstance(text_encoder, CLIPTextModel) else CLIPTextModel(text_encoder)
        self.image_encoder = image_encoder if isinstance(image_encoder, ImageTower) else ImageTower(image_encoder)
        text_dim = self.text_encoder.cfg.projection_dim
        if text_dim is None:
            raise ValueError("the text tower needs a projection_dim (its pooled, projected output is the embedding)")
        if text_dim != self.image_encoder.cfg.embed_dim:
            raise ValueError(f"text projection_dim {text_dim} != image embed_dim {self.image_encoder.cfg.embed_dim}")
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
        self._modules: dict[str, nn.Module] = {
            "text_encoder": self.text_encoder,
            "image_encoder": self.image_encoder,
            "logit_scale": LogitScale(),
        }

    # -- TrainTask ---------------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        return self._modules

    def loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Symmetric InfoNCE on the batch; ``generator`` is unused (the objective has no randomness)."""
        if batch.images is None:
            raise ValueError("the text task needs images (it trains an image tower alongside the text tower)")
        image_embeds = self._embed_images(batch.images, self._modules["image_encoder"])  # (N, D)
        text_embeds = self._embed_captions(batch.captions, self._modules["text_encoder"], image_embeds.device)
        scale = self._modules["logit_scale"]()
        captions = batch.captions
        same = torch.tensor([[a == b for b in captions] for a in captions], device=image_embeds.device)  # (N, N)
        loss = contrastive_loss(image_embeds, text_embeds, scale, same)
        with torch.no_grad():
            best = (image_embeds @ text_embeds.T).argmax(dim=1)  # (N,)
            accuracy = same[torch.arange(len(captions), device=same.device), best].float().mean()
        metrics = {"loss": loss.item(), "logit_scale": scale.item(), "batch_top1": accuracy.item()}
        return loss, metrics

    def save_weights(self, path: Path, ema: bool) -> None:
        text = _unwrap(self._modules["text_encoder"])
        image = _unwrap(self._modules["image_encoder"])
        weights = "ema" if ema else "raw"
        write_safetensors_atomic(
            path,
            text.state_dict(),
            {
                META_COMPONENT: "text_encoder",
                META_WEIGHTS: weights,
                META_CONFIG: json.dumps(config_to_json(text.cfg), sort_keys=True),
                META_HIDDEN_STATES: json.dumps(["last"]),
            },
        )
        write_safetensors_atomic(
            image_tower_path(path),
            image.state_dict(),
            {
                META_COMPONENT: "image_tower",
                META_WEIGHTS: weights,
                META_CONFIG: json.dumps(config_to_json(image.cfg), sort_keys=True),
                META_LOGIT_SCALE: repr(float(self._modules["logit_scale"]().detach())),
            },
        )
        logger.info("saved text tower to %s and image tower to %s", path, image_tower_path(path))

    def preview(self, out_dir: Path, step: int) -> None:
        """Nothing to draw: retrieval is evaluated with ``retrieve`` on held-out data by the caller."""

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def retrieve(self, images: Tensor, candidate_captions: list[str], batch_size: int = 64) -> Retrieval:
        """Best caption among ``candidate_captions`` for each of ``images`` (N, 3, H, W) in [-1, 1]."""
        text, image = self._modules["text_encoder"], self._modules["image_encoder"]
        modes = (text.training, image.training)
        text.eval()
        image.eval()
        device = _unwrap(image).head.weight.device
        image_embeds = torch.cat([self._embed_images(chunk, image) for chunk in images.split(batch_size)])
        text_embeds = torch.cat(
            [
                self._embed_captions(candidate_captions[i : i + batch_size], text, device)
                for i in range(0, len(candidate_captions), batch_size)
            ]
        )
        text.train(modes[0])
        image.train(modes[1])
        similarity = image_embeds @ text_embeds.T  # (N_images, N_captions)
        return Retrieval(best=similarity.argmax(dim=1), similarity=similarity)

    # -- internals ---------------------------------------------------------------------------------------
    @staticmethod
    def _embed_images(images: Tensor, image_encoder: nn.Module) -> Tensor:
        device = _unwrap(image_encoder).head.weight.device
        return F.normalize(image_encoder(images.to(device)), dim=-1)  # (N, D)

    def _embed_captions(self, captions: list[str], text_encoder: nn.Module, device: torch.device) -> Tensor:
        ids = self.tokenizer(list(captions)).to(device)  # (N, 77)
        return F.normalize(text_encoder(ids).pooled, dim=-1)  # (N, D)


def load_trained_text_encoder(path: str | Path, device: torch.device | str = "cpu") -> CLIPTextModel:
    """Read back the text tower ``TextTask.save_weights`` wrote."""
    state, metadata = read_checkpoint(path)
    if META_CONFIG not in metadata:
        raise ValueError(f"{path}: no {META_CONFIG} metadata; not a text tower written by sdlab")
    model = CLIPTextModel(config_from_json(CLIPTextConfig, json.loads(metadata[META_CONFIG])))
    model.load_state_dict(dict(state))
    return model.to(device)


def load_trained_image_tower(path: str | Path, device: torch.device | str = "cpu") -> tuple[ImageTower, float]:
    """Read back the image tower ``TextTask.save_weights`` wrote beside the text tower: (tower, logit scale)."""
    state, metadata = read_checkpoint(path)
    if META_CONFIG not in metadata:
        raise ValueError(f"{path}: no {META_CONFIG} metadata; not an image tower written by sdlab")
    model = ImageTower(config_from_json(ImageTowerConfig, json.loads(metadata[META_CONFIG])))
    model.load_state_dict(dict(state))
    return model.to(device), float(metadata.get(META_LOGIT_SCALE, "nan"))


def build_task(config: TrainConfig, bundle: ModelBundle) -> TextTask:
    """``sdlab train --task text``: contrastive fine-tuning of the bundle's first text encoder against a new
    image tower. A tower without ``text_projection`` (SD1's CLIP-L, SD2's OpenCLIP-H as loaded) gets a
    fresh width x width projection; everything else starts from the checkpoint."""
    encoder = bundle.text_encoders[0]
    text = encoder.model
    if text.cfg.projection_dim is None:
        text_cfg = replace(text.cfg, projection_dim=text.cfg.width)
        projected = CLIPTextModel(text_cfg).to(next(text.parameters()).device)
        missing, unexpected = projected.load_state_dict(text.state_dict(), strict=False)
        if unexpected or missing != ["text_projection.weight"]:
            raise ValueError(f"cannot add a projection to the text tower: missing {missing}, unexpected {unexpected}")
        text = projected
    image = ImageTower(ImageTowerConfig(embed_dim=text.cfg.projection_dim)).to(next(text.parameters()).device)
    return TextTask(text, image, tokenizer=encoder.tokenizer)
