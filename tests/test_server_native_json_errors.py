"""Native API bodies refused before anything is queued: one that is not JSON (a shell's quoting cut it short, a
trailing comma) is a 422 that says so and where parsing stopped, not pydantic's location tuple (`10: JSON decode
error`); a picture the job's mode does not read (an init picture in txt2img, a mask outside inpaint) a 422 naming the
mode to send. In-process app; nothing is drawn."""

from __future__ import annotations

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
