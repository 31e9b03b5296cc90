"""The IP-Adapter's step window (`IPAdapterInput.start` / `end`, A1111's Guidance Start / End of an IP-Adapter
unit): the steps on which the U-Net is given the adapter's image prompt are those the reference rules pick, both
rules transcribed here, for one- and two-call samplers; a window of every step is the unwindowed picture, bit for
bit; bad windows are refused; the infotext records it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdlab
from ip_adapter_fixtures import SAMPLE_PICTURE, ip_adapter_state, write_image_encoder, write_ip_adapter
from sdlab.models.ip_adapter import cross_attentions
from sdlab.pipeline import image_prompt
from sdlab.pipeline.image_prompt import IPAdapterInput
from sdlab.pipeline.request import RequestError

STEPS = 6
pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = dict(steps=STEPS, seed=5, width=64, height=64, cfg_scale=5.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe = sdlab.load()
    models = tmp_path_factory.mktemp("ip-window")
    write_image_encoder(models / "image_encoder", seed=2, projection=32)
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(pipe.bundle.unet)]
    adapter = write_ip_adapter(models / "ip-adapter_tiny.safetensors",
                               ip_adapter_state(widths, pipe.bundle.unet_config.context_dim, 32, seed=3, std=0.3))
    picture = Image.open(SAMPLE_PICTURE).convert("RGB").crop((0, 0, 200, 160))
    return pipe, adapter, picture


def extension_steps(start: float, end: float, steps: int) -> list[bool]:
    """Whether sd-webui-controlnet (v1.1.455) applies an IP-Adapter at each sampler step, transcribed:
    scripts/hook.py `guidance_schedule_handler` sets `current_sampling_percent = x.sampling_step /
    x.total_sampling_steps` at each CFG denoiser call, from A1111's `state.sampling_step`, which the sampler's
    callback (modules/sd_samplers_common.py `callback_state`: `state.sampling_step = d["i"]`) sets after step i;
    scripts/ipadapter/plugable_ipadapter.py `patch_forward` returns 0 (no image attention)
    `if current_sampling_percent < self.p_start or current_sampling_percent > self.p_end`."""
    applied, sampling_step = [], 0
    for i in range(steps):
        current_sampling_percent = sampling_step / steps
        applied.append(not (current_sampling_percent < start or current_sampling_percent > end))
        sampling_step = i                       # the callback after step i
    return applied


def diffusers_steps(start: float, end: float, steps: int) -> list[bool]:
    """diffusers 0.42's window rule (pipeline_controlnet.py, `controlnet_keep`): diffusers has no IP-Adapter
    window; sdlab's native convention gives the adapter its ControlNet rule:
    keeps = 1.0 - float(i / len(timesteps) < s or (i + 1) / len(timesteps) > e)."""
    return [not (i / steps < start or (i + 1) / steps > end) for i in range(steps)]


def _drawn_steps(monkeypatch, pipe, prompt: IPAdapterInput, **options) -> tuple[np.ndarray, list[tuple]]:
    """The picture and, per U-Net call, (sampler step, whether the call had the image prompt)."""
    calls = []
    original = image_prompt.ImagePromptedNet.__call__

    def spy(self, x, t, *args, control_step=None, **kwargs):
        inner = self.net

        def recording(*a, **k):
            calls.append((None if control_step is None else control_step[0], "image_prompt" in k))
            return inner(*a, **k)

        self.net = recording
        try:
            return original(self, x, t, *args, control_step=control_step, **kwargs)
        finally:
            self.net = inner

    monkeypatch.setattr(image_prompt.ImagePromptedNet, "__call__", spy)
    result = pipe.txt2img("a red apple", "blurry", ip_adapters=[prompt], **{**OPTIONS, **options})
    monkeypatch.undo()
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16), calls


@pytest.mark.parametrize("convention, start, end, sampler", [
    ("a1111", 0.25, 0.8, "Euler"), ("a1111", 0.2, 0.2, "Euler"), ("a1111", 0.0, 0.5, "Heun"),
    ("diffusers", 0.25, 0.8, "Euler"), ("diffusers", 0.5, 1.0, "Heun"),
])
def test_the_adapter_acts_on_the_steps_of_the_reference_rule(monkeypatch, tiny, convention, start, end, sampler):
    """With 6 steps, (0.25, 0.8): the extension's rule gives steps 3-5 (it reads 0, 0, 1, 2, 3, 4 of 6), diffusers'
    steps 2-3; (0.2, 0.2) the extension's step 2 alone."""
    rule = extension_steps if convention == "a1111" else diffusers_steps
    pipe, adapter, picture = tiny
    _, calls = _drawn_steps(monkeypatch, pipe, IPAdapterInput(adapter, picture, 0.7, start=start, end=end),
                            sampler=sampler, control_convention=convention)
    per_step = {}
    for step, prompted in calls:
        per_step.setdefault(step, set()).add(prompted)
    assert sorted(per_step) == list(range(STEPS))                         # every call knows its step
    assert all(len(seen) == 1 for seen in per_step.values())              # a step's calls agree (Heun: 2)
    assert [per_step[i].pop() for i in range(STEPS)] == rule(start, end, STEPS)


