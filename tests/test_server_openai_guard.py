"""The guard's refusals under OpenAI's images API (`/v1/`): a wrong API key's 401 and a body past --max-body-mb's
413 answer in OpenAI's error shape `{"error": {message, type, param, code}}`, streamed requests too, as the
`openai` package reads them (its `code`, `invalid_api_key` for a key); the other routes keep `{"detail": ...}`.
In-process app (TestClient), no model loaded: the guard answers before any route."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

from sdlab.server.app import create_app
from sdlab.server.config import Limits, ServerConfig
from sdlab.server.guard import too_large

MAX_BODY = 2000


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    """The app with --auth me:s3cret and a body limit of 2000 bytes; its lifespan is not run (no model loads)."""
    config = ServerConfig(output_dir=tmp_path_factory.mktemp("guard") / "outputs", basic_auth=("me", "s3cret"),
                          limits=Limits(max_body_bytes=MAX_BODY))
    return TestClient(create_app(config))


def openai_client(http: TestClient, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=http, max_retries=0)


def openai_error(message: str, code: str | None = None) -> dict:
    return {"message": message, "type": "invalid_request_error", "param": None, "code": code}


@pytest.mark.parametrize("stream", [False, True])
def test_a_wrong_api_key_is_openais_401(http, stream):
    with pytest.raises(openai.AuthenticationError) as refused:
        openai_client(http, "me:wrong").images.generate(prompt="a key", stream=stream)
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    assert refused.value.body == openai_error("Not authenticated", "invalid_api_key")
    assert refused.value.response.headers["www-authenticate"] == 'Basic realm="sdlab"'
    with pytest.raises(openai.AuthenticationError):
        openai_client(http, "me:wrong").models.list()


@pytest.mark.parametrize("stream", [False, True])
def test_a_body_past_the_limit_is_openais_413(http, stream):
    with pytest.raises(openai.APIStatusError) as refused:
        openai_client(http, "me:s3cret").images.generate(prompt="x" * MAX_BODY, stream=stream)
    assert refused.value.status_code == 413
    assert refused.value.body == openai_error(too_large(MAX_BODY))


def test_a_streamed_body_past_the_limit_is_openais_413(http):
    """A body without Content-Length (chunked), read by the guard up to the limit."""
    def chunks():
        yield b'{"prompt": "'
        for _ in range(3):
            yield b"y" * 1000
        yield b'", "stream": true}'

    answer = http.post("/v1/images/generations", content=chunks(),
                       headers={"authorization": "Bearer me:s3cret", "content-type": "application/json"})
    assert answer.status_code == 413
    assert answer.json() == {"error": openai_error(too_large(MAX_BODY))}


def test_the_other_routes_keep_their_refusal_shape(http):
    assert http.get("/api/jobs").json() == {"detail": "Not authenticated"}
    assert http.get("/sdapi/v1/options").json() == {"detail": "Not authenticated"}
    answer = http.post("/api/jobs", json={"prompt": "x" * MAX_BODY}, auth=("me", "s3cret"))
    assert answer.status_code == 413 and answer.json() == {"detail": too_large(MAX_BODY)}
    answer = http.post("/sdapi/v1/txt2img", json={"prompt": "x" * MAX_BODY}, auth=("me", "s3cret"))
    assert answer.status_code == 413 and answer.json() == {"detail": too_large(MAX_BODY)}
