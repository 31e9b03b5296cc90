"""What a saved whole model tells other tools about its prediction type and training schedule.

ComfyUI's checkpoint saver (`comfy_extras/nodes_model_merging.save_checkpoint`) writes an empty `v_pred`
tensor for a v-prediction model, an empty `ztsnr` beside it when the model samples with zero terminal SNR,
and `modelspec.predict_key` ("epsilon" / "v"); its loader (`supported_models.SDXL.model_type`) tells a
v-prediction model from an eps one by the `v_pred` key alone. kohya and Stability's model spec write
`modelspec.prediction_type`. Every whole-model file sdlab writes (`save_bundle`: training finals, EMA and
interrupted files, `sdlab new-model`, sdlab-tiny assembly) carries them, and loads back into sdlab unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from bundle_fixtures import tiny_bundle
from safetensors import safe_open
from train_fixtures import run_in_process, write_caption_folder

from sdlab.checkpoints.io import write_safetensors_atomic
from sdlab.checkpoints.load import load_bundle
from sdlab.checkpoints.save import bundle_state_dict, save_bundle
from sdlab.diffusion.denoiser import Prediction
from sdlab.diffusion.schedules import A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def comfyui_model_type(keys: set[str]) -> str:
    """ComfyUI's `SDXL.model_type`: "v_pred" in the state dict -> V_PREDICTION ("ztsnr" beside it: zsnr),
    else EPS."""
    if "v_pred" not in keys:
        return "EPS"
    return "V_PREDICTION zsnr" if "ztsnr" in keys else "V_PREDICTION"


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# case -> (prediction, zero terminal SNR's last alphas_cumprod or None, ComfyUI's reading, model-spec name)
CASES = {
    "eps": (Prediction.EPS, None, "EPS", "epsilon"),
    "v": (Prediction.V, None, "V_PREDICTION", "v"),
    "v_zsnr_comfyui": (Prediction.V, A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD, "V_PREDICTION zsnr", "v"),
    "v_zsnr_diffusers": (Prediction.V, 2.0**-24, "V_PREDICTION zsnr", "v"),
    "x0": (Prediction.X0, None, "EPS", None),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_saved_file_carries_comfyui_markers_and_loads_back_unchanged(tmp_path, family, case):
    prediction, terminal, comfyui_reading, spec_name = CASES[case]
    base = tiny_bundle(family, seed=1)
    schedule = None if terminal is None else replace(base.family.schedule, zero_terminal_snr=True, terminal=terminal)
    bundle = replace(base, prediction=prediction, schedule=schedule)
    path = save_bundle(bundle, tmp_path / "model.safetensors", dtype=torch.float16)

    tensors, metadata = _read(path)
    assert comfyui_model_type(set(tensors)) == comfyui_reading
    assert all(tensors[k].shape == (0,) for k in ("v_pred", "ztsnr") if k in tensors)   # empty, as ComfyUI's
    assert metadata.get("modelspec.prediction_type") == spec_name
    assert metadata.get("modelspec.predict_key") == spec_name

    back = load_bundle(path)
    assert back.prediction is prediction and back.schedule == schedule
    assert back.report.prediction_source == "metadata sdlab.prediction"
    expected = bundle_state_dict(bundle, torch.float16)
    assert all(torch.equal(v, expected[k]) for k, v in bundle_state_dict(back, torch.float16).items())


def test_markers_alone_give_the_prediction_and_schedule(tmp_path):
    """Without sdlab's metadata the file still reads as v-prediction on ComfyUI's zero-SNR schedule."""
    base = tiny_bundle("sdxl", seed=2)
    zsnr = replace(base.family.schedule, zero_terminal_snr=True, terminal=A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD)
    tensors, _ = _read(save_bundle(replace(base, prediction=Prediction.V, schedule=zsnr), tmp_path / "m.safetensors"))
    bare = load_bundle(write_safetensors_atomic(tmp_path / "bare.safetensors", tensors))
    assert bare.prediction is Prediction.V and bare.schedule == zsnr
    assert bare.report.prediction_source == "v_pred marker key"


def test_full_finetune_of_a_comfyui_vpred_zsnr_file_keeps_its_markers(tmp_path):
    """A v-prediction zero-SNR SDXL file in ComfyUI's form (markers, no sdlab metadata) fine-tuned with EMA:
    the final and EMA files read as the same kind of model in ComfyUI and in sdlab."""
    source = tmp_path / "vpred-zsnr.safetensors"
    markers = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    write_safetensors_atomic(source, bundle_state_dict(tiny_bundle("sdxl", seed=0)) | markers)
    data = write_caption_folder(tmp_path / "data", n=2, size=16)
    run_in_process(tmp_path / "run", source, data, "--max-steps", "1", "--ema-decay", "0.9", "--save-dtype", "fp16")
    for name in ("final.safetensors", "final-ema.safetensors"):
        tensors, metadata = _read(tmp_path / "run" / name)
        assert comfyui_model_type(set(tensors)) == "V_PREDICTION zsnr", name
        assert metadata["modelspec.prediction_type"] == "v" == metadata["modelspec.predict_key"]
        tuned = load_bundle(tmp_path / "run" / name)
        assert tuned.prediction is Prediction.V and tuned.schedule is not None and tuned.schedule.zero_terminal_snr
        assert tuned.schedule.terminal == A1111_ZERO_SNR_TERMINAL_ALPHAS_CUMPROD


def test_comfyui_predict_key_alone_gives_the_prediction(tmp_path):
    """A file whose only word on its prediction is ComfyUI's `modelspec.predict_key` metadata reads as that."""
    tensors = bundle_state_dict(tiny_bundle("sd2", seed=3))
    path = write_safetensors_atomic(tmp_path / "m.safetensors", tensors, metadata={"modelspec.predict_key": "v"})
    loaded = load_bundle(path)
    assert loaded.prediction is Prediction.V
    assert loaded.report.prediction_source == "metadata modelspec.predict_key"
