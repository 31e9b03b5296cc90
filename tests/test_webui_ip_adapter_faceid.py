"""The web UI's IP-Adapter face embedding, in chromium: a .npy chosen with the box's file input goes out as the
native `face_embedding` (no picture for a FaceID adapter) and draws the picture a native job with the same numbers
draws; a file that is no .npy shows the server's 422; after Clear the adapter asks for a face embedding (a
picture or not); the Face shortcut box sends `face_shortcut` and Reuse of a FaceID Plus job fills it; an A1111
FaceID picture's module fills the module box."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from ip_adapter_fixtures import write_ip_adapter, write_shipped_model_ip_adapter
from server_fixtures import start_server
from test_ip_adapter_faceid_plus import _face, face_id_plus_state
from test_ip_adapter_layers import face_id_state
from test_webui import (  # noqa: F401  (fixtures: browser, page)
    By, browser, choose, drop_file, generate_and_finish, http_bytes, http_json, page, png_with_parameters, set_value,
    text, value, wait, wait_job,
)
from webui_ip_adapter_fixtures import drop_reference, reuse_job, sent_unit


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory):
    """A server whose ControlNet folder holds ip-adapter_tiny, a FaceID and a FaceID Plus v2 adapter for the
    shipped model (the 128-wide image encoder in models/image_encoder)."""
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    root = tmp_path_factory.mktemp("webui-faceid")
    models = write_shipped_model_ip_adapter(root / "models")
    bundle = sdlab.load().bundle
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    context = bundle.unet_config.context_dim
    write_ip_adapter(models / "ControlNet" / "ip-adapter-faceid_tiny.bin", face_id_state(widths, context))
    write_ip_adapter(models / "ControlNet" / "ip-adapter-faceid-plusv2_tiny.bin",
                     face_id_plus_state(widths, context, 128))
    server = start_server(root / "outputs", "--models-dir", str(models))
    yield server.url.rstrip("/")
    server.stop()


def _choose_adapter(page, stem: str) -> None:
    if not page.find_element(By.ID, "ipa_enabled").is_selected():
        page.find_element(By.ID, "ipa_enabled").click()
    wait(page, lambda d: d.execute_script("return document.getElementById('ipa_model').options.length > 1"), 30,
         "the IP-Adapter list did not load")
    titles = page.execute_script("return [...document.getElementById('ipa_model').options].map((o) => o.value)")
    choose(page, "ipa_model", value=next(title for title in titles if title.startswith(f"{stem} [")))


def _choose_face(page, path) -> None:
    page.find_element(By.ID, "ipa_face_file").send_keys(str(path))
    wait(page, lambda d: path.name in text(d, "ipa_face_name"), 10, "the chosen face embedding is not named")


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_a_face_embedding_file_is_sent_drawn_and_refused_when_bad(page, base_url, tmp_path):
    face = _face(7).numpy()                                                        # (1, 512)
    npy = tmp_path / "face.npy"
    np.save(npy, face)
    _choose_adapter(page, "ip-adapter-faceid_tiny")
    _choose_face(page, npy)
    sent = sent_unit(page)
    assert base64.b64decode(sent["face_embedding"]) == npy.read_bytes()
    assert "image" not in sent and "face_shortcut" not in sent       # FaceID reads no picture; no shortcut asked
    set_value(page, "prompt", "a face from its embedding")
    for name, number in (("steps", 3), ("width", 64), ("height", 64), ("seed", 5)):
        set_value(page, name, number)
    body = page.execute_script("return JSON.parse(JSON.stringify(collectRequest()))")
    job = generate_and_finish(page, base_url, "a face from its embedding")
    native = http_json(base_url, "/api/jobs", {**body, "ip_adapters": [
        {**body["ip_adapters"][0], "face_embedding": face[0].tolist()}]})
    done = wait_job(base_url, native["id"])
    assert done["status"] == "done", done
    drawn = http_bytes(base_url, job["images"][0])
    assert np.array_equal(_pixels(drawn), _pixels(http_bytes(base_url, done["images"][0])))
    assert job["request"]["ip_adapters"] == [{"model": "ip-adapter-faceid_tiny.bin", "scale": 1.0}]
    # a text file named .npy: the server's one line, shown
    bad = tmp_path / "bad.npy"
    bad.write_text("0.1 0.2 0.3\n")
    _choose_face(page, bad)
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: text(d, "error").startswith("422") and "is not a .npy file" in text(d, "error"), 30,
         "the server's refusal of the file is not shown")
    # Clear: no face embedding sent; the FaceID adapter then needs one, and says so
    page.find_element(By.ID, "ipa_face_clear").click()
    assert "No face embedding" in text(page, "ipa_face_name")
    with pytest.raises(Exception, match="IP-Adapter FaceID needs a face embedding: choose its .npy file"):
        sent_unit(page)
    drop_reference(page)                 # a picture is no face: still the face embedding asked for
    with pytest.raises(Exception, match="IP-Adapter FaceID needs a face embedding"):
        sent_unit(page)


def test_the_face_shortcut_box_sends_and_reuse_fills_it(page, base_url, tmp_path):
    face = _face(3).numpy()
    npy = tmp_path / "plus.npy"
    np.save(npy, face)
    _choose_adapter(page, "ip-adapter-faceid-plusv2_tiny")
    drop_reference(page)
    _choose_face(page, npy)
    sent = sent_unit(page)
    assert "face_shortcut" not in sent and "image" in sent and "face_embedding" in sent
    set_value(page, "ipa_face_shortcut", "1.6")
    assert sent_unit(page)["face_shortcut"] == 1.6
    # a FaceID Plus job with a shortcut: Reuse fills the box (the job holds no face embedding, as no picture)
    job = http_json(base_url, "/api/jobs", {"prompt": "plus", "steps": 2, "width": 64, "height": 64, "ip_adapters": [
        {"model": "ip-adapter-faceid-plusv2_tiny", "image": sent["image"], "face_embedding": face.tolist(),
         "face_shortcut": 0.4}]})
    done = wait_job(base_url, job["id"])
    assert done["status"] == "done", done
    reuse_job(page, base_url, job["id"])
    wait(page, lambda d: value(d, "ipa_face_shortcut") == "0.4", 20, "Reuse did not fill the Face shortcut")
    assert value(page, "ipa_model").startswith("ip-adapter-faceid-plusv2_tiny [")


@pytest.mark.parametrize("module, stem", [("ip-adapter_face_id", "ip-adapter-faceid_tiny"),
                                          ("ip-adapter_face_id_plus", "ip-adapter-faceid-plusv2_tiny")])
def test_an_a1111_face_id_pictures_module_fills_the_module_box(page, base_url, module, stem):
    """A picture an A1111 FaceID unit drew (its `ControlNet 0` line names the module): the module box, which lists
    the IP-Adapter type's modules of /controlnet/module_list, offers the FaceID module and Reuse of the picture
    chooses it, with the adapter; the page sends it as the entry's `module`."""
    line = f'"Module: {module}, Model: {stem}, Weight: 0.7, Guidance Start: 0, Guidance End: 1"'
    wait(page, lambda d: d.execute_script("return document.getElementById('ipa_module').options.length > 1"), 30,
         "the module list did not load")
    assert module in page.execute_script("return [...document.getElementById('ipa_module').options].map((o) => o.value)")
    drop_file(page, png_with_parameters(f"a face\nSteps: 2, Seed: 1, Size: 64x64, ControlNet 0: {line}"), "face.png")
    wait(page, lambda d: value(d, "ipa_scale") == "0.7", 20, "the picture's unit line is not read")
    assert value(page, "ipa_module") == module and value(page, "ipa_model").startswith(f"{stem} [")
