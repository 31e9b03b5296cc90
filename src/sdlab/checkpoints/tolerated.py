"""Keys real checkpoint files carry that sdlab skips on purpose: the one list of them.

A key that no converter claims and that is not listed here is an error ("unexpected key"), so a file of
another kind is refused rather than half-loaded. Every skipped key is reported in `ComponentSource.ignored`
or the load report.
"""

from __future__ import annotations

import re

from sdlab.checkpoints.file_format import (
    COMFY_EDM_MEAN_KEY,
    COMFY_EDM_STD_KEY,
    COMFY_EDM_VPRED_MAX_KEY,
    COMFY_EDM_VPRED_MIN_KEY,
    COMFY_V_PRED_KEY,
    COMFY_ZTSNR_KEY,
)

__all__ = [
    "HF_TEXT_TOLERATED",
    "OPENCLIP_TOLERATED",
    "SDLAB_TEXT_TOLERATED",
    "SINGLE_FILE_TOLERATED",
    "TRAINING_PARTS",
    "VAE_FILE_TOLERATED",
    "is_hf_text_tolerated",
]

#: sdlab / Hugging Face CLIP text names: the position-ids buffer (sdlab rebuilds positions with arange)
SDLAB_TEXT_TOLERATED = frozenset({"embeddings.position_ids"})
#: Hugging Face CLIP text keys (``text_model.`` removed): also ``CLIPModel``'s contrastive temperature
HF_TEXT_TOLERATED = SDLAB_TEXT_TOLERATED | {"logit_scale"}
#: OpenCLIP text-tower keys: the contrastive temperature, a causal-mask buffer some files carry, and the
#: position-ids buffer of a Hugging Face tower (transformers < 4.31 saved it) that diffusers' conversion
#: scripts leave under its Hugging Face name: convert_diffusers_to_original_sdxl.py as is,
#: convert_diffusers_to_original_stable_diffusion.py after prefixing every key with ``transformer.``
OPENCLIP_TOLERATED = frozenset({
    "logit_scale", "attn_mask",
    "text_model.embeddings.position_ids", "transformer.text_model.embeddings.position_ids",
})
#: whole-file keys of single-file checkpoints outside every component: EMA copies, DDPM schedule buffers
#: (sdlab rebuilds the schedule from the family), SGM's denoiser sigmas, and ComfyUI's v-prediction,
#: zero-terminal-SNR and EDM markers (`sdlab.checkpoints.load` and `noise_model` read them by name)
SINGLE_FILE_TOLERATED = re.compile(
    r"model_ema\..*|betas|alphas_cumprod(_prev)?|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*"
    r"|lvlb_weights|logvar|denoiser\.sigmas"
    rf"|{re.escape(COMFY_V_PRED_KEY)}|{re.escape(COMFY_ZTSNR_KEY)}"
    + "".join(f"|{re.escape(key)}" for key in (COMFY_EDM_MEAN_KEY, COMFY_EDM_STD_KEY, COMFY_EDM_VPRED_MAX_KEY,
                                               COMFY_EDM_VPRED_MIN_KEY))
)
#: parts of a training run that whole-model files keep beside the model (key prefix -> what it is), skipped with a
#: warning naming them, as A1111 loads such a file (`load_state_dict(strict=False)` ignores the keys its model
#: does not have): the VAE's training loss (LPIPS and discriminator), lllyasviel's ControlNet 1.0 files (the whole
#: SD1.5 model with the ControlNet beside it), the textual_inversion repo's training checkpoints
TRAINING_PARTS = {
    "first_stage_model.loss.": "VAE training loss (LPIPS, discriminator)",
    "control_model.": "ControlNet 1.0 (lllyasviel's file: the ControlNet beside a whole SD1.5; --control takes it)",
    "embedding_manager.": "textual-inversion training state (embedding_manager)",
}
#: extra keys of standalone VAE training files (besides SINGLE_FILE_TOLERATED)
VAE_FILE_TOLERATED = re.compile(r"loss\..*|model_ema\..*")


def is_hf_text_tolerated(key: str) -> bool:
    """Whether a Hugging Face CLIP text key, with or without ``text_model.``, is skipped on purpose."""
    return key.removeprefix("text_model.") in HF_TEXT_TOLERATED
