"""A native API body that is not JSON (a shell's quoting cut it short, a trailing comma) is a 422 that says so and
where parsing stopped, not pydantic's location tuple (`10: JSON decode error`). In-process app; nothing is drawn."""

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
