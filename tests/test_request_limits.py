"""Requests that cannot work are refused before the work starts, with one clear error; NaN stops a run.

Absurd numbers (steps 1e9, CFG 1e308, eta 1e308), sizes that cannot fit in memory, canvases past the
largest side, a clip skip beyond the text encoder, a device this torch cannot use, and NaN during sampling:
each is a `RequestError` in the API and one `sdlab: error:` line with exit status 2 on the command line.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_fixtures import tiny_bundle, write_original
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import sdlab
from sdlab.api import Pipeline, resolve_device
from sdlab.cli import main
from sdlab.diffusion.samplers import get_sampler
from sdlab.pipeline import memory
from sdlab.pipeline.generate import NonFiniteError, resolve_for
from sdlab.pipeline.request import MAX_STEPS, GenerationRequest, RequestError

SIZE = 16
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle("sd1", seed=3)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, bundle) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-sd1.safetensors"
    write_original(bundle, path, junk=False)
    return path


def _request(**changes) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a cube", "steps": 2, "seed": 1, "width": SIZE, "height": SIZE,
                                "sampler": "Euler", **changes})


def _cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def _one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    err = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("WARNING "))
    assert err.startswith("sdlab: error:") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


# ---------------------------------------------------------------------------------------------------------
# absurd values


@pytest.mark.parametrize(("changes", "message"), [
    (dict(steps=1_000_000_000), r"steps must be an integer in 1\.\.1000, got 1000000000"),
    (dict(steps=MAX_STEPS + 1), r"steps must be an integer in 1\.\.1000"),
    (dict(cfg_scale=1e308), r"CFG scale must lie in \[-100, 100\], got 1e\+308"),
    (dict(cfg_scale=-1e308), r"CFG scale must lie in"),
    (dict(eta=1e308), r"eta must lie in \[0, 10\], got 1e\+308"),
    (dict(eta=math.inf), "eta must be a finite number"),
    (dict(s_noise=1e308), r"s_noise must lie in \[0, 10\]"),
    (dict(aesthetic_score=1e308), r"aesthetic_score must lie in"),
    (dict(mask_blur=1e308), r"mask blur must lie in \[0, 256\]"),
    (dict(init_image=Image.new("RGB", (SIZE, SIZE)), strength=1e-6, steps=1000, img2img_convention="comfyui"),
     "schedule under the comfyui convention; the limit is 10000"),
])
def test_absurd_values_are_refused_up_front(bundle, changes, message):
    with pytest.raises(RequestError, match=message):
        resolve_for(bundle, _request(**changes))


def test_a_size_taken_from_a_tiny_init_image_says_so(bundle):
    """A width no one gave (img2img takes the init image's) is named as the init image's, not as if typed."""
    tiny = Image.new("RGB", (1, 64))
    with pytest.raises(RequestError, match=r"width must be an integer in 8\.\.8192, got 1 \(the init image's width"):
        resolve_for(bundle, _request(init_image=tiny, width=None, height=None))
    with pytest.raises(RequestError, match=r"width must be an integer in 8\.\.8192, got 4$"):
        resolve_for(bundle, _request(init_image=tiny, width=4, height=None))


def test_useful_values_stay_accepted(bundle):
    resolve_for(bundle, _request(steps=150, cfg_scale=30.0, eta=1.0, mask_blur=64.0))


@pytest.mark.parametrize("tiled_vae", ["false", "no", 0.5, 0, 1])
def test_tiled_vae_must_be_a_bool_or_none(bundle, tiled_vae):
    """A string such as "false" (from a JSON or form client) is refused, not read as truthy (the VAE would tile)."""
    with pytest.raises(RequestError, match=r"tiled_vae must be True, False or None .*, got "):
        resolve_for(bundle, _request(tiled_vae=tiled_vae))


@pytest.mark.parametrize(("tiled_vae", "resolved"), [(None, None), (True, True), (False, False), (np.False_, False)])
def test_tiled_vae_keeps_its_bool_or_none(bundle, tiled_vae, resolved):
    assert resolve_for(bundle, _request(tiled_vae=tiled_vae)).tiled_vae is resolved


def test_numpy_scalars_count_as_python_numbers(bundle):
    """NumPy's scalars (a seed from np.arange, a CFG from np.linspace) are taken wherever a Python int, float or
    bool is, and resolve to the request of the same Python numbers: plain ints, floats (a NumPy float at its
    shortest decimal) and bools, in the pairs and control records too."""
    hint = Image.new("RGB", (SIZE, SIZE))
    python = dict(steps=3, seed=7, cfg_scale=5.1, batch_size=2, height=SIZE, clip_skip=1, guidance_rescale=0.7,
                  subseed=9, subseed_strength=0.3, eta=0.5, s_noise=1.0, original_size=(SIZE, SIZE),
                  paste_back=True, quantize_timesteps=False, controls=(("cn.safetensors", hint, 0.5, 0.0, 1),))
    numpy = dict(steps=np.int64(3), seed=np.uint64(7), cfg_scale=np.float32(5.1), batch_size=np.int32(2),
                 height=np.int16(SIZE), clip_skip=np.int8(1), guidance_rescale=np.float32(0.7), subseed=np.int64(9),
                 subseed_strength=np.float32(0.3), eta=np.float16(0.5), s_noise=np.float64(1.0),
                 original_size=(np.int64(SIZE), np.int64(SIZE)), paste_back=np.True_, quantize_timesteps=np.False_,
                 controls=(("cn.safetensors", hint, np.float32(0.5), np.float64(0.0), np.int64(1)),))
    expected = resolve_for(bundle, _request(**python))
    resolved = resolve_for(bundle, _request(**numpy))
    assert resolved == expected and resolved.controls == expected.controls
    assert {name: type(getattr(resolved, name)) for name in python} == {name: type(v) for name, v in python.items()}
    assert [type(v) for v in resolved.original_size] == [int, int]
    control = resolved.controls[0]                  # a record resolves to a ControlInput (control.controls_on_init)
    assert [type(v) for v in (control.strength, control.start, control.end)] == [float, float, int]


@pytest.mark.parametrize("option", [["--steps", "1000000000"], ["--cfg", "1e308"], ["--eta", "1e308"]])
def test_cli_refuses_absurd_values_in_one_line(model, tmp_path, capsys, option):
    code, err = _cli(["txt2img", "a cube", "--model", str(model), "--width", "16", "--height", "16",
                      "--no-progress", "--out", str(tmp_path / "x.png"), *option], capsys)
    _one_error_line(code, err)
    assert not (tmp_path / "x.png").exists()


def test_steps_from_a_png_are_bounded_too(model, tmp_path, capsys):
    png = tmp_path / "old.png"
    info = PngInfo()
    info.add_text("parameters", "a cube\nSteps: 1000000000, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 16x16")
    Image.new("RGB", (16, 16)).save(png, pnginfo=info)
    code, err = _cli(["txt2img", "--from-png", str(png), "--model", str(model), "--no-progress",
                      "--out", str(tmp_path / "x.png")], capsys)
    _one_error_line(code, err, "steps must be an integer in 1..1000")


# ---------------------------------------------------------------------------------------------------------
# memory


def test_memory_estimate_grows_with_the_request_and_refuses_what_cannot_fit():
    shipped = sdlab.load().bundle
    small = resolve_for(shipped, GenerationRequest("a red circle", seed=0))
    huge = GenerationRequest("a red circle", seed=0, width=8192, height=8192)
    assert memory.estimate_bytes(shipped, small) < 64 * 2**20                   # 64 px: a few MB
    huge = _resolved_without_memory_check(shipped, huge)
    assert memory.estimate_bytes(shipped, huge) > 15 * 2**30                    # the issue saw > 15 GB at 8192 px
    with pytest.raises(RequestError, match=r"8192x8192 x 1 image\(s\) needs about .* GiB .* GiB is free"):
        memory.check_memory(shipped, huge, available=8 * 2**30)
    memory.check_memory(shipped, small, available=1 * 2**30)


def _resolved_without_memory_check(bundle, request):
    from sdlab.pipeline.request import resolve

    return resolve(request, default_size=bundle.default_size, default_sampler="Euler", default_schedule="karras",
                   factor=bundle.vae_config.downsample_factor)


def test_available_memory_is_read_from_the_system():
    free = memory.available_bytes(torch.device("cpu"))
    assert free is not None and free > 0


def test_cli_refuses_a_size_that_cannot_fit_before_drawing(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * 2**30)
    code, err = _cli(["txt2img", "a cube", "--model", str(model), "--width", "8192", "--height", "8192",
                      "--no-progress", "--out", str(tmp_path / "x.png")], capsys)
    _one_error_line(code, err, "8192x8192", "GiB is free")


def test_cli_refuses_an_outpaint_canvas_past_the_largest_side(model, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.new("RGB", (16, 16)).save(init)
    code, err = _cli(["inpaint", "sky", "--init", str(init), "--outpaint", "100000,0,0,0", "--model", str(model),
                      "--no-progress", "--out", str(tmp_path / "x.png")], capsys)
    _one_error_line(code, err, "100016x16 canvas", "8192")


# ---------------------------------------------------------------------------------------------------------
# model and device limits


def test_clip_skip_beyond_the_text_encoder_is_a_request_error(bundle, model, tmp_path, capsys):
    layers = bundle.text_encoders[0].config.layers
    resolve_for(bundle, _request(clip_skip=layers))                             # the first layer: allowed
    with pytest.raises(RequestError, match=f"clip skip {layers + 1} is too large for this model"):
        resolve_for(bundle, _request(clip_skip=layers + 1))
    code, err = _cli(["txt2img", "a cube", "--model", str(model), "--clip-skip", "5", "--width", "16",
                      "--height", "16", "--no-progress", "--out", str(tmp_path / "x.png")], capsys)
    _one_error_line(code, err, "clip skip 5 is too large")


def test_unknown_and_unavailable_devices_are_request_errors(model, tmp_path, capsys):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RequestError, match="unknown device 'foo'"):
        resolve_device("foo")
    code, err = _cli(["txt2img", "a cube", "--model", str(model), "--device", "foo", "--no-progress",
                      "--out", str(tmp_path / "x.png")], capsys)
    _one_error_line(code, err, "unknown device 'foo'")
    if not torch.cuda.is_available():
        with pytest.raises(RequestError, match="device 'cuda' is not available"):
            resolve_device("cuda")
        code, err = _cli(["txt2img", "a cube", "--model", str(model), "--device", "cuda", "--no-progress",
                          "--out", str(tmp_path / "x.png")], capsys)
        _one_error_line(code, err, "device 'cuda' is not available")
    else:
        with pytest.raises(RequestError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize(("dtype", "loaded"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32),
                                              ("auto", torch.float32), (torch.float64, torch.float64)])
def test_load_takes_the_cli_dtype_names_and_float_dtypes(model, dtype, loaded):
    assert sdlab.load(model, dtype=dtype).bundle.dtype == loaded        # auto: fp32 for a small model


@pytest.mark.parametrize("dtype", ["float16", "half", "BF16", torch.int8, torch.bool, torch.complex64, 16])
def test_load_refuses_other_dtypes_with_one_error_naming_the_argument(model, dtype):
    with pytest.raises(RequestError, match=r"^dtype must be one of auto, fp32, fp16, bf16 or a torch dtype"):
        sdlab.load(model, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# non-finite values while sampling


def _broken(part: str, value: float = math.nan):
    """A tiny SD1 bundle whose U-Net (first weight) or VAE decoder (last weight) is filled with `value`."""
    bundle = tiny_bundle("sd1", seed=3)
    weight = next(bundle.unet.parameters()) if part == "unet" else list(bundle.vae.parameters())[-1]
    with torch.no_grad():
        weight.fill_(value)
    return bundle


def test_nan_during_sampling_stops_the_run_instead_of_a_black_picture():
    with pytest.raises(NonFiniteError, match="became NaN or Inf .* instead of making a black picture"):
        Pipeline(_broken("unet")).txt2img("a cube", steps=2, seed=1, width=SIZE, height=SIZE)


def test_deferred_checks_name_the_call_that_went_non_finite(monkeypatch):
    """The CUDA path of `pipeline.finite` (verdicts read one model call later, `settle`) run on the CPU: a
    denoiser that returns NaN at its second call fails at the third, naming the second call's sigma; at the
    last call, the check after the sampler fails."""
    from sdlab.pipeline import finite
    from sdlab.pipeline.generate import _finite_only

    monkeypatch.setattr(finite, "_defers", lambda device: True)
    monkeypatch.setattr(finite, "_read_later", lambda flag: lambda: bool(flag))
    calls = []

    def model(x, sigma):
        calls.append(float(sigma[0]))
        return x * math.nan if len(calls) == 2 else x

    for steps in (4, 2):
        calls.clear()
        watch = finite.FiniteWatch(lambda what: NonFiniteError(what))
        denoise = _finite_only(model, watch)
        with pytest.raises(NonFiniteError, match=r"the denoised sample at sigma 2\b"):
            for sigma in [3.0, 2.0, 1.0, 0.5][:steps]:
                denoise(torch.zeros(1, 4, 2, 2), torch.tensor([sigma]))
            watch.settle()
        assert len(calls) == min(steps, 3)                     # noticed one call after the NaN


def test_nan_from_the_vae_stops_before_a_picture_is_made():
    with pytest.raises(NonFiniteError, match="the VAE decoded NaN or Inf"):
        Pipeline(_broken("vae")).txt2img("a cube", steps=2, seed=1, width=SIZE, height=SIZE)


def test_cli_reports_an_overflow_as_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "overflowing.safetensors"
    write_original(_broken("unet", 1e38), path, junk=False)      # finite weights whose products overflow
    out = tmp_path / "x.png"
    code, err = _cli(["txt2img", "a cube", "--model", str(path), "--width", "16", "--height", "16",
                      "--steps", "2", "--no-progress", "--out", str(out)], capsys)
    _one_error_line(code, err, "NaN or Inf")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# sizes


def test_the_shipped_model_loads_without_a_path_and_draws_at_its_native_size(caplog):
    pipe = sdlab.load()
    assert pipe.bundle.family.name == "sdlab-tiny" and pipe.bundle.default_size == 64
    with caplog.at_level(logging.WARNING):
        image = pipe.txt2img("a red circle on a white background", steps=2, seed=0).images[0]
    assert image.size == (64, 64)
    assert "far from this model's native" not in caplog.text


@pytest.mark.parametrize(("side", "warns"), [(16, True), (24, True), (32, False), (64, False), (128, False),
                                             (136, True)])
def test_sizes_far_from_the_native_size_warn(bundle, caplog, side, warns):
    from sdlab.pipeline.generate import warn_if_far_from_native

    request = _resolved_without_memory_check(bundle, _request(width=side, height=side))
    with caplog.at_level(logging.WARNING):
        warn_if_far_from_native(bundle, request)                               # tiny sd1: native 64
    assert ("far from this model's native 64x64" in caplog.text) == warns


def test_the_readme_api_example_does_not_ask_the_shipped_model_for_512_px():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    api = readme[readme.index("## Python API"):readme.index("## Training")]
    assert "width=512" not in api and "sdlab.load()" in api


def test_no_png_written_for_a_refused_request(model, tmp_path, capsys):
    out = tmp_path / "x.png"
    code, _ = _cli(["txt2img", "a cube", "--model", str(model), "--cfg", "nan", "--no-progress", "--out", str(out)],
                   capsys)
    assert code == 2 and not out.exists()
    assert not any(p.suffix == ".png" for p in tmp_path.iterdir())


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: 8 GB")])
def test_running_out_of_memory_anyway_is_a_request_error(bundle, monkeypatch, error):
    import sdlab.api

    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(sdlab.api, "generate", no_memory)
    with pytest.raises(RequestError, match="out of memory on cpu drawing 16x16 x 1"):
        Pipeline(bundle).txt2img("a cube", width=16, height=16)
    monkeypatch.setattr(sdlab.api, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):                          # other errors stay what they are
        Pipeline(bundle).txt2img("a cube", width=16, height=16)


@pytest.mark.parametrize("side", ["width", "height"])
def test_a_zero_side_is_refused_by_the_api_as_by_the_cli(bundle, side):
    with pytest.raises(RequestError, match=f"{side} must be an integer"):
        resolve_for(bundle, _request(**{side: 0}))


def test_the_api_refuses_a_decompression_bomb_as_init_image(bundle, tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 4096 pixels is now a "bomb" for Pillow
    with pytest.raises(RequestError, match="too large to open safely"):
        Pipeline(bundle).img2img("a cube", init_image=path, steps=2, seed=1)


def test_pipeline_resolve_fills_the_model_defaults_and_checks_values(bundle):
    resolved = Pipeline(bundle).resolve(GenerationRequest(prompt="a cube", steps=2, seed=1)).request
    assert resolved.width == bundle.default_size and resolved.cfg_scale == bundle.family.default_cfg
    assert resolved.sampler == get_sampler(bundle.family.default_sampler).name
    unset = Pipeline(bundle).resolve(GenerationRequest(prompt="a cube", seed=1)).request       # steps left to the model
    assert (unset.steps, unset.schedule) == (bundle.family.default_steps, bundle.family.default_sigma_schedule)
    with pytest.raises(RequestError, match="steps must be"):
        Pipeline(bundle).resolve(GenerationRequest(prompt="a cube", steps=0))


@pytest.mark.parametrize(("changes", "hint"), [
    ({}, "leave width and height unset for the native size"),
    ({"init_image": "init"}, "set width and height near it: unset, they are the init picture's"),
    ({"init_image": "init", "size_convention": "a1111"}, "leave width and height unset for the native size"),
])
def test_the_far_size_warning_says_what_an_unset_size_is(bundle, caplog, changes, hint):
    """img2img's unset width / height are the init picture's (the "diffusers" size convention): its warning for a
    large init picture says to set them, not to leave them unset (which drew that size)."""
    from PIL import Image

    from sdlab.pipeline.generate import warn_if_far_from_native

    if "init_image" in changes:
        changes = {**changes, "init_image": Image.new("RGB", (256, 256))}
    request = _resolved_without_memory_check(bundle, _request(width=256, height=256, **changes))
    with caplog.at_level(logging.WARNING):
        warn_if_far_from_native(bundle, request)
    assert "256x256 is far from this model's native 64x64" in caplog.text and hint in caplog.text, caplog.text
