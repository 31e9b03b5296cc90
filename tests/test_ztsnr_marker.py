"""ComfyUI's `ztsnr` marker key: a v-prediction single file trained with zero terminal SNR.

ComfyUI (`comfy/supported_models.py`, `SDXL.model_type`) reads two empty marker tensors: `v_pred` makes
the model v-prediction, `ztsnr` beside it turns on `sampling_settings["zsnr"]`, and its model sampling
rescales the SD schedule to zero terminal SNR (`rescale_zero_terminal_snr_sigmas`, the last alphas_cumprod
set to 4.8973451890853435e-08, sigma_max ~= 4519). Files such as NoobAI-XL v-pred ship these keys, and
ComfyUI's own checkpoint saver writes them. sdlab loads such a file, and samples on the same sigmas.
"""

from __future__ import annotations

import pytest
import torch
from bundle_fixtures import tiny_bundle

import sdlab
from sdlab.checkpoints.io import write_safetensors_atomic
from sdlab.checkpoints.save import bundle_state_dict
from sdlab.diffusion.denoiser import Prediction
from sdlab.diffusion.schedules import make_betas
from sdlab.pipeline.request import GenerationRequest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _comfyui_zsnr_sigmas() -> torch.Tensor:
    """ComfyUI's zero-SNR sigmas, written after `rescale_zero_terminal_snr_sigmas` (comfy/model_sampling.py):
    SD's sigmas -> sqrt(alphas_cumprod), shifted to 0 at the end and rescaled to keep the first, the last
    alphas_cumprod set to 4.8973451890853435e-08. (T,), ascending."""
    alphas_cumprod = torch.cumprod(1.0 - make_betas("scaled_linear", 1000, 0.00085, 0.012), dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    sqrt_ac = (1 / (sigmas * sigmas + 1)).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    alphas_bar = sqrt_ac**2
    alphas_bar[-1] = 4.8973451890853435e-08
    return ((1 - alphas_bar) / alphas_bar) ** 0.5


def _write(tmp_path, family: str, *markers: str):
    path = tmp_path / f"{family}-{'-'.join(markers) or 'plain'}.safetensors"
    state = bundle_state_dict(tiny_bundle(family, seed=3)) | {m: torch.tensor([]) for m in markers}
    return write_safetensors_atomic(path, state, None)


@pytest.mark.parametrize("family", ["sdxl", "sd1", "sd2"])
def test_ztsnr_marker_loads_as_zero_snr_v_prediction(tmp_path, family):
    bundle = sdlab.load(_write(tmp_path, family, "v_pred", "ztsnr")).bundle
    assert bundle.prediction is Prediction.V
    assert bundle.schedule is not None and bundle.schedule.zero_terminal_snr
    assert bundle.report.schedule_source == "ztsnr marker key"
    assert "ztsnr" in bundle.report.ignored
    sampling = bundle.model_sampling
    torch.testing.assert_close(sampling.schedule.sigmas, _comfyui_zsnr_sigmas(), rtol=1e-9, atol=0)
    assert sampling.sigma_max == pytest.approx(4518.76, rel=1e-5)       # ComfyUI's first sigma


def test_v_pred_marker_alone_keeps_sd_schedule(tmp_path):
    bundle = sdlab.load(_write(tmp_path, "sdxl", "v_pred")).bundle
    assert bundle.prediction is Prediction.V and bundle.schedule is None
    assert bundle.model_sampling.sigma_max == pytest.approx(14.6146, rel=1e-4)


def test_ztsnr_file_draws_from_its_first_sigma(tmp_path):
    """A zero-SNR file draws (finite pictures) on a schedule that starts at its ~4519 sigma_max."""
    pipe = sdlab.load(_write(tmp_path, "sdxl", "v_pred", "ztsnr"))
    plan = pipe.resolve(GenerationRequest(prompt="a fox", steps=3, width=32, height=32, sampler="Euler",
                                          schedule="trailing", seed=0))
    assert float(plan.sigmas[0]) == pytest.approx(4518.76, rel=1e-5)
    image = pipe.txt2img("a fox", steps=3, width=32, height=32, sampler="Euler", schedule="trailing", seed=0).images[0]
    assert image.size == (32, 32)
