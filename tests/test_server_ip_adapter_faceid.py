"""IP-Adapter FaceID through the server: the native `ip_adapters[].face_embedding` (512 numbers, or base64 of a
.npy file) and `face_shortcut`, and an A1111 ControlNet unit's `ipadapter_input` under the extension's
ip-adapter_face_id / ip-adapter_face_id_plus modules (base64 of torch.save's (1, 512) tensor, the module's
output). Pictures equal `sdlab txt2img` with the same .npy (--ip-adapter-image / --ip-adapter-face-embedding),
pixel for pixel, and their infotext; the A1111 unit's picture equals the native job /api/parameters reads back
from it; bad embeddings, a face embedding for the wrong adapter or module, and a pickle that is no tensor are
one 4xx line each; an entry without face_embedding draws as before."""

from __future__ import annotations

import base64
import io
import json
import pickle

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ip_adapter_fixtures import ADAPTER_JOB, SAMPLE_PICTURE, ip_adapter_state, write_image_encoder, write_ip_adapter
from server_fixtures import cli_txt2img, drawn_job, drawn_picture, file_b64, job_pixels, start_server
from test_ip_adapter_faceid_plus import _face, face_id_plus_state
from test_ip_adapter_layers import face_id_state

CLI_JOB = ("--steps", "3", "--seed", "11", "--width", "64", "--height", "64", "--cfg", "5", "--sampler", "Euler")
A1111_JOB = {"prompt": "a red apple", "steps": 3, "seed": 11, "width": 64, "height": 64, "cfg_scale": 5,
             "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def faceid(tmp_path_factory: pytest.TempPathFactory):
    """`sdlab serve` whose ControlNet folder holds a plain adapter, a FaceID and a FaceID Plus v2 adapter for the
    shipped model (the ViT encoder, 128 wide, in models/image_encoder), and a face's .npy."""
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    root = tmp_path_factory.mktemp("server-faceid")
    models = root / "models"
    (models / "ControlNet").mkdir(parents=True)
    bundle = sdlab.load().bundle
    context = bundle.unet_config.context_dim
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    write_image_encoder(models / "image_encoder", seed=2, width=128, projection=32)
    folder = models / "ControlNet"
    files = {"plain": write_ip_adapter(folder / "ip-adapter_tiny.safetensors",
                                       ip_adapter_state(widths, context, 32, seed=3, std=0.3)),
             "face_id": write_ip_adapter(folder / "ip-adapter-faceid_tiny.bin", face_id_state(widths, context)),
             "plus": write_ip_adapter(folder / "ip-adapter-faceid-plusv2_tiny.bin",
                                      face_id_plus_state(widths, context, 128))}
    face = _face(7).numpy()                                                            # (1, 512), unit length
    npy = root / "face.npy"
    np.save(npy, face)
    picture = root / "reference.png"
    Image.open(SAMPLE_PICTURE).convert("RGB").crop((0, 0, 200, 160)).save(picture)
    server = start_server(root / "outputs", "--models-dir", str(models))
    client = httpx.Client(base_url=server.url, timeout=300)
    yield {"client": client, "files": files, "face": face, "npy": npy, "picture": picture}
    client.close()
    server.stop()


def _torch_b64(value) -> str:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def _npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_native_face_id_equals_the_cli_as_numbers_and_as_npy(faceid, tmp_path):
    """A FaceID entry with no image: its 512 numbers, and the same as base64 .npy, draw the CLI's picture with the
    .npy as --ip-adapter-image, its infotext too; the job records no embedding; without FaceID the job draws the
    plain picture, and a plain entry with face_embedding null draws as without the field."""
    client, face = faceid["client"], faceid["face"]
    cli = cli_txt2img(tmp_path, ADAPTER_JOB["prompt"], *CLI_JOB, "--ip-adapter", str(faceid["files"]["face_id"]),
                      "--ip-adapter-image", str(faceid["npy"]), "--ip-adapter-scale", "0.8")
    entry = {"model": "ip-adapter-faceid_tiny", "scale": 0.8}
    job, numbers = drawn_picture(client, {**ADAPTER_JOB, "ip_adapters": [
        {**entry, "face_embedding": face[0].tolist()}]})
    _, npy = drawn_picture(client, {**ADAPTER_JOB, "ip_adapters": [{**entry, "face_embedding": _npy_b64(face)}]})
    assert np.array_equal(_rgb(numbers), _rgb(cli)) and np.array_equal(_rgb(npy), _rgb(cli))
    assert numbers.info["parameters"] == cli.info["parameters"]
    assert 'IP-Adapter 0: "Model: ip-adapter-faceid_tiny [' in numbers.info["parameters"]
    assert job["request"]["ip_adapters"] == [{"model": "ip-adapter-faceid_tiny.bin", "scale": 0.8}]
    _, plain = drawn_picture(client, ADAPTER_JOB)
    assert np.abs(_rgb(plain) - _rgb(cli)).max() > 10                    # the face acts
    image = file_b64(faceid["picture"])
    nulled = drawn_job(client, {**ADAPTER_JOB, "ip_adapters": [
        {"model": "ip-adapter_tiny", "image": image, "face_embedding": None, "face_shortcut": None}]})
    bare = drawn_job(client, {**ADAPTER_JOB, "ip_adapters": [{"model": "ip-adapter_tiny", "image": image}]})
    assert np.array_equal(job_pixels(client, nulled), job_pixels(client, bare))
    assert nulled["request"]["ip_adapters"] == bare["request"]["ip_adapters"]


def test_native_face_id_plus_equals_the_cli_and_its_shortcut_reads_back(faceid, tmp_path):
    """A FaceID Plus v2 entry: the picture, the face and face_shortcut 1.6 draw the CLI's picture; 'Face shortcut:
    1.6' is recorded, the job's settings and /api/parameters give it back, and the settings with the face and
    picture given again redraw the picture."""
    client, face = faceid["client"], faceid["face"]
    cli = cli_txt2img(tmp_path, ADAPTER_JOB["prompt"], *CLI_JOB, "--ip-adapter", str(faceid["files"]["plus"]),
                      "--ip-adapter-image", str(faceid["picture"]), "--ip-adapter-face-embedding",
                      str(faceid["npy"]), "--ip-adapter-face-shortcut", "1.6")
    job, served = drawn_picture(client, {**ADAPTER_JOB, "ip_adapters": [
        {"model": "ip-adapter-faceid-plusv2_tiny", "image": file_b64(faceid["picture"]),
         "face_embedding": _npy_b64(face), "face_shortcut": 1.6}]})
    assert np.array_equal(_rgb(served), _rgb(cli)) and served.info["parameters"] == cli.info["parameters"]
    assert "Face shortcut: 1.6" in served.info["parameters"]
    assert job["request"]["ip_adapters"][0]["face_shortcut"] == 1.6
    png = base64.b64encode(client.get(job["images"][0]).content).decode()
    settings = client.post("/api/parameters", json={"image": png}).json()["settings"]
    assert settings["ip_adapters"][0]["face_shortcut"] == 1.6
    again = drawn_job(client, {**ADAPTER_JOB, "ip_adapters": [
        {**settings["ip_adapters"][0], "model": "ip-adapter-faceid-plusv2_tiny", "image": file_b64(faceid["picture"]),
         "face_embedding": face.tolist()}]})
    assert np.array_equal(job_pixels(client, again), _rgb(served))


def _huge_npy_b64() -> str:
    """A .npy file whose header declares 10**13 float32 numbers (36 TiB), followed by 16 bytes."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 13,)})
    return base64.b64encode(buffer.getvalue() + bytes(16)).decode()


def test_a_big_endian_npy_face_draws_as_the_native_one(faceid):
    """A big-endian '>f4' .npy of the face is the same embedding: the job draws the float32 file's picture."""
    client, face = faceid["client"], faceid["face"]
    drawn = [job_pixels(client, drawn_job(client, {**ADAPTER_JOB, "ip_adapters": [
        {"model": "ip-adapter-faceid_tiny", "face_embedding": _npy_b64(face.astype(dtype))}]}))
        for dtype in ("<f4", ">f4")]
    assert np.array_equal(*drawn)


def _job_count(client: httpx.Client) -> int:
    return len(client.get("/api/jobs").json()["jobs"])


@pytest.mark.parametrize("entry, status, words", [
    ({"face_embedding": [0.1] * 511}, 422, "the face embedding has shape (511,)"),
    ({"face_embedding": [[0.1] * 512, [0.1] * 3]}, 422, "face_embedding must be numbers"),
    ({"face_embedding": ["x"] * 512}, 422, "face_embedding must be numbers"),
    ({"face_embedding": base64.b64encode(b"not a numpy file").decode()}, 422, "is not a .npy file"),
    ({"face_embedding": "%%%"}, 400, "face_embedding is not valid base64"),
    ({"face_embedding": "NPY:nan"}, 422, "the face embedding holds NaN or infinite values"),
    ({"face_embedding": "NPY:int"}, 422, "int64); this FaceID adapter takes 512 floats per face"),
    ({"face_embedding": "NPY:text"}, 422, "face_embedding is not a small numeric .npy array: its dtype '<U1' is "
                                          "not numbers"),
    ({"face_embedding": "NPY:records"}, 422, "its dtype '|V4' is not numbers"),
    ({"face_embedding": "NPY:huge"}, 422, "its header declares shape (10000000000000,), 10000000000000 numbers"),
    ({"face_embedding": [True] * 512}, 422, "face_embedding must be numbers"),
    ({"face_embedding": ["0.1"] * 512}, 422, "face_embedding must be numbers"),
    ({}, 422, "an IP-Adapter FaceID reads an InsightFace face embedding"),
    ({"face_embedding": "FACE", "image": "PICTURE"}, 422, "reads the face embedding alone, no picture"),
    ({"face_embedding": "FACE", "face_shortcut": 1.0}, 422, "face_embedding and face_shortcut are for an IP-Adapter "
                                                            "FaceID Plus"),
    ({"model": "ip-adapter_tiny", "face_embedding": "FACE", "image": "PICTURE"}, 422,
     "a face embedding is for an IP-Adapter FaceID; this adapter reads a picture"),
    ({"model": "ip-adapter-faceid-plusv2_tiny", "image": "PICTURE", "face_embedding": "TWO"}, 422,
     "an IP-Adapter FaceID Plus takes one face with its one picture; the face embedding holds 2"),
    ({"model": "ip-adapter-faceid-plusv2_tiny", "face_embedding": "FACE"}, 422, "needs an image"),
    ({"model": "ip-adapter-faceid-plusv2_tiny", "image": "PICTURE", "face_embedding": "FACE", "face_shortcut": 20},
     422, "face_shortcut must be a number in [0, 10]"),
    ({"model": "ip-adapter-faceid-plusv2_tiny", "module": "ip-adapter_face_id_plus", "image": "PICTURE",
      "face_embedding": "FACE", "face_shortcut": 1.6}, 422, "face_shortcut and module: an A1111 unit's line records "
                                                           "no face shortcut"),
])
def test_bad_native_face_embeddings_are_one_4xx_line(faceid, entry, status, words):
    client, face = faceid["client"], faceid["face"]
    given = {"NPY:nan": _npy_b64(np.full((1, 512), np.nan, np.float32)),
             "NPY:int": _npy_b64(np.ones(512, np.int64)), "NPY:text": _npy_b64(np.array(["a"] * 512)),
             "NPY:records": _npy_b64(np.zeros(512, dtype=[("a", "f4")])), "NPY:huge": _huge_npy_b64(),
             "FACE": face[0].tolist(),
             "TWO": np.concatenate([face, face]).tolist(), "PICTURE": file_b64(faceid["picture"])}
    entry = {key: given.get(value, value) if isinstance(value, str) else value for key, value in entry.items()}
    before = _job_count(client)
    refused = client.post("/api/jobs", json={**ADAPTER_JOB, "ip_adapters": [
        {"model": "ip-adapter-faceid_tiny", **entry}]})
    assert refused.status_code == status and words in refused.json()["detail"], refused.text
    assert "Traceback" not in refused.text and "IP-Adapter 0" in refused.json()["detail"]
    assert _job_count(client) == before


def _unit(**change) -> dict:
    return {"enabled": True, "module": "ip-adapter_face_id", "model": "ip-adapter-faceid_tiny", "weight": 0.8,
            "guidance_start": 0.0, "guidance_end": 1.0, **change}


def _a1111(client: httpx.Client, *units: dict) -> httpx.Response:
    return client.post("/sdapi/v1/txt2img", json={
        **A1111_JOB, "alwayson_scripts": {"controlnet": {"args": list(units)}}})


def _redrawn(client: httpx.Client, answer: httpx.Response, **given) -> np.ndarray:
    """The native job /api/parameters reads back from the answer's picture, its IP-Adapter entry given `given`
    (the face embedding, the picture: the text holds neither)."""
    from sdlab.server.native import JobIn

    settings = client.post("/api/parameters", json={"image": answer.json()["images"][0]}).json()["settings"]
    body = {key: value for key, value in settings.items()
            if value is not None and key in JobIn.model_fields and key != "model"}
    assert len(body["ip_adapters"]) == 1, body
    body["ip_adapters"] = [{**body["ip_adapters"][0], **given}]
    return job_pixels(client, drawn_job(client, body))


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_a1111_face_id_units_take_ipadapter_input(faceid):
    """A unit with module ip-adapter_face_id and the extension's ipadapter_input (torch.save of the (1, 512)
    tensor; its image, which the extension does not read then, ignored) draws; its 'ControlNet 0' line is the
    extension's, and the native job /api/parameters reads from it, given the face, redraws it. A list of two
    tensors is two faces. ip-adapter_face_id_plus reads the unit's picture and the face: the same redraw."""
    client, face = faceid["client"], faceid["face"]
    tensor = torch.from_numpy(face)                                                    # (1, 512)
    drawn = _a1111(client, _unit(ipadapter_input=_torch_b64(tensor), image=file_b64(faceid["picture"])))
    assert drawn.status_code == 200, drawn.text
    info = json.loads(drawn.json()["info"])["infotexts"][0]
    assert 'ControlNet 0: "Module: ip-adapter_face_id, Model: ip-adapter-faceid_tiny [' in info, info
    pixels = _pixels(drawn.json()["images"][0])
    assert np.array_equal(_redrawn(client, drawn, face_embedding=face.tolist()), pixels)
    unimaged = _a1111(client, _unit(ipadapter_input=[_torch_b64(tensor)]))
    assert np.array_equal(_pixels(unimaged.json()["images"][0]), pixels)
    two = _a1111(client, _unit(ipadapter_input=[_torch_b64(tensor), _torch_b64(-tensor)]))
    assert two.status_code == 200 and np.abs(_pixels(two.json()["images"][0]) - pixels).max() > 5
    plus = _a1111(client, _unit(module="ip-adapter_face_id_plus", model="ip-adapter-faceid-plusv2_tiny",
                                ipadapter_input=_torch_b64(tensor), image=file_b64(faceid["picture"])))
    assert plus.status_code == 200, plus.text
    assert 'ControlNet 0: "Module: ip-adapter_face_id_plus, Model: ip-adapter-faceid-plusv2_tiny [' in \
        json.loads(plus.json()["info"])["infotexts"][0]
    assert np.array_equal(_redrawn(client, plus, face_embedding=face.tolist(), image=file_b64(faceid["picture"])),
                          _pixels(plus.json()["images"][0]))


def _extension_average_of(*embeds: torch.Tensor) -> torch.Tensor:
    """sd-webui-controlnet scripts/ipadapter/ipadapter_model.py (commit 01de1cb) `ImageEmbed.average_of`'s
    `average_tensors`, which plugable_ipadapter.py `hook` applies to each input's `get_image_emb` (each input's
    face projected alone: `_get_image_embeds_faceid`, ``image_proj_model(faceid_embed)`` and of zeros_like)."""
    return torch.sum(torch.stack(embeds), dim=0) / len(embeds)


def test_several_ipadapter_input_faces_are_averaged_as_the_extension(faceid):
    """Several faces of one A1111 FaceID unit: the extension projects each input's face alone and averages the
    results (cond and uncond); sdlab's tokens under the A1111 convention equal that transcription within 1e-5
    (4 tokens, not the diffusers convention's 8, which stays for a native job), and the A1111 unit draws the
    native a1111-convention job's picture with the same two faces, pixel for pixel."""
    import sdlab
    from sdlab.checkpoints.ip_adapter import load_ip_adapter
    from sdlab.pipeline.image_prompt import IPAdapterInput, prepare_image_prompts

    client, face = faceid["client"], faceid["face"]
    other = _face(9).numpy()                                                            # (1, 512)
    both = np.concatenate([face, other])                                                # (2, 512)
    bundle = sdlab.load().bundle
    adapter = load_ip_adapter(faceid["files"]["face_id"])
    prepared = prepare_image_prompts(bundle, [IPAdapterInput(adapter, both)], 1, convention="a1111")
    with torch.no_grad():
        project = adapter.model.image_proj
        ones = [torch.from_numpy(f[None]) for f in both]                                 # each (1, 512)
        cond = _extension_average_of(*[project(f) for f in ones])                         # (1, 4, C)
        uncond = _extension_average_of(*[project(torch.zeros_like(f)) for f in ones])
    assert prepared.cond_tokens.shape == cond.shape == (1, 4, cond.shape[-1])
    assert torch.allclose(prepared.cond_tokens, cond, atol=1e-5, rtol=0)      # max 1.4e-6: batched float32
    assert torch.allclose(prepared.uncond_tokens, uncond, atol=1e-5, rtol=0)
    diffusers = prepare_image_prompts(bundle, [IPAdapterInput(adapter, both)], 1)
    assert diffusers.cond_tokens.shape[1] == 8                                         # N x T, one after another
    drawn = _a1111(client, _unit(ipadapter_input=[_torch_b64(torch.from_numpy(face)),
                                                  _torch_b64(torch.from_numpy(other))]))
    assert drawn.status_code == 200, drawn.text
    native = _redrawn(client, drawn, face_embedding=both.tolist())
    assert json.loads(drawn.json()["info"])["infotexts"][0].count("ControlNet 0") == 1
    assert np.array_equal(native, _pixels(drawn.json()["images"][0]))


class _Runs:
    """A pickle that would run code when loaded without weights_only (never here)."""

    def __reduce__(self):
        return (print, ("loaded",))


@pytest.mark.parametrize("unit, words", [
    ({}, "computes this module's face embedding with InsightFace, which sdlab does not have; send the embedding as "
         "the unit's ipadapter_input"),
    ({"module": "ip-adapter_clip_sd15", "image": "PICTURE"},
     "give it the module ip-adapter_face_id with the embedding"),
    ({"ipadapter_input": "TENSOR", "model": "ip-adapter-faceid-plusv2_tiny", "image": "PICTURE"},
     "is not for the IP-Adapter ip-adapter-faceid-plusv2_tiny.bin, a FaceID Plus model: choose "
     "ip-adapter_face_id_plus"),
    ({"ipadapter_input": "TENSOR", "model": "ip-adapter_tiny"},
     "reads a face embedding for an IP-Adapter FaceID, and ip-adapter_tiny.safetensors is none"),
    ({"ipadapter_input": "TENSOR", "module": "ip-adapter_face_id_plus", "model": "ip-adapter-faceid-plusv2_tiny"},
     "needs an image"),
    ({"ipadapter_input": "WIDE"}, "the face embedding has shape (1, 100)"),
    ({"ipadapter_input": "RUNS"}, "ipadapter_input is not a tensor torch.save wrote (read as tensors alone)"),
    ({"ipadapter_input": "DICT"}, "ipadapter_input holds dict, not the face embedding's tensor"),
    ({"ipadapter_input": base64.b64encode(b"junk").decode()}, "ipadapter_input is not a tensor torch.save wrote"),
    ({"ipadapter_input": "SPARSE"}, "ipadapter_input holds a torch.sparse_coo tensor; the face embedding's is a "
                                    "dense (1, 512) tensor"),
    ({"ipadapter_input": ["TENSOR", "SPARSE"]}, "ipadapter_input holds a torch.sparse_coo tensor"),
    ({"ipadapter_input": "BOMB"}, "ipadapter_input unpacks to 64000"),
    ({"ipadapter_input": "TENSOR", "module": "ip-adapter_clip_sd15", "model": "ip-adapter_tiny", "image": "PICTURE"},
     "ipadapter_input (precomputed image embeddings) is not drawn by sdlab"),
])
def test_bad_a1111_face_units_are_one_422_line(faceid, unit, words):
    face = torch.from_numpy(faceid["face"])
    given = {"TENSOR": _torch_b64(face), "WIDE": _torch_b64(torch.ones(1, 100)), "RUNS": _pickled(_Runs()),
             "DICT": _torch_b64({"face": face}), "PICTURE": file_b64(faceid["picture"]),
             "SPARSE": _torch_b64(face.to_sparse()), "BOMB": _deflated_b64(torch.zeros(1, 16_000_000))}
    unit = {key: [given[v] for v in value] if isinstance(value, list) else given.get(value, value)
            if isinstance(value, str) else value for key, value in unit.items()}
    refused = _a1111(faceid["client"], _unit(**unit))
    assert refused.status_code == 422 and words in refused.text, refused.text
    assert "module '" in refused.text and "Traceback" not in refused.text


def _deflated_b64(value) -> str:
    """torch.save of `value` rewritten with deflated records: a (1, 16e6) zero tensor is 64 MB unpacked in about
    62 KB (a decompression bomb in the small)."""
    import zipfile

    buffer = io.BytesIO()
    torch.save(value, buffer)
    source, out = zipfile.ZipFile(buffer), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info.filename))
    return base64.b64encode(out.getvalue()).decode()


