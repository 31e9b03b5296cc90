"""A1111's random sources ("CPU", "GPU", "NV") and "Seed resize from".

References: A1111's ``modules/rng_philox.py`` and ``modules/rng.py`` (with ``opts.randn_source`` "NV"), transcribed
in tests/a1111_rng_reference.py as `A1111Philox` and `A1111ImageRNG`; ``rng_philox.py``'s docstring's numbers are
CUDA's ``torch.randn((3, 4))`` after ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import sdlab
import sdlab.pipeline.generate as generate_module
from sdlab.diffusion.noise import generators_for, initial_noise
from sdlab.diffusion.philox import PhiloxGenerator
from sdlab.pipeline.generate import sample_latents
from sdlab.pipeline.request import GenerationRequest, RequestError
from a1111_rng_reference import A1111ImageRNG, A1111Philox, a1111_randn
from server_fixtures import sdlab_server  # noqa: F401  (a session fixture)

CUDA_SEED_0 = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],   # rng_philox.py's docstring:
                        [-0.12086647, -0.57972564, -0.62285122, -0.32838709],  # torch.manual_seed(0);
                        [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])  # torch.randn((3, 4), device='cuda')


def test_philox_is_cudas_randn():
    assert np.abs(PhiloxGenerator(0).randn((3, 4)).numpy() - CUDA_SEED_0).max() < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 + 7, 2**32 + 5, 2**63 + 12345, 2**64 - 1])
def test_philox_equals_a1111_bit_for_bit(seed):
    ours, theirs = PhiloxGenerator(seed), A1111Philox(seed)
    for shape in [(4, 64, 64), (3, 4), (1,), (4, 16, 24)]:          # each call is the next draw (offset + 1)
        got = ours.randn(shape)
        assert got.dtype == torch.float32 and tuple(got.shape) == shape
        assert np.array_equal(got.numpy(), theirs.randn(shape))


def test_philox_state_rewinds():
    generator = PhiloxGenerator(5)
    state = generator.get_state()
    first = generator.randn((2, 3))
    generator.set_state(state)
    assert torch.equal(generator.randn((2, 3)), first)
    assert not torch.equal(generator.randn((2, 3)), first)


def test_philox_sdxl_latent_speed():
    """An SDXL latent (4 x 128 x 128) draws in well under a second (measured: ~10 ms on one core)."""
    generator = PhiloxGenerator(1)
    start = time.process_time()                       # CPU time: a bound on the work, not on the machine's load
    for _ in range(4):
        generator.randn((4, 128, 128))
    assert (time.process_time() - start) / 4 < 0.5




@pytest.fixture(scope="module")
def pipe():
    return sdlab.load()


def _a1111_noise_run(pipe, request, monkeypatch):
    """The final latents of `request` drawn with rng "CPU", its initial and step noise replaced by the transcribed
    A1111 ImageRNG's (NV): ``x = rng.next()`` first, then one ``rng.next()`` per step noise."""
    plan = pipe.resolve(request)
    req = plan.request
    scale = 8 // pipe.bundle.vae_config.downsample_factor   # A1111's // 8 is its models' VAE factor; the tiny one's is 4
    reference = A1111ImageRNG(plan.latent_shape[1:], req.seeds(), req.subseeds(), req.subseed_strength,
                               req.seed_resize_from_h * scale, req.seed_resize_from_w * scale,
                               req.eta_noise_seed_delta)
    monkeypatch.setattr(generate_module, "_initial_noise", lambda *args: reference.next())
    monkeypatch.setattr(generate_module, "per_image_noise", lambda generators, like: lambda *sigmas: reference.next())
    latents = sample_latents(pipe.bundle, pipe.resolve(GenerationRequest(**{**vars(request), "rng": "CPU"})))
    monkeypatch.undo()
    return latents


NV_CASES = {
    "seed": dict(seed=5, batch_size=2),
    "ensd": dict(seed=5, batch_size=2, eta_noise_seed_delta=31337),
    "subseed": dict(seed=7, subseed=40, subseed_strength=0.3, batch_size=2),
    "resize smaller": dict(seed=3, batch_size=2, seed_resize_from_w=40, seed_resize_from_h=88),
    "resize with subseed": dict(seed=3, subseed=8, subseed_strength=0.6, seed_resize_from_w=96,
                                seed_resize_from_h=48, eta_noise_seed_delta=5),
}


