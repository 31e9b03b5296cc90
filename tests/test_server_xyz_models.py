"""The X/Y/Z plot's model axes on /sdapi/v1 as A1111 1.10's scripts/xyz_grid.py draws them: Checkpoint name
(`apply_checkpoint`: `p.override_settings['sd_model_checkpoint'] = info.name`, `confirm_checkpoints` refusing an
unknown one before anything is drawn, labelled by `format_remove_path`), VAE (`apply_vae`: `override_settings
['sd_vae'] = find_vae(x)`), Size (`apply_size`), Refiner checkpoint / Refiner switch at (`apply_field`), the cells
drawn with the costliest axis outermost (`Script.run`'s `first_axes_processed`) and the selected model loaded
again afterwards (`SharedSettingsStackHelper.__exit__`: `reload_model_weights`, `reload_vae_weights`).

Every cell must be pixel-equal to the single request it stands for. Two tiny SD1 checkpoints (one with a sidecar
VAE), a VAE file, and a tiny SDXL base and refiner in a --models-dir."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdlab.pipeline.grid import GridError, Plot, draw_plot, parse_axis
from sdlab.pipeline.png_info import format_parameters, parse_parameters
from sdlab.server.a1111_scripts import Drawn, ScriptHost, run_xyz_plot
from test_server_a1111_scripts import index_of, xyz_args
from test_server_lazy_hashes import _a1111_closest_match

BASE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "seed": 7, "cfg_scale": 5.0,
        "sampler_name": "Euler", "width": 32, "height": 32}


def _vae_file(path: Path, seed: int) -> None:
    from bundle_fixtures import randomize_, tiny_bundle

    state = {k: v.contiguous() for k, v in randomize_(tiny_bundle("sd1", seed=9).vae, seed).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from bundle_fixtures import tiny_bundle, write_original

    models = tmp_path_factory.mktemp("xyz-models") / "models"
    checkpoints = models / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    write_original(tiny_bundle("sd1", seed=3), checkpoints / "alpha.safetensors", junk=False)
    write_original(tiny_bundle("sd1", seed=4), checkpoints / "beta.safetensors", junk=False)
    _vae_file(checkpoints / "alpha.vae.safetensors", 99)
    _vae_file(models / "VAE" / "blue.safetensors", 97)
    write_original(tiny_bundle("sdxl"), checkpoints / "xl" / "base.safetensors", junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), checkpoints / "xl" / "refiner.safetensors", junk=False)
    (models / "embeddings").mkdir()
    save_file({"clip_l": torch.randn(1, 64), "clip_g": torch.randn(1, 128)},     # the tiny SDXL's widths
              str(models / "embeddings" / "xlword.safetensors"))
    return models


@pytest.fixture(scope="module")
def client(models):
    from server_fixtures import start_server

    server = start_server(models.parent / "outputs", "--models-dir", str(models), "--model",
                          str(models / "Stable-diffusion" / "alpha.safetensors"), "--embeddings-dir",
                          str(models / "embeddings"))
    with httpx.Client(base_url=server.url + "/sdapi/v1", timeout=300) as c:
        yield c
    server.stop()


def _title(client: httpx.Client, name: str) -> str:
    return next(m["title"] for m in client.get("/sd-models").json() if m["model_name"] == name)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _plot(client: httpx.Client, route: str = "txt2img", **fields) -> tuple[list[str], dict]:
    answer = client.post(f"/{route}", json={**BASE, "script_name": "x/y/z plot", **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()["images"], json.loads(answer.json()["info"])


def _single(client: httpx.Client, **fields) -> tuple[np.ndarray, str]:
    answer = client.post("/txt2img", json={**BASE, **fields})
    assert answer.status_code == 200, answer.text
    return _pixels(answer.json()["images"][0]), json.loads(answer.json()["info"])["infotexts"][0]


def test_each_checkpoint_cell_is_the_single_request_with_that_model(client) -> None:
    """X Checkpoint name (the dropdown: a title, a file name) x Y CFG Scale: each cell is the single request with
    `override_settings.sd_model_checkpoint`; labels are A1111's `format_remove_path` of the values; the grid's
    infotext has X Type / X Values; the selected model stays the one selected."""
    beta = _title(client, "beta")
    args = xyz_args(x_type=index_of("Checkpoint name"), x_values_dropdown=[beta, "alpha.safetensors"],
                    y_type=index_of("CFG Scale"), y_values="3,5", include_lone_images=True)
    images, info = _plot(client, script_args=args)
    assert len(images) == 1 + 4
    cells = {}
    for n, (j, i) in enumerate((j, i) for j in range(2) for i in range(2)):
        single, text = _single(client, cfg_scale=[3.0, 5.0][j],
                               override_settings={"sd_model_checkpoint": [beta, "alpha.safetensors"][i]})
        cells[(i, j, 0)] = _pixels(images[1 + n])
        assert np.array_equal(cells[(i, j, 0)], single), (i, j)
        assert info["infotexts"][1 + n] == text
        assert parse_parameters(text)["Model"] == ["beta", "alpha"][i]
    assert not np.array_equal(cells[(0, 0, 0)], cells[(1, 0, 0)])
    plot = Plot(parse_axis(f"Checkpoint name={beta},alpha.safetensors"), parse_axis("cfg=3,5"))
    assert plot.x.labels == (beta, "alpha.safetensors")
    assert np.array_equal(_pixels(images[0]), np.asarray(plot.sheet({k: Image.fromarray(v) for k, v in cells.items()})))
    fields = parse_parameters(info["infotexts"][0])
    assert (fields["X Type"], fields["X Values"], fields["Model"]) == ("Checkpoint name", f"{beta},alpha.safetensors",
                                                                       "beta")
    assert client.get("/options").json()["sd_model_checkpoint"] == _title(client, "alpha")


def test_vae_cells_are_single_requests_with_that_vae(client) -> None:
    """VAE None / Automatic (alpha's sidecar) / a listed file in any case / a name not listed (A1111's `find_vae`:
    Automatic): each cell the single request with that `override_settings.sd_vae`, labelled `VAE: <value>`."""
    args = xyz_args(x_type=index_of("VAE"), x_values="None, automatic, BLUE.safetensors, nope", csv_mode=True,
                    include_lone_images=True)
    images, info = _plot(client, script_args=args)
    sd_vae = ["None", "Automatic", "blue.safetensors", "Automatic"]
    cells = [_pixels(image) for image in images[1:]]
    for cell, name in zip(cells, sd_vae):
        assert np.array_equal(cell, _single(client, override_settings={"sd_vae": name})[0]), name
    assert not np.array_equal(cells[0], cells[1]) and not np.array_equal(cells[1], cells[2])
    assert parse_parameters(info["infotexts"][3])["VAE"] == "blue.safetensors"
    assert Plot(parse_axis("VAE=None, automatic, BLUE.safetensors, nope")).x.labels == (
        "VAE: None", "VAE: automatic", "VAE: BLUE.safetensors", "VAE: nope")


def test_size_cells_are_single_requests_of_that_size(client) -> None:
    args = xyz_args(x_type=index_of("Size"), x_values="32x48, 48 x 32", include_lone_images=True)
    images, info = _plot(client, script_args=args)
    for image, (width, height) in zip(images[1:], ((32, 48), (48, 32))):
        assert np.array_equal(_pixels(image), _single(client, width=width, height=height)[0])
    assert parse_parameters(info["infotexts"][0])["X Type"] == "Size"
    assert Plot(parse_axis("Size=32x48, 48 x 32")).x.labels == ("Size: 32x48", "Size: 48 x 32")


def test_refiner_cells_are_single_requests_with_that_refiner(client) -> None:
    """Z Checkpoint name (the SDXL base), X Refiner checkpoint None / the refiner, Y Refiner switch at. After the
    plot the selected SD1 model is the one loaded again: GET embeddings lists the loaded model's, and skips the
    SDXL embedding only while an SD1 model is loaded."""
    base, refiner = _title(client, "xl_base"), _title(client, "xl_refiner")
    args = xyz_args(x_type=index_of("Refiner checkpoint"), x_values_dropdown=["None", refiner],
                    y_type=index_of("Refiner switch at"), y_values="0.5,0.8", z_type=index_of("Checkpoint name"),
                    z_values_dropdown=["xl/base.safetensors"], include_lone_images=True)
    images, info = _plot(client, script_args=args)
    assert list(client.get("/embeddings").json()["skipped"]) == ["xlword"]
    for n, (j, i) in enumerate((j, i) for j in range(2) for i in range(2)):
        single, text = _single(client, override_settings={"sd_model_checkpoint": base},
                               refiner_checkpoint=["None", refiner][i], refiner_switch_at=[0.5, 0.8][j])
        assert np.array_equal(_pixels(images[1 + n]), single), (i, j)
        assert info["infotexts"][1 + n] == text
    assert parse_parameters(info["infotexts"][4])["Refiner switch at"] == "0.8"
    assert "Refiner" not in parse_parameters(info["infotexts"][3])
    assert not np.array_equal(_pixels(images[1]), _pixels(images[2]))
    plot = Plot(parse_axis(f"Refiner checkpoint=None,{refiner}"), parse_axis("Refiner switch at=0.5,0.8"))
    assert plot.x.labels == ("None", refiner.rsplit("/", 1)[-1]) and plot.y.labels[0] == "Refiner switch at: 0.5"


def test_a_checkpoint_value_names_the_model_of_the_shortest_title_holding_it(client) -> None:
    """A1111's `apply_checkpoint` / `confirm_checkpoints` take `get_closet_checkpoint_match(x)` (transcribed:
    `_a1111_closest_match`): a model's name, else the shortest title holding the value; the refiner's too."""
    titles = [m["title"] for m in client.get("/sd-models").json()]
    values = ("eta.safe", "safetensors")
    models = [_a1111_closest_match(titles, value) for value in values]
    assert models[0] == _title(client, "beta") and None not in models
    args = xyz_args(x_type=index_of("Checkpoint name"), x_values=", ".join(values), csv_mode=True,
                    include_lone_images=True)
    images, _ = _plot(client, script_args=args)
    for image, title in zip(images[1:], models):
        assert np.array_equal(_pixels(image), _single(client, override_settings={"sd_model_checkpoint": title})[0])
    args = xyz_args(x_type=index_of("Refiner checkpoint"), x_values="refiner", z_type=index_of("Checkpoint name"),
                    z_values="xl/base", csv_mode=True, include_lone_images=True)
    images, info = _plot(client, script_args=args, refiner_switch_at=0.5)
    single, text = _single(client, override_settings={"sd_model_checkpoint": _title(client, "xl_base")},
                           refiner_checkpoint=_title(client, "xl_refiner"), refiner_switch_at=0.5)
    assert np.array_equal(_pixels(images[1]), single) and info["infotexts"][1] == text


@pytest.mark.parametrize("axis, values, message", [
    ("Checkpoint name", "alpha.safetensors,nope", "Checkpoint name axis: Unknown checkpoint: nope"),
    ("Refiner checkpoint", "None,nope", "Refiner checkpoint axis: Unknown checkpoint: nope"),
    ("Size", "32x32,32", "'32' is not a size WIDTHxHEIGHT"),
    ("Refiner switch at", "0.5,1", "Refiner switch at must lie in (0, 1)"),
])
def test_what_a_model_axis_cannot_draw_is_a_422_before_anything_is_drawn(client, axis, values, message) -> None:
    before = client.get("/progress").json()["state"]["job_count"]
    args = xyz_args(x_type=index_of(axis), x_values=values, csv_mode=True)
    answer = client.post("/txt2img", json={**BASE, "script_name": "x/y/z plot", "script_args": args})
    assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    assert client.get("/progress").json()["state"]["job_count"] == before


def _host(tmp_path: Path, drawn: list, restored: list) -> ScriptHost:
    """A script host that records the cells' bodies in the order drawn and each `restore_model`."""
    picture = tmp_path / "cell.png"
    Image.new("RGB", (8, 8)).save(picture)
    text = format_parameters({"Prompt": "a red apple", "Steps": 2, "Seed": 7})

    async def draw(bodies, labels, keep_going, pictures=None, seeds=None):
        drawn.extend(bodies)
        return [Drawn([picture], [text], {"seed": 7, "prompt": "a red apple", "infotexts": [text], "width": 8,
                       "height": 8}) for _ in bodies]

    async def restore_model():
        restored.append(len(drawn))

    return ScriptHost(draw, None, lambda image, text: text, lambda body: {}, return_grid=True, upscalers=list,
                      listed_upscaler=str, upscaled=None, init_pictures=None, max_images=100,
                      checkpoint_title=lambda name: {"a": "a.safetensors [1]", "b": "b.safetensors [2]"}.get(name),
                      vae_names=lambda: ["blue.safetensors"], restore_model=restore_model,
                      queued=lambda: bool(drawn))