def _pickled(value) -> str:
    return base64.b64encode(pickle.dumps(value)).decode()


@pytest.mark.parametrize("module", ["ip-adapter_face_id", "ip-adapter_face_id_plus"])
def test_a1111_face_id_unit_pictures_redraw_from_png(faceid, module, tmp_path, capsys):
    """--from-png of an A1111 FaceID unit's picture, given the adapter and the .npy (and FaceID Plus's picture):
    the unit's line read back (its module: no encoder for FaceID, clip_h's for FaceID Plus), recorded again, and
    the unit's picture redrawn (this process against the server's: float sums may round 1 apart)."""
    from cli_helpers import pixels, run
    from sdlab.pipeline.png_info import read_parameters

    plus = module.endswith("plus")
    unit = _unit(module=module, ipadapter_input=_torch_b64(torch.from_numpy(faceid["face"])),
                 **({"model": "ip-adapter-faceid-plusv2_tiny", "image": file_b64(faceid["picture"])} if plus else {}))
    drawn = _a1111(faceid["client"], unit)
    assert drawn.status_code == 200, drawn.text
    saved, again = tmp_path / "unit.png", tmp_path / "again.png"
    saved.write_bytes(base64.b64decode(drawn.json()["images"][0]))
    given = (["--ip-adapter-image", str(faceid["picture"]), "--ip-adapter-face-embedding", str(faceid["npy"])] if plus
             else ["--ip-adapter-image", str(faceid["npy"])])
    code, _, stderr = run(["txt2img", "--no-progress", "--from-png", str(saved), "--ip-adapter",
                           str(faceid["files"]["plus" if plus else "face_id"]), *given, "--out", str(again)], capsys)
    assert code == 0, stderr
    assert read_parameters(again) == read_parameters(saved)
    assert np.abs(pixels(again) - _pixels(drawn.json()["images"][0])).max() <= 1
