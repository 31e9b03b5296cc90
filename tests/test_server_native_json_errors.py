"""Native API bodies refused before anything is queued: one that is not JSON (a shell's quoting cut it short, a
trailing comma) is a 422 that says so and where parsing stopped, not pydantic's location tuple (`10: JSON decode
error`); a picture the job's mode does not read (an init picture in txt2img, a mask outside inpaint) a 422 naming the
mode to send. In-process app; nothing is drawn."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    from fastapi.testclient import TestClient

    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    with TestClient(create_app(ServerConfig(output_dir=tmp_path_factory.mktemp("json") / "outputs"))) as c:
        yield c


@pytest.mark.parametrize("body,detail", [
    (b'{"prompt":', "the body is not valid JSON: Expecting value at character 10"),
    (b'{"prompt": "a", }', "the body is not valid JSON: Expecting property name enclosed in double quotes at character 16"),
    (b"{'prompt': 'a'}", "the body is not valid JSON: Expecting property name enclosed in double quotes at character 1"),
])
def test_a_body_that_is_not_json_is_a_422_that_says_so(client, body, detail):
    answer = client.post("/api/jobs", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert answer.json() == {"detail": detail}
    assert client.get("/api/jobs").json()["jobs"] == []          # nothing queued


def test_field_errors_keep_their_names(client):
    answer = client.post("/api/jobs", json={"prompt": "x", "steps": "many"})
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith("steps: Input should be a valid integer")


PICTURE = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGP4DwABAQEAG7buVgAAAABJRU5ErkJggg==")  # 1x1 grey


@pytest.mark.parametrize("body,detail", [
    ({"init_image": PICTURE},
     "init_image is given but mode is 'txt2img', which reads none: send mode 'img2img' (or 'inpaint' with mask_image)"),
    ({"mode": "txt2img", "init_image": PICTURE, "script_name": "Prompt matrix"},
     "init_image is given but mode is 'txt2img', which reads none: send mode 'img2img' (or 'inpaint' with mask_image)"),
    ({"mode": "img2img", "init_image": PICTURE, "mask_image": PICTURE},
     "mask_image is given but mode is 'img2img', which reads none: send mode 'inpaint'"),
    ({"mask_image": PICTURE}, "mask_image is given but mode is 'txt2img', which reads none: send mode 'inpaint'"),
])
def test_a_picture_the_mode_does_not_read_is_refused_not_dropped(client, body, detail):
    """Before, a job sent with an init picture and no mode (txt2img, the default) drew a picture of the prompt alone
    and an img2img job's mask was dropped: the client got a 202 and a picture that ignored what it sent."""
    answer = client.post("/api/jobs", json={"prompt": "a cat", "steps": 2, **body})
    assert answer.status_code == 422, answer.text
    assert answer.json() == {"detail": detail}
    assert client.get("/api/jobs").json()["jobs"] == []


def test_null_pictures_are_unset_in_any_mode(client):
    """A client that sends every field, the pictures null, is not refused (a field sent as null counts as unset)."""
    answer = client.post("/api/jobs", json={"prompt": "a cat", "steps": 200000, "init_image": None,
                                            "mask_image": None})
    assert answer.status_code == 400 and "steps" in answer.json()["detail"]     # refused for its steps alone


@pytest.mark.parametrize("body,detail", [
    (b'{"prompt": "caf\xe9"}', "the body is not valid JSON: it is not UTF-8 text (the byte 0xE9 at byte 16)"),
    (b'{"script_args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "the body is not valid JSON: its arrays and objects nest deeper than the server reads"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000,
     "the body is not valid JSON: its arrays and objects nest deeper than the server reads"),
], ids=["latin-1 byte", "deep arrays", "deep objects"])
def test_a_body_python_cannot_read_is_the_same_422_with_its_reason(client, body, detail):
    """Before, FastAPI answered these 400 "There was an error parsing the body", the reason dropped; the A1111 routes
    answer the json_invalid error in their shape, as a body that is not JSON."""
    answer = client.post("/api/jobs", content=body, headers={"content-type": "application/json"})
    assert (answer.status_code, answer.json()) == (422, {"detail": detail})
    a1111 = client.post("/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"})
    assert a1111.status_code == 422 and a1111.json()["detail"][0]["type"] == "json_invalid", a1111.text
    assert client.get("/api/jobs").json()["jobs"] == []