@pytest.mark.parametrize("case", NV_CASES)
def test_nv_txt2img_is_a1111s_image_rng(pipe, case, monkeypatch):
    request = GenerationRequest(prompt="a red apple", sampler="Euler a", steps=4, width=64, height=64, rng="NV",
                                **NV_CASES[case])
    ours = sample_latents(pipe.bundle, pipe.resolve(request))
    assert torch.equal(ours, _a1111_noise_run(pipe, request, monkeypatch))
    cpu = sample_latents(pipe.bundle, pipe.resolve(GenerationRequest(**{**vars(request), "rng": "CPU"})))
    assert (ours - cpu).abs().max() > 0.1                                # another picture than the CPU source's


def test_gpu_off_cuda_draws_the_nv_numbers(pipe):
    request = GenerationRequest(prompt="a red apple", sampler="Euler a", steps=3, width=64, height=64, seed=9)
    nv = sample_latents(pipe.bundle, pipe.resolve(GenerationRequest(**{**vars(request), "rng": "NV"})))
    gpu = sample_latents(pipe.bundle, pipe.resolve(GenerationRequest(**{**vars(request), "rng": "gpu"})))
    assert torch.equal(nv, gpu)
    assert all(isinstance(g, PhiloxGenerator) for g in generators_for([1, 2], "GPU", "cpu"))
    assert all(isinstance(g, torch.Generator) for g in generators_for([1, 2], "CPU", "cpu"))


def test_cpu_default_is_the_cpu_generators(pipe, monkeypatch):
    """The default source draws every number from seeded CPU torch generators, as before the field existed:
    the run equals one whose initial and step noise come straight from ``torch.randn`` of such generators."""
    request = GenerationRequest(prompt="a red apple", sampler="Euler a", steps=4, width=64, height=64, seed=11,
                                batch_size=2, eta_noise_seed_delta=3)
    plan = pipe.resolve(request)
    assert plan.request.rng == "CPU"
    ours = sample_latents(pipe.bundle, plan)
    shape = plan.latent_shape[1:]
    first = [torch.Generator().manual_seed(s) for s in (11, 12)]
    steps = [torch.Generator().manual_seed(s) for s in (14, 15)]
    start = torch.stack([torch.randn(shape, generator=g) for g in first])
    monkeypatch.setattr(generate_module, "_initial_noise", lambda *args: start)
    monkeypatch.setattr(generate_module, "per_image_noise", lambda generators, like: lambda *sigmas: torch.stack(
        [torch.randn(shape, generator=g) for g in steps]))
    assert torch.equal(ours, sample_latents(pipe.bundle, plan))


def test_latent_noise_fill_follows_the_source():
    latent, repaint = torch.zeros(2, 4, 8, 8), torch.ones(1, 1, 8, 8)
    from sdlab.pipeline.masked_content import masked_latent
    filled = masked_latent(latent, repaint, "latent noise", [3, 4], "NV")
    assert torch.equal(filled, torch.stack([a1111_randn(s, (4, 8, 8)) for s in (3, 4)]))
    assert torch.equal(masked_latent(latent, repaint, "latent noise", [3, 4]), initial_noise((2, 4, 8, 8), [3, 4]))


@pytest.mark.parametrize("value, expected", [("nv", "NV"), ("Gpu", "GPU"), ("CPU", "CPU")])
def test_rng_names_any_case(pipe, value, expected):
    assert pipe.resolve(GenerationRequest(prompt="x", rng=value)).request.rng == expected


def test_unknown_rng_is_a_request_error(pipe):
    with pytest.raises(RequestError, match="random source"):
        pipe.resolve(GenerationRequest(prompt="x", rng="TPU"))