def test_the_checkpoint_axis_is_drawn_outermost_and_the_selected_model_loaded_again(tmp_path) -> None:
    """A1111's `Script.run`: the axis of the highest cost (Checkpoint name 1.0) is processed first, then the next
    (VAE 0.7 over Steps 0), so X Steps x Y VAE x Z Checkpoint name changes the model once and the VAE once per
    model; after the cells, `SharedSettingsStackHelper` loads the selected model again."""
    from sdlab.server.a1111 import Txt2ImgIn

    drawn, restored = [], []
    args = xyz_args(x_type=index_of("Steps"), x_values="1,2", y_type=index_of("VAE"), y_values="blue.safetensors, x",
                    z_type=index_of("Checkpoint name"), z_values="b, a", csv_mode=True)
    body = Txt2ImgIn(**{**BASE, "script_name": "x/y/z plot", "script_args": args})
    asyncio.run(run_xyz_plot(_host(tmp_path, drawn, restored), body, "txt2img"))
    order = [(b.override_settings["sd_model_checkpoint"], b.override_settings["sd_vae"], b.steps) for b in drawn]
    assert order == [(model, vae, steps) for model in ("b.safetensors [2]", "a.safetensors [1]")
                     for vae in ("blue.safetensors", "Automatic") for steps in (1, 2)]
    assert restored == [8]
    plot = Plot(parse_axis("steps=1,2"), parse_axis("vae=a,b"), parse_axis("checkpoint=a,b"))
    assert plot.drawing_order()[:3] == [(0, 0, 0), (1, 0, 0), (0, 1, 0)]
    assert Plot(parse_axis("checkpoint=a,b"), parse_axis("steps=1,2")).drawing_order() == [
        (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


def test_an_unknown_checkpoint_is_refused_before_anything_is_drawn(tmp_path) -> None:
    from sdlab.server.a1111 import Txt2ImgIn
    from sdlab.server.inputs import BadRequest

    drawn, restored = [], []
    body = Txt2ImgIn(**{**BASE, "script_name": "x/y/z plot",
                        "script_args": xyz_args(x_type=index_of("Checkpoint name"), x_values="a,c", csv_mode=True)})
    with pytest.raises(BadRequest, match="Unknown checkpoint: c"):
        asyncio.run(run_xyz_plot(_host(tmp_path, drawn, restored), body, "txt2img"))
    assert drawn == [] and restored == []


def test_a_plot_refused_at_a_cell_loads_no_model(tmp_path) -> None:
    """A cell the route refuses (`draw` checks every cell before the first job) ends the plot before A1111's
    `SharedSettingsStackHelper` is entered: the selected model is not loaded again."""
    from dataclasses import replace

    from sdlab.server.a1111 import Txt2ImgIn
    from sdlab.server.inputs import BadRequest

    async def refused(bodies, labels, keep_going, pictures=None, seeds=None):
        raise BadRequest(f"{labels[1]}: steps must be at most 150", 422)

    drawn, restored = [], []
    host = replace(_host(tmp_path, drawn, restored), draw=refused)
    body = Txt2ImgIn(**{**BASE, "script_name": "x/y/z plot",
                        "script_args": xyz_args(x_type=index_of("Checkpoint name"), x_values="a,b", csv_mode=True)})
    with pytest.raises(BadRequest, match="steps must be at most 150"):
        asyncio.run(run_xyz_plot(host, body, "txt2img"))
    assert restored == []


@pytest.mark.parametrize("error", ["QueueFull", "Unavailable"])
def test_a_plot_that_fails_after_a_cell_was_queued_loads_the_selected_model_again(tmp_path, error) -> None:
    """A later cell's full queue or the server stopping, after a first cell's job loaded checkpoint a: A1111's
    `SharedSettingsStackHelper.__exit__` restores on the exception too, so the selected model is loaded again and
    the error stands."""
    from dataclasses import replace

    from sdlab.server.a1111 import Txt2ImgIn
    from sdlab.server.jobs import QueueFull, Unavailable

    failure = QueueFull("the queue is full") if error == "QueueFull" else Unavailable("the server is stopping")

    async def fails_at_the_second(bodies, labels, keep_going, pictures=None, seeds=None):
        drawn.append(bodies[0])
        raise failure

    drawn, restored = [], []
    host = replace(_host(tmp_path, drawn, restored), draw=fails_at_the_second)
    body = Txt2ImgIn(**{**BASE, "script_name": "x/y/z plot",
                        "script_args": xyz_args(x_type=index_of("Checkpoint name"), x_values="a,b", csv_mode=True)})
    with pytest.raises(type(failure)):
        asyncio.run(run_xyz_plot(host, body, "txt2img"))
    assert restored == [1]


def test_a_model_that_fails_to_load_after_the_plot_is_logged(monkeypatch, caplog) -> None:
    """The plot is drawn by then: any error loading the selected model again (out of memory, a file gone) is
    logged, and the plot answered."""
    import threading
    from types import SimpleNamespace

    from sdlab.server import a1111

    def fails(service):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(a1111, "_load_selected", fails)
    service = SimpleNamespace(host=SimpleNamespace(busy=threading.Lock(), selected=SimpleNamespace(title="a", sha256=None),
                                                   between_jobs=lambda action: action()),
                              options={}, config=SimpleNamespace(limits=SimpleNamespace(max_images=4)),
                              registry=SimpleNamespace(vaes=SimpleNamespace(names=list)))
    with caplog.at_level("ERROR", logger="sdlab.server"):
        asyncio.run(a1111._script_host(service, None).restore_model())
    assert "the selected model was not loaded again after the script: CUDA out of memory" in caplog.text


def test_draw_plot_of_one_pipeline_refuses_a_model_axis() -> None:
    with pytest.raises(GridError, match="Checkpoint name, VAE or Refiner axis"):
        draw_plot(lambda request: None, {"prompt": "a"}, Plot(parse_axis("Checkpoint name=a,b")))
