"""A1111's API runs the script `script_name` names among those `GET /sdapi/v1/scripts` lists
(modules/api/api.py `get_selectable_script`: an empty name is none; `script_name_to_index` answers
`HTTPException(422, "Script '<name>' not found")` for a name it does not list). sdlab lists none, so a named
script is that 422, before anything is drawn, not one ordinary picture."""

from __future__ import annotations

import httpx
import pytest

from server_fixtures import sdlab_server  # noqa: F401  (a session fixture)


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=120) as c:
        yield c


@pytest.mark.parametrize("route", ["txt2img", "img2img"])
@pytest.mark.parametrize("name", ["x/y/z plot", "X/Y/Z plot", "no such script"])
def test_a_script_it_does_not_list_is_a1111s_422(client, route: str, name: str) -> None:
    assert client.get("/scripts").json() == {"txt2img": [], "img2img": []}
    body = {"prompt": "a cat", "steps": 1, "script_name": name, "script_args": [4, "1,2", [], 6, "1,3", []]}
    if route == "img2img":
        body["init_images"] = ["not even a picture: the script is looked up first"]
    answer = client.post(f"/{route}", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"] == f"Script '{name}' not found"


@pytest.mark.parametrize("name", [None, ""])
def test_no_script_draws_the_picture(client, name) -> None:
    answer = client.post("/txt2img", json={"prompt": "a cat", "steps": 1, "seed": 1, "script_name": name,
                                          "script_args": []})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 1