@pytest.mark.parametrize("rng", ["CPU", "NV"])
def test_seed_resize_keeps_the_small_pictures_noise_at_the_centre(pipe, rng):
    """Noise drawn at 64x64 with "Seed resize from: 64x64" at 96x80: its centre is the 64x64 run's noise, its
    border the generator's first draw at 96x80, and the generator then draws on from there."""
    factor = pipe.bundle.vae_config.downsample_factor                    # 4: latents 16x16 and 24x20
    common = dict(prompt="x", seed=21, subseed=4, subseed_strength=0.5, rng=rng)
    small_plan = pipe.resolve(GenerationRequest(width=64, height=64, **common))
    big_plan = pipe.resolve(GenerationRequest(width=96, height=80, seed_resize_from_w=64, seed_resize_from_h=64,
                                              **common))
    cpu = torch.device("cpu")
    small = generate_module._initial_noise(small_plan, generators_for([21], rng), cpu, factor)  # (1, 4, 16, 16)
    generators = generators_for([21], rng)
    big = generate_module._initial_noise(big_plan, generators, cpu, factor)                    # (1, 4, 20, 24)
    assert torch.equal(big[..., 2:18, 4:20], small)
    plain = generators_for([21], rng)[0]
    whole = generate_module.draw(plain, (1, 4, 20, 24))
    assert torch.equal(big[..., 0, :], whole[..., 0, :]) and torch.equal(big[..., :, 0], whole[..., :, 0])
    assert torch.equal(generate_module.draw(generators[0], (2,)), generate_module.draw(plain, (2,)))


def test_seed_resize_off_and_checked(pipe):
    plan = pipe.resolve(GenerationRequest(prompt="x", seed_resize_from_w=-1, seed_resize_from_h=512))
    assert (plan.request.seed_resize_from_w, plan.request.seed_resize_from_h) == (0, 0)
    for bad in (dict(seed_resize_from_w=2, seed_resize_from_h=64), dict(seed_resize_from_w=64.5, seed_resize_from_h=64)):
        with pytest.raises(RequestError, match="seed_resize_from_w"):
            pipe.resolve(GenerationRequest(prompt="x", **bad))


def _infotext(request, pipe):
    from sdlab.pipeline.png_info import format_parameters, parse_parameters
    from sdlab.pipeline.infotext import to_parameters
    return parse_parameters(format_parameters(to_parameters(pipe.resolve(request).request)))


def test_infotext_records_the_source_and_the_seed_resize(pipe):
    from sdlab.pipeline.infotext import from_parameters
    recorded = _infotext(GenerationRequest(prompt="x", seed=3, rng="nv", seed_resize_from_w=512,
                                           seed_resize_from_h=768), pipe)
    assert recorded["RNG"] == "NV" and recorded["Seed resize from"] == "512x768"
    fields = from_parameters(recorded)
    assert (fields["rng"], fields["seed_resize_from_w"], fields["seed_resize_from_h"]) == ("NV", 512, 768)
    plain = _infotext(GenerationRequest(prompt="x", seed=3), pipe)
    assert plain["RNG"] == "CPU" and "Seed resize from" not in plain
    assert from_parameters(plain)["rng"] == "CPU"


@pytest.mark.parametrize("version, rng", [("v1.10.1", "GPU"), ("sdlab 0.1.0", "CPU"), (None, "GPU")])
def test_a_text_without_rng_is_its_writers_default(version, rng):
    from sdlab.pipeline.infotext import from_parameters
    from sdlab.pipeline.png_info import parse_parameters
    from sdlab.server.a1111 import a1111_parameters
    text = "a cat\nSteps: 4, Sampler: Euler a, CFG scale: 5, Seed: 1, Size: 64x64" + (
        f", Version: {version}" if version else "")
    assert from_parameters(parse_parameters(text)).get("rng", "CPU") == rng
    assert a1111_parameters(text)["RNG"] == rng
    assert from_parameters(parse_parameters(text + ", RNG: NV"))["rng"] == "NV"


def test_cli_rng_and_seed_resize_are_recorded_and_drawn_again(tmp_path, capsys):
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import parse_parameters, read_parameters
    out = tmp_path / "nv.png"
    code, _, err = run(["txt2img", "a red apple", "--seed", "4", "--steps", "2", "--sampler", "Euler a", "--width", "64",
                        "--height", "64", "--rng", "NV", "--seed-resize-from", "48x80", "--no-progress", "--out",
                        str(out)], capsys)
    assert code == 0, err
    recorded = parse_parameters(read_parameters(out))
    assert recorded["RNG"] == "NV" and recorded["Seed resize from"] == "48x80"
    again = tmp_path / "again.png"
    assert run(["txt2img", "--from-png", str(out), "--no-progress", "--out", str(again)], capsys)[0] == 0
    assert np.array_equal(pixels(out), pixels(again))
    cpu = tmp_path / "cpu.png"
    assert run(["txt2img", "--from-png", str(out), "--rng", "cpu", "--no-progress", "--out", str(cpu)], capsys)[0] == 0
    assert parse_parameters(read_parameters(cpu))["RNG"] == "CPU" and not np.array_equal(pixels(out), pixels(cpu))
    for flag, value in (("--rng", "tpu"), ("--seed-resize-from", "48")):
        code, _, err = run(["txt2img", "x", flag, value, "--out", str(tmp_path / "bad.png")], capsys)
        assert code == 2 and flag in err and not (tmp_path / "bad.png").exists()


