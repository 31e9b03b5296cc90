"""Step previews on ComfyUI's /ws socket: a prompt whose `extra_data.preview_method` asks for them (ComfyUI's
execution.py ``set_preview_method``: auto, latent2rgb, taesd) gets after each `progress` message one binary frame as
ComfyUI's server.py sends it, the bytes of the transcription below of its ``send_image`` / ``encode_bytes`` applied to
the preview sdlab drew at that step (server/previews.py); a prompt that does not ask gets none, as from ComfyUI
started without --preview-method."""

from __future__ import annotations

import io
import json
import struct
import threading
import time

import pytest
from PIL import Image, ImageOps

from sdlab.server import comfy_api, previews
from test_server_comfy_api import graph, server  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- ComfyUI, transcribed ----------------------------------------------------------------------------------------
def comfyui_preview_message(preview_image: Image.Image, max_size: int = 512) -> bytes:
    """comfyanonymous/ComfyUI server.py ``PromptServer.send_image`` then ``encode_bytes`` for latent_preview.py's
    ("JPEG", image, MAX_PREVIEW_RESOLUTION 512): BinaryEventTypes.PREVIEW_IMAGE 1, image type 1 (JPEG)."""
    image_type, image = "JPEG", preview_image
    if max_size is not None:
        image = ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)
    type_num = 1
    if image_type == "JPEG":
        type_num = 1
    elif image_type == "PNG":
        type_num = 2
    bytes_io = io.BytesIO()
    header = struct.pack(">I", type_num)
    bytes_io.write(header)
    image.save(bytes_io, format=image_type, quality=95, compress_level=1)
    preview_bytes = bytes_io.getvalue()
    message = bytearray(struct.pack(">I", 1))          # encode_bytes(BinaryEventTypes.PREVIEW_IMAGE, ...)
    message.extend(preview_bytes)
    return bytes(message)


def _followed(client, extra_data: dict | None) -> tuple[list[tuple[str, object]], str]:
    """Queue the basic graph for client "viewer" with `extra_data`; its socket's frames until the prompt's end, each
    (type, data) for a JSON message and ("bytes", data) for a binary one."""
    with client.websocket_connect("/ws?clientId=viewer") as socket:
        socket.receive_json()                                                   # status
        body = {"prompt": graph(), "client_id": "viewer", **({} if extra_data is None else {"extra_data": extra_data})}
        answer = client.post("/prompt", json=body)
        assert answer.status_code == 200, answer.text
        prompt_id = answer.json()["prompt_id"]
        frames: list[tuple[str, object]] = []
        while True:
            message = socket.receive()
            if message.get("bytes") is not None:
                frames.append(("bytes", message["bytes"]))
                continue
            data = json.loads(message["text"])
            frames.append((data["type"], data["data"]))
            if data["type"] == "executing" and data["data"]["node"] is None and \
                    data["data"].get("prompt_id") == prompt_id:
                return frames, prompt_id


@pytest.mark.parametrize("method", ["auto", "latent2rgb", "taesd"])
def test_a_prompt_asking_for_previews_gets_comfyuis_binary_frames(server, monkeypatch, method):
    drawn: list = []
    real_rgb = previews.LatentPreviewer.rgb
    monkeypatch.setattr(previews.LatentPreviewer, "rgb",
                        lambda self, latent: drawn.append(real_rgb(self, latent)) or drawn[-1])
    frames, _ = _followed(server, {"preview_method": method})
    kinds = [kind for kind, _ in frames]
    progress_at = [i for i, kind in enumerate(kinds) if kind == "progress"]
    assert len(progress_at) == 3 and len(drawn) == 3                            # the graph's 3 steps
    assert [kinds[i + 1] for i in progress_at] == ["bytes"] * 3                 # each progress, then its preview
    assert kinds.count("bytes") == 3
    for at, rgb in zip(progress_at, drawn):
        message = frames[at + 1][1]
        assert message[:8] == struct.pack(">II", 1, 1)
        assert message == comfyui_preview_message(Image.fromarray(rgb.numpy(), "RGB"))
        assert max(Image.open(io.BytesIO(message[8:])).size) == 512             # the latent-sized preview scaled up


@pytest.mark.parametrize("extra_data", [None, {}, {"preview_method": "none"}, {"preview_method": "default"}])
def test_a_prompt_not_asking_for_previews_gets_no_binary_frame(server, extra_data):
    frames, _ = _followed(server, extra_data)
    kinds = [kind for kind, _ in frames]
    assert "bytes" not in kinds and kinds.count("progress") == 3


def _finished(client, prompt_id: str) -> dict:
    deadline = time.monotonic() + 60
    while (entry := client.get(f"/history/{prompt_id}").json().get(prompt_id)) is None:
        assert time.monotonic() < deadline, "the prompt did not end"
        time.sleep(0.02)
    return entry


def test_no_frame_is_encoded_where_no_socket_gets_it(server, monkeypatch):
    """A prompt asking for previews whose client never connected, one without client_id while no socket is open, and
    one whose client closed its socket before the first step: the previews are drawn (the job asked for them) but no
    JPEG frame is encoded, as none would be sent; a client connected meanwhile gets its frames as before."""
    encoded, drawn, entered, go_on = [], [], threading.Event(), threading.Event()
    real_frame, real_rgb = comfy_api.preview_frame, previews.LatentPreviewer.rgb
    monkeypatch.setattr(comfy_api, "preview_frame", lambda rgb: encoded.append(rgb) or real_frame(rgb))

    def rgb(self, latent):
        entered.set()
        assert go_on.wait(60)
        drawn.append(real_rgb(self, latent))
        return drawn[-1]

    monkeypatch.setattr(previews.LatentPreviewer, "rgb", rgb)
    go_on.set()
    for extra in ({"client_id": "nobody"}, {}):
        answer = server.post("/prompt", json={"prompt": graph(), "extra_data": {"preview_method": "taesd"}, **extra})
        assert answer.status_code == 200, answer.text
        assert _finished(server, answer.json()["prompt_id"])["status"]["status_str"] == "success"
        assert len(drawn) == 3 and encoded == []
        drawn.clear()
    go_on.clear()
    entered.clear()
    with server.websocket_connect("/ws?clientId=closer") as socket:
        socket.receive_json()
        answer = server.post("/prompt", json={"prompt": graph(), "client_id": "closer",
                                              "extra_data": {"preview_method": "auto"}})
        assert entered.wait(60)                         # the first step's preview, held
    deadline = time.monotonic() + 60
    while "closer" in server.app.state.comfy.sockets:   # the server saw the socket close
        assert time.monotonic() < deadline
        time.sleep(0.02)
    go_on.set()
    assert _finished(server, answer.json()["prompt_id"])["status"]["status_str"] == "success"
    assert len(drawn) == 3 and encoded == []
    frames, _ = _followed(server, {"preview_method": "latent2rgb"})
    assert [kind for kind, _ in frames].count("bytes") == 3 and len(encoded) == 3