@pytest.mark.parametrize("body,reason", [
    (b'{"prompt": "caf\xe9"}', "it is not UTF-8 text (the byte 0xE9 at byte 16)"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "its arrays and objects nest deeper than the server reads"),
], ids=["latin-1 byte", "deep arrays"])
def test_the_routes_that_read_their_own_body_refuse_it_in_their_shape_with_its_reason(client, body, reason):
    """ComfyUI's /prompt, /queue, /history, /interrupt and OpenAI's JSON edit read their body themselves: a body nested
    past the reader's depth was a 500 (RecursionError) there; now their own refusal, with the reason."""
    headers = {"content-type": "application/json"}
    prompt = client.post("/prompt", content=body, headers=headers)
    assert prompt.status_code == 400 and prompt.json()["error"]["type"] == "invalid_prompt", prompt.text
    for route in ("/queue", "/history"):
        answer = client.post(route, content=body, headers=headers)
        assert answer.status_code == 400 and "the body is not JSON" in answer.text, (route, answer.text)
    assert client.post("/interrupt", content=body, headers=headers).status_code == 200   # ComfyUI's: no body needed
    edit = client.post("/v1/images/edits", content=body, headers=headers)
    assert edit.status_code == 400 and reason in edit.json()["error"]["message"], edit.text
    assert client.get("/api/jobs").json()["jobs"] == []


def _number_fields(model) -> dict[str, str]:
    """The fields of request model `model` that take an int or a float (alone, in a union or a tuple): name -> kind."""
    import typing

    def kinds(hint) -> set:
        if hint in (int, float):
            return {hint}
        return set().union(*(kinds(arg) for arg in typing.get_args(hint))) if typing.get_args(hint) else set()

    found = {}
    for name, info in model.model_fields.items():
        kind = kinds(info.annotation)
        if kind:
            found[name] = "int" if int in kind else "float"
    return found


TUPLE_FIELDS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                "negative_crops_coords_top_left", "negative_target_size")


def _number_cases(bad_int: tuple, bad_float: tuple) -> list:
    """(fields, where, value) for every int / float field of a job, its LoRAs, controls, IP-Adapters, FreeU and
    DeepCache settings: each value of `bad_int` for an int field, of `bad_float` for a float field."""
    from sdlab.server.native import ControlIn, DeepCacheIn, FreeUIn, IPAdapterIn, JobIn, LoraIn

    cases = []
    for name, kind in _number_fields(JobIn).items():
        for value in bad_int if kind == "int" else bad_float:
            if name in TUPLE_FIELDS:
                cases.append(({name: [value, 64]}, f"{name}.0", value))
            else:
                cases.append(({name: value}, name, value))
    lists = {LoraIn: ("loras", {"name": "x"}), ControlIn: ("controls", {"model": "x"}),
             IPAdapterIn: ("ip_adapters", {"model": "x"})}
    for model, (field, base) in lists.items():
        for name, kind in _number_fields(model).items():
            for value in bad_int if kind == "int" else bad_float:
                cases.append(({field: [{**base, name: value}]}, f"{field}.0.{name}", value))
    for model, field in ((FreeUIn, "freeu"), (DeepCacheIn, "deep_cache")):
        for name, kind in _number_fields(model).items():
            for value in bad_int if kind == "int" else bad_float:
                cases.append(({field: {name: value}}, f"{field}.{name}", value))
    return cases


def test_every_number_of_the_native_requests_refuses_true_fractions_and_non_finite(client):
    """Before, `{"steps": true}` drew 1 step, `{"cfg_scale": true}` scale 1: every int and float field of a job, its
    LoRAs, controls, IP-Adapters, FreeU and DeepCache settings is a 422 naming the field and the value for true, a
    fraction or a word where an int is wanted, true or a word where a float is."""
    cases = _number_cases((True, 7.5, "7.5"), (True, "many"))
    assert len(cases) > 120                             # the audit reached every number field
    for fields, where, bad in cases:
        answer = client.post("/api/jobs", json={"prompt": "a cat", "steps": 2, **fields})
        assert answer.status_code == 422, (fields, answer.text)
        assert answer.json()["detail"].startswith(where) and json.dumps(bad) in answer.json()["detail"], \
            (fields, answer.text)
    for raw in (b"NaN", b"Infinity", b"-Infinity", b'"nan"'):   # Python's JSON reader takes them; no number is one
        for field in (b'"cfg_scale": ', b'"steps": '):
            answer = client.post("/api/jobs", content=b'{"prompt": "a", ' + field + raw + b"}",
                                 headers={"content-type": "application/json"})
            assert answer.status_code == 422 and answer.json()["detail"].startswith(field[1:-3].decode()), \
                answer.text
            assert raw.decode() in answer.json()["detail"], answer.text
    assert client.get("/api/jobs").json()["jobs"] == []