def test_from_png_of_an_a1111_text_without_rng_draws_gpu_numbers(tmp_path, capsys):
    """A1111's default source, GPU (its label left out), drawn off CUDA as the NV numbers an NVIDIA GPU draws."""
    from cli_helpers import pixels, png_with_parameters, run
    from sdlab.pipeline.png_info import parse_parameters, read_parameters
    text = "a red apple\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 8, Size: 64x64"
    drawn = {}
    for name, extra in (("a1111", ""), ("nv", ", RNG: NV"), ("cpu", ", RNG: CPU")):
        source = png_with_parameters(tmp_path / f"{name}-in.png", text + extra + ", Version: v1.10.1")
        drawn[name] = tmp_path / f"{name}.png"
        code, _, err = run(["txt2img", "--from-png", str(source), "--no-progress", "--out", str(drawn[name])], capsys)
        assert code == 0, err
    assert parse_parameters(read_parameters(drawn["a1111"]))["RNG"] == "GPU"
    assert np.array_equal(pixels(drawn["a1111"]), pixels(drawn["nv"]))
    assert not np.array_equal(pixels(drawn["a1111"]), pixels(drawn["cpu"]))


def test_a1111_api_option_override_and_seed_resize(sdlab_server):
    import base64
    import io
    import json

    import httpx
    from PIL import Image
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=120) as api:
        assert api.get("/options").json()["randn_source"] == "CPU"             # sdlab's default (A1111's: GPU)

        def draw(**fields):
            answer = api.post("/txt2img", json={"prompt": "a cat", "steps": 2, "seed": 3, "width": 64, "height": 64,
                                                "sampler_name": "Euler a", **fields})
            assert answer.status_code == 200, answer.text
            return answer.json()["images"][0], json.loads(answer.json()["info"])

        plain, info = draw()
        assert "RNG: CPU" in info["infotexts"][0] and "Seed resize from" not in info["infotexts"][0]
        nv, info = draw(override_settings={"randn_source": "NV"}, seed_resize_from_w=48, seed_resize_from_h=80)
        assert "RNG: NV" in info["infotexts"][0] and "Seed resize from: 48x80" in info["infotexts"][0]
        assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (48, 80)
        gpu, info = draw(override_settings={"randn_source": "GPU"}, seed_resize_from_w=48, seed_resize_from_h=80)
        assert "RNG: GPU" in info["infotexts"][0]
        decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(image)))) for image in (nv, gpu, plain)]
        assert np.array_equal(decoded[0], decoded[1]) and not np.array_equal(decoded[0], decoded[2])   # no CUDA
        assert "RNG: CPU" in draw()[1]["infotexts"][0]                          # the override did not stay
        assert api.post("/options", json={"randn_source": "TPU"}).status_code == 422
        assert api.post("/options", json={"randn_source": "NV"}).status_code == 200
        try:
            assert "RNG: NV" in draw()[1]["infotexts"][0]
        finally:
            api.post("/options", json={"randn_source": "CPU"})


def test_native_job_field_is_recorded(sdlab_server):
    import httpx
    from server_fixtures import run_job
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as client:
        job = run_job(client, {"prompt": "a cat", "steps": 2, "seed": 3, "width": 64, "height": 64, "rng": "nv",
                               "seed_resize_from_w": 32, "seed_resize_from_h": 96})
        assert job["status"] == "done", job
        assert "RNG: NV" in job["infotexts"][0] and "Seed resize from: 32x96" in job["infotexts"][0]
        assert (job["request"]["rng"], job["request"]["seed_resize_from_w"]) == ("NV", 32)
