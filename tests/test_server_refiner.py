"""An SDXL refiner on `sdlab serve`: A1111's `refiner_checkpoint` / `refiner_switch_at` (A1111's handoff rule)
and the native `refiner` / `refiner_switch` (diffusers' rule unless `refiner_convention` says otherwise) name a
model of the server's list; the pictures equal the Python API's with the same settings and record the refiner
as A1111 does. The worker loads the refiner once beside the base model, keeps it while jobs name the same
pair and lets it go when they do not; progress counts and cancelling run across the handoff.

Tiny random SDXL base and refiner files in a --models-dir (tests/bundle_fixtures.py)."""

from __future__ import annotations

import base64
import gc
import io
import json
import re
import shutil
import uuid
import weakref

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdlab
from bundle_fixtures import tiny_bundle, write_original
from sdlab.diffusion.samplers import a1111_schedule
from sdlab.pipeline.png_info import model_hash
from sdlab.pipeline.request import GenerationRequest
from sdlab.server.inputs import JobSpec, RefinerChoice
from sdlab.server.jobs import Job, JobCancelled
from sdlab.server.registry import ModelRegistry
from sdlab.server.worker import ModelHost, Runner
from server_fixtures import b64_png, run_job, start_server

SETTINGS = {"prompt": "a castle on a hill", "seed": 7, "steps": 6, "cfg_scale": 5.0, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("refiner-models") / "models"
    folder.mkdir()
    write_original(tiny_bundle("sdxl"), folder / "base.safetensors", junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), folder / "refiner.safetensors", junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=9), folder / "other-refiner.safetensors", junk=False)
    write_original(tiny_bundle("sd1"), folder / "sd1.safetensors", junk=False)
    return folder


@pytest.fixture(scope="module")
def client(models):
    server = start_server(models.parent / "outputs", "--models-dir", str(models),
                          "--model", str(models / "base.safetensors"), "--max-pixels", str(48 * 48))
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
    server.stop()


def _title(client: httpx.Client, stem: str) -> str:
    return next(m["title"] for m in client.get("/sdapi/v1/sd-models").json() if m["model_name"] == stem)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _same(served: Image.Image, drawn: Image.Image) -> None:
    assert np.abs(_pixels(served) - _pixels(drawn)).max() <= 1


def _api_picture(models, convention: str, switch: float, **options) -> Image.Image:
    pipe = sdlab.load(models / "base.safetensors", refiner=models / "refiner.safetensors", refiner_switch=switch,
                      refiner_convention=convention)
    settings = {**SETTINGS, **options}
    return pipe.txt2img(settings.pop("prompt"), **settings).images[0]


def test_native_refiner_equals_the_python_api(client, models):
    job = run_job(client, {**SETTINGS, "sampler": "Euler", "refiner": "refiner", "refiner_switch": 0.5})
    assert job["status"] == "done", job
    assert (job["step"], job["steps"]) == (6, 6)                    # the refiner's steps counted in the job's
    assert job["request"]["refiner"] == _title(client, "refiner") and job["request"]["refiner_switch"] == 0.5
    served = Image.open(io.BytesIO(client.get(job["images"][0]).content))
    _same(served, _api_picture(models, "diffusers", 0.5, sampler="Euler"))
    hash_ = model_hash(models / "refiner.safetensors")
    assert f"Refiner: refiner [{hash_}], Refiner switch at: 0.5, Refiner steps: diffusers" in served.info["parameters"]
    plain = run_job(client, {**SETTINGS, "sampler": "Euler"})
    assert "Refiner" not in plain["infotexts"][0]


def test_a1111_refiner_fields_reach_the_picture_by_a1111s_rule(client, models):
    """Uniform 21 steps at 0.8: A1111's `apply_refiner` hands off after 17 steps, diffusers' rule after 16."""
    body = {**SETTINGS, "steps": 21, "sampler_name": "Euler", "refiner_checkpoint": _title(client, "refiner"),
            "refiner_switch_at": 0.8}
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    served = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    options = {"steps": 21, "sampler": "Euler", "schedule": a1111_schedule("Euler", None)}
    drawn = _api_picture(models, "a1111", 0.8, **options)
    _same(served, drawn)
    assert not np.array_equal(_pixels(drawn), _pixels(_api_picture(models, "diffusers", 0.8, **options)))
    hash_ = model_hash(models / "refiner.safetensors")
    assert re.search(rf"Refiner: refiner \[{hash_}\], Refiner switch at: 0\.8\b", served.info["parameters"])
    extra = json.loads(answer.json()["info"])["extra_generation_params"]
    assert (extra["Refiner"], extra["Refiner switch at"]) == (f"refiner [{hash_}]", 0.8)


@pytest.mark.parametrize("name", [None, "None", ""])
def test_a1111_no_refiner_names(client, name):
    answer = client.post("/sdapi/v1/txt2img", json={**SETTINGS, "refiner_checkpoint": name, "refiner_switch_at": 0.5})
    assert answer.status_code == 200 and "Refiner" not in json.loads(answer.json()["info"])["infotexts"][0]