def test_a_window_of_every_step_is_the_unwindowed_picture_and_a_window_acts(monkeypatch, tiny):
    pipe, adapter, picture = tiny
    # a 224 x 224 picture, which both conventions prepare alike (A1111's squash and diffusers' crop leave it as it is)
    picture = picture.resize((224, 224), Image.Resampling.BILINEAR)
    full, calls = _drawn_steps(monkeypatch, pipe, IPAdapterInput(adapter, picture, 0.7))
    assert calls and all(step is None and prompted for step, prompted in calls)   # no step tagging without a window
    same, _ = _drawn_steps(monkeypatch, pipe, IPAdapterInput(adapter, picture, 0.7, start=0.0, end=1.0),
                           control_convention="a1111")
    assert np.array_equal(full, same)
    part, _ = _drawn_steps(monkeypatch, pipe, IPAdapterInput(adapter, picture, 0.7, start=0.0, end=0.5))
    none, _ = _drawn_steps(monkeypatch, pipe, IPAdapterInput(adapter, picture, 0.0))
    assert np.abs(part - full).max() > 0 and np.abs(part - none).max() > 0


@pytest.mark.parametrize("start, end, convention, words", [
    (0.5, 0.5, "diffusers", "need 0 <= start < end <= 1"),
    (0.6, 0.4, "a1111", "need 0 <= start <= end <= 1"),
    (-0.1, 1.0, "a1111", "need 0 <= start <= end <= 1"),
    (0.0, float("nan"), "a1111", "end must be a finite number"),
])
def test_bad_windows_are_refused(tiny, start, end, convention, words):
    pipe, adapter, picture = tiny
    with pytest.raises(RequestError, match=words):
        pipe.txt2img("x", ip_adapters=[IPAdapterInput(adapter, picture, start=start, end=end)],
                     control_convention=convention, **{**OPTIONS, "steps": 2})


def test_the_infotext_records_the_window(tiny):
    from sdlab.pipeline.infotext import to_parameters
    from sdlab.pipeline.request import GenerationRequest

    pipe, adapter, picture = tiny
    request = GenerationRequest("x", steps=2, seed=1, control_convention="a1111",
                                ip_adapters=(IPAdapterInput(adapter, picture, 0.5, start=0.2, end=0.9),))
    written = to_parameters(request)
    assert written["IP-Adapter 0"].startswith("Model: ip-adapter_tiny [")
    assert written["IP-Adapter 0"].endswith("], Weight: 0.5, Guidance Start: 0.2, Guidance End: 0.9")
    assert written["Control steps"] == "a1111"
    plain = to_parameters(GenerationRequest("x", steps=2, seed=1, ip_adapters=(IPAdapterInput(adapter, picture, 0.5),)))
    assert plain["IP-Adapter 0"].endswith("], Weight: 0.5") and plain.get("Control steps") is None


def test_the_cli_draws_the_window_records_it_and_redraws_it(tiny, tmp_path, capsys):
    """--ip-adapter-start / --ip-adapter-end draw the Python API's picture; --from-png takes the window back."""
    from cli_helpers import pixels, run

    pipe, adapter, picture = tiny
    reference, drawn, again = tmp_path / "reference.png", tmp_path / "window.png", tmp_path / "again.png"
    picture.save(reference)
    base = ["txt2img", "a red apple", "--steps", "6", "--seed", "5", "--width", "64", "--height", "64", "--cfg", "5",
            "--no-progress", "--ip-adapter", str(adapter), "--ip-adapter-image", str(reference),
            "--ip-adapter-scale", "0.7"]
    code, _, stderr = run([*base, "--ip-adapter-start", "0.25", "--ip-adapter-end", "0.8", "--out", str(drawn)], capsys)
    assert code == 0, stderr
    api = pipe.txt2img("a red apple", steps=6, seed=5, width=64, height=64, cfg_scale=5.0,
                       ip_adapters=[IPAdapterInput(adapter, Image.open(reference), 0.7, start=0.25, end=0.8)])
    assert np.array_equal(pixels(drawn), np.asarray(api.images[0].convert("RGB"), dtype=np.int16))
    code, _, stderr = run(["txt2img", "--no-progress", "--from-png", str(drawn), "--ip-adapter", str(adapter),
                           "--ip-adapter-image", str(reference), "--out", str(again)], capsys)
    assert code == 0, stderr
    assert np.array_equal(pixels(drawn), pixels(again))
    code, _, stderr = run([*base, "--ip-adapter-start", "0.9", "--ip-adapter-end", "0.1", "--out",
                           str(tmp_path / "bad.png")], capsys)
    assert code != 0 and "need 0 <= start < end <= 1" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "bad.png").exists()