def test_a_whole_float_is_its_integer_and_a_numbers_string_that_number():
    """JSON does not tell 20 from 20.0 and many clients (Python's json of a float, JavaScript's arithmetic) send
    20.0: every int field takes it as 20, as pydantic's lax mode does, and a string of a number ("20", "7.5") as
    that number; so a seed past JavaScript's exact integers comes as its digits from the web UI (app.js seedField).
    Before, 20.0 was a 422 for every int field (FreeU's version and DeepCache's interval too)."""
    from sdlab.server.native import JobIn

    for fields, where, value in _number_cases((20.0, "20", " 20 "), (7, "7.5")):
        body = JobIn.model_validate(fields)
        read = body
        for part in where.split("."):
            read = read[int(part)] if part.isdigit() else getattr(read, part)
        assert read == (20 if value in (20.0, "20", " 20 ") else float(value)), (fields, read)
        assert type(read) is (int if value in (20.0, "20", " 20 ") else float), (fields, read)


def test_numbers_of_their_kind_and_seed_digits_still_pass(client):
    """An int where a float is wanted is that float; a tuple is a JSON array; a seed past JavaScript's exact integers
    comes as its digits from the web UI (app.js seedField)."""
    from sdlab.server.native import JobIn

    body = JobIn.model_validate({"cfg_scale": 7, "seed": "18446744073709551615", "subseed": "-5", "hr_seed": 3,
                                 "original_size": [512, 768], "pag_layers": ["mid"], "loras": [{"name": "x",
                                                                                               "weight": 1}],
                                 "image_cfg_scale": " None"})
    assert (body.cfg_scale, body.seed, body.subseed, body.original_size) == (7.0, 2**64 - 1, -5, (512, 768))
    assert body.pag_layers == ("mid",) and body.loras[0].weight == 1.0 and body.image_cfg_scale == "none"
    for seed in ("12a", "1e3", " ", True, 1.5):
        answer = client.post("/api/jobs", json={"prompt": "a cat", "seed": seed})
        assert answer.status_code == 422 and answer.json()["detail"].startswith("seed: "), (seed, answer.text)


def test_true_false_fields_read_as_pydantic_lax_mode_reads_them(client):
    """The native request models are read in pydantic's lax mode (numbers refuse true / false by `JsonInt` /
    `JsonFloat` alone): a true / false field takes 1 / 0 and "true" / "false", "yes" / "no" as A1111's lax models
    do, and refuses another word or number naming the field. Before (strict models), "false" was a 422."""
    from sdlab.server.native import JobIn

    body = JobIn.model_validate({"tiling": "false", "invert_mask": 1, "mask_round": "no", "controls": [
        {"model": "x", "pixel_perfect": "true"}]})
    assert (body.tiling, body.invert_mask, body.mask_round, body.controls[0].pixel_perfect) == (False, True, False, True)
    for bad in ("maybe", 2):
        answer = client.post("/api/jobs", json={"prompt": "a cat", "tiling": bad})
        assert answer.status_code == 422 and answer.json()["detail"].startswith("tiling: "), (bad, answer.text)


@pytest.mark.parametrize("field, sent, read", [("resize_mode", "Crop", "crop"), ("resize_mode", " LATENT ", "latent"),
                                               ("inpaint_fill", "Latent  Noise", "latent noise"),
                                               ("inpaint_fill", "ORIGINAL", "original")])
def test_mode_words_are_read_in_any_case(field, sent, read):
    """The native API's mode words in any case and spacing, as its rng and sampler names."""
    from sdlab.server.native import JobIn

    assert getattr(JobIn(prompt="a cat", **{field: sent}), field) == read