def test_the_model_itself_as_refiner_is_no_refiner(client):
    """A1111's `apply_refiner` does not switch to the model that is drawing."""
    answer = client.post("/sdapi/v1/txt2img", json={**SETTINGS, "refiner_checkpoint": "base", "refiner_switch_at": 0.5})
    assert answer.status_code == 200 and "Refiner" not in json.loads(answer.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("route, body, status, said", [
    ("/sdapi/v1/txt2img", {"refiner_checkpoint": "nope", "refiner_switch_at": 0.8}, 404, "unknown refiner 'nope'"),
    ("/sdapi/v1/txt2img", {"refiner_checkpoint": "refiner", "refiner_switch_at": 1.5}, 422, "refiner_switch_at"),
    ("/sdapi/v1/txt2img", {"refiner_checkpoint": "refiner", "enable_hr": True}, 400, "hires fix"),
    ("/sdapi/v1/txt2img", {"refiner_checkpoint": "refiner", "width": 64, "height": 64}, 413, "--max-pixels"),
    ("/api/jobs", {"refiner": "nope"}, 404, "unknown refiner 'nope'"),
    ("/api/jobs", {"refiner": "refiner", "refiner_switch": 0}, 422, "refiner_switch"),
    ("/api/jobs", {"refiner": "refiner", "refiner_convention": "comfyui"}, 422, "convention"),
])
def test_refiner_errors_are_4xx_before_any_job(client, route, body, status, said):
    queued = len(client.get("/api/jobs").json()["jobs"])
    answer = client.post(route, json={**SETTINGS, **body})
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert said in (error.get("errors") or error.get("detail"))
    if route.startswith("/sdapi"):
        assert set(error) == {"error", "detail", "body", "errors"}
    assert len(client.get("/api/jobs").json()["jobs"]) == queued


def test_a_refiner_of_another_latent_space_fails_its_job_with_a_400(client):
    answer = client.post("/sdapi/v1/txt2img", json={**SETTINGS, "refiner_checkpoint": "sd1"})
    assert answer.status_code == 400 and "scales latents" in answer.json()["errors"]


def test_a1111_img2img_takes_the_refiner(client, models):
    init = Image.new("RGB", (32, 32), (200, 80, 40))
    body = {**SETTINGS, "init_images": [b64_png(init)], "denoising_strength": 0.6,
            "sampler_name": "Euler", "refiner_checkpoint": "refiner", "refiner_switch_at": 0.5}
    answer = client.post("/sdapi/v1/img2img", json=body)
    assert answer.status_code == 200, answer.text
    served = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    assert "Refiner switch at: 0.5, Refiner steps: a1111" in served.info["parameters"]


# ----------------------------------------------------------------------------------------------------------
# the worker: what it holds, progress and cancelling across the handoff


def _runner(models, tmp_path) -> Runner:
    registry = ModelRegistry(models / "base.safetensors", models)
    return Runner(ModelHost(registry, "cpu"), tmp_path / "images")


def _job(runner: Runner, refiner: str | None, switch: float = 0.5) -> Job:
    request = GenerationRequest(**SETTINGS, sampler="Euler")
    choice = None if refiner is None else RefinerChoice(runner.host.registry.find(refiner).title, switch)
    return Job(id=uuid.uuid4().hex, mode="txt2img", model=runner.host.registry.default.title,
               spec=JobSpec(request, refiner=choice), created=0.0, steps=SETTINGS["steps"])


def _refiner_unet(runner: Runner) -> weakref.ref:
    return weakref.ref(runner.host._refiner.unet)


def test_the_worker_keeps_the_pair_and_lets_a_refiner_go(models, tmp_path):
    runner = _runner(models, tmp_path)
    runner.run(_job(runner, "refiner"))
    base, refiner = weakref.ref(runner.host.pipe.bundle.unet), _refiner_unet(runner)
    runner.run(_job(runner, "refiner", 0.7))                     # the same pair, another switch: nothing loaded
    assert runner.host._refiner.unet is refiner() and runner.host.pipe.bundle.unet is base()
    runner.run(_job(runner, "other-refiner"))                   # another refiner: the first one is let go
    gc.collect()
    assert refiner() is None and runner.host.pipe.bundle.unet is base()
    other = _refiner_unet(runner)
    runner.run(_job(runner, None))                               # no refiner: none held
    gc.collect()
    assert other() is None and runner.host._refiner is None and runner.host.pipe.bundle.unet is base()


def test_progress_and_cancelling_run_across_the_handoff(models, tmp_path):
    runner = _runner(models, tmp_path)
    job = _job(runner, "refiner")                                # 6 steps, the refiner's from the 4th on
    steps = []
    job.publish = lambda name, data: steps.append(data["i"]) if name == "step" else None
    runner.run(job)
    assert steps == [1, 2, 3, 4, 5, 6] and job.images

    job = _job(runner, "refiner")
    job.publish = lambda name, data: job.cancel.set() if name == "step" and data["i"] == 4 else None
    with pytest.raises(JobCancelled):
        runner.run(job)
    assert job.step == 4 and not job.images


def test_an_embedding_file_added_or_removed_reaches_the_held_refiner_without_a_reload(models, tmp_path):
    """The next job installs a changed embeddings folder in the model and in the refiner held beside it (its
    bigG vectors); a file removed takes its word from both. Neither model is loaded again."""
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    registry = ModelRegistry(models / "base.safetensors", models)
    host = ModelHost(registry, "cpu", embeddings_dir=embeddings)
    choice = {"refiner": registry.find("refiner"), "handoff": RefinerChoice("refiner")}
    first = host.pipeline(registry.default, **choice)
    clip_g = torch.randn(2, 128, generator=torch.Generator().manual_seed(2))   # (2, 128): bigG's width
    save_file({"clip_l": torch.randn(2, 64), "clip_g": clip_g}, str(embeddings / "xlstyle.safetensors"))
    pipe = host.pipeline(registry.default, **choice)
    assert pipe.refiner.unet is first.refiner.unet and pipe.bundle.unet is first.bundle.unet    # not reloaded
    (encoder,) = pipe.refiner.text_encoders
    assert torch.equal(encoder.model.embeddings.token_vectors(encoder.tokenizer("xlstyle"))[0, 1:3], clip_g)
    assert [e.name for e in pipe.embeddings] == ["xlstyle"]
    (embeddings / "xlstyle.safetensors").unlink()
    pipe = host.pipeline(registry.default, **choice)
    assert pipe.embeddings == [] and all("xlstyle" not in encoder.tokenizer.added_words
                                         for bundle in (pipe.bundle, pipe.refiner) for encoder in bundle.text_encoders)


def test_an_embedding_without_the_refiners_width_is_skipped_for_the_refiner(models, tmp_path):
    """An embedding that fits the base but has no vectors of the refiner's encoder width (an SD1 one beside a
    bigG refiner) is drawn by the base and skipped for the refiner, as A1111 skips an embedding that does not fit
    a model: when the refiner loads (`load_refiner`), when the folder changes under a held refiner
    (`_fresh_embeddings`) and in `Pipeline.with_embeddings`; it was an EmbeddingError that failed every job."""
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 64)}, "name": "sdone"}, embeddings / "sdone.pt")
    registry = ModelRegistry(models / "sd1.safetensors", models)
    host = ModelHost(registry, "cpu", embeddings_dir=embeddings)
    choice = {"refiner": registry.find("refiner"), "handoff": RefinerChoice("refiner")}
    pipe = host.pipeline(registry.default, **choice)
    assert [e.name for e in pipe.embeddings] == ["sdone"]
    assert "sdone" in pipe.bundle.text_encoders[0].tokenizer.added_words
    assert all("sdone" not in encoder.tokenizer.added_words for encoder in pipe.refiner.text_encoders)
    torch.save({"string_to_param": {"*": torch.randn(3, 64)}, "name": "sdtwo"}, embeddings / "sdtwo.pt")
    pipe = host.pipeline(registry.default, **choice)                          # the held refiner, the folder changed
    assert [e.name for e in pipe.embeddings] == ["sdone", "sdtwo"]
    assert all(not encoder.tokenizer.added_words for encoder in pipe.refiner.text_encoders)
    again = pipe.with_embeddings(host.embeddings_in_folders(pipe.bundle))
    assert "sdtwo" in again.bundle.text_encoders[0].tokenizer.added_words and again.refiner is not None


def test_a_reloaded_base_gets_its_refiner_loaded_again_with_its_embeddings(models, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("base", "refiner"):
        shutil.copyfile(models / f"{name}.safetensors", folder / f"{name}.safetensors")
    write_original(tiny_bundle("sdxl", seed=4), folder / "other-base.safetensors", junk=False)
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    registry = ModelRegistry(folder / "base.safetensors", folder)
    host = ModelHost(registry, "cpu", embeddings_dir=embeddings)
    host.pipeline(registry.default, refiner=registry.find("refiner"),
                  handoff=RefinerChoice("refiner"))         # loaded with no embeddings
    clip_g = torch.randn(2, 128, generator=torch.Generator().manual_seed(2))   # (2, 128): bigG's width
    save_file({"clip_l": torch.randn(2, 64), "clip_g": clip_g}, str(embeddings / "xlstyle.safetensors"))
    pipe = host.pipeline(registry.find("other-base"), refiner=registry.find("refiner"),
                         handoff=RefinerChoice("refiner"))
    (encoder,) = pipe.refiner.text_encoders                                   # bigG only
    rows = encoder.model.embeddings.token_vectors(encoder.tokenizer("xlstyle"))[0, 1:3]   # (2, 128)
    assert torch.equal(rows, clip_g)
