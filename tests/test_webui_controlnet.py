"""The web UI's ControlNet units and IP-Adapter box in a real headless browser (the helpers of test_webui.py), on a
server whose ControlNet folder holds a random-weight ControlNet and IP-Adapter (its image encoder in
models/image_encoder): a unit sends the native `controls` entry and the job records and draws it; Preview shows the
preprocessed map; the IP-Adapter box sends `ip_adapters`; Reuse and a dropped PNG restore the units; a bad unit's
error shows in the page's error box."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlnet_fixtures import diffusers_controlnet, write_layout
from ip_adapter_fixtures import SAMPLE_PICTURE, ip_adapter_state, write_image_encoder, write_ip_adapter
from server_fixtures import start_server
from test_webui import (  # noqa: F401  (fixtures: browser, page)
    By, click_card_button, Keys, choose, option_values, browser, drop_file, http_bytes, job_by_prompt, open_page, page,
    paint_stroke, png_with_parameters, set_value, severe_console_errors, text, value, wait, wait_job,
)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory):
    """A server with tiny_canny.safetensors and ip-adapter_tiny.safetensors in its ControlNet folder."""
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    root = tmp_path_factory.mktemp("webui-controlnet")
    models = root / "models"
    (models / "ControlNet").mkdir(parents=True)
    bundle = sdlab.load().bundle                    # the shipped model the server draws with
    widths = (16, 32, 96, 256)[: bundle.vae_config.downsample_factor.bit_length()]
    net = write_layout(diffusers_controlnet(bundle.unet_config, 3, hint_widths=widths, std=0.05),
                       "diffusers-file", models / "ControlNet")
    net.rename(models / "ControlNet" / "tiny_canny.safetensors")
    write_image_encoder(models / "image_encoder", seed=2, projection=32)
    attention_widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    write_ip_adapter(models / "ControlNet" / "ip-adapter_tiny.safetensors",
                     ip_adapter_state(attention_widths, bundle.unet_config.context_dim, 32, seed=3, std=0.3))
    server = start_server(root / "outputs", "--models-dir", str(models))
    yield server.url.rstrip("/")
    server.stop()


def _hint_png() -> bytes:
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).rectangle([10, 10, 50, 50], outline="white", width=4)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _reference_png() -> bytes:
    buffer = io.BytesIO()
    Image.open(SAMPLE_PICTURE).convert("RGB").crop((0, 0, 200, 160)).save(buffer, "PNG")
    return buffer.getvalue()


def _lists_loaded(driver) -> bool:
    return driver.execute_script("return document.getElementById('cn0_model').options.length > 1 && "
                                 "document.getElementById('cn0_module').options.length > 1")


def _model_title(driver, stem: str, select_id: str = "cn0_model") -> str:
    titles = driver.execute_script("return [...document.getElementById(arguments[0]).options].map((o) => o.value)",
                                   select_id)
    return next(title for title in titles if title.startswith(stem + " ["))


def _shown_picture(driver, element_id: str) -> np.ndarray:
    """The RGB pixels of the data URL picture an <img> shows."""
    shown = driver.execute_script("return document.getElementById(arguments[0]).src", element_id)
    assert shown.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(shown.split(",", 1)[1]))).convert("RGB"))


def _checked(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_selected()


def _generate(driver, base: str, prompt: str) -> dict:
    set_value(driver, "prompt", prompt)
    set_value(driver, "steps", 2)
    set_value(driver, "width", 64)
    set_value(driver, "height", 64)
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: any(job["request"].get("prompt") == prompt for job in
                               __import__("test_webui").http_json(base, "/api/jobs")["jobs"]), 30, "no job queued")
    return wait_job(base, job_by_prompt(base, prompt)["id"])


def _restore(driver, base: str, job: dict, how: str) -> None:
    """In a fresh page, fill the form from a drawn `job`: its gallery card's Reuse (`how` "reuse") or its
    picture dropped on the page ("png", as drawn.png)."""
    open_page(driver, base)
    wait(driver, _lists_loaded, 30, "the ControlNet lists did not load")
    if how == "reuse":
        card = f'#gallery [data-job-id="{job["id"]}"]'
        click_card_button(driver, card, "reuse")
    else:
        drop_file(driver, http_bytes(base, job["images"][0]), "drawn.png")


def _set_canny_unit(driver) -> str:
    """Unit 0: enabled, the hint dropped on it, canny, tiny_canny, weight 0.8, start 0.1, Control mode "My prompt is
    more important", Crop and Resize (the default); returns the model's title."""
    wait(driver, _lists_loaded, 30, "the ControlNet lists did not load")
    driver.find_element(By.ID, "cn0_enabled").click()
    drop_file(driver, _hint_png(), "hint.png", "cn0_drop")
    wait(driver, lambda d: d.find_element(By.ID, "cn0_view").is_displayed(), 10, "the dropped hint is not shown")
    choose(driver, "cn0_module", value="canny")
    title = _model_title(driver, "tiny_canny")
    choose(driver, "cn0_model", value=title)
    set_value(driver, "cn0_weight", 0.8)
    set_value(driver, "cn0_start", 0.1)
    choose(driver, "cn0_control_mode", value="prompt")
    return title


def test_the_page_lists_the_folder_and_knows_the_preprocessors_resolution(page, base_url):
    from sdlab.pipeline.preprocess import RESOLUTION_MODULES

    wait(page, _lists_loaded, 30, "the ControlNet lists did not load")
    titles = page.execute_script("return [...document.getElementById('cn0_model').options].map((o) => o.value)")
    assert titles[0] == "" and [t.split(" [")[0] for t in titles[1:]] == ["tiny_canny"]     # the IP-Adapter's own list
    assert page.execute_script("return RESOLUTION_MODULES") == list(RESOLUTION_MODULES)
    assert [page.find_element(By.ID, f"cn{i}").tag_name for i in range(3)] == ["details"] * 3
    # canny shows its Processor res and its two thresholds with the extension's names and defaults; none hides them
    choose(page, "cn0_module", value="canny")
    assert text(page, "cn0_threshold_a_label") == "Canny Low Threshold" and value(page, "cn0_threshold_a") == "100"
    assert value(page, "cn0_threshold_b") == "200" and page.find_element(By.ID, "cn0_res_box").is_displayed()
    choose(page, "cn0_module", value="none")
    assert not page.find_element(By.ID, "cn0_threshold_a_box").is_displayed()
    assert "controls" not in page.execute_script("return collectRequest()")


def test_the_model_picker_does_not_offer_the_ip_adapters_image_encoder(page, base_url):
    """models/image_encoder (the IP-Adapter's, where the adapters of ControlNet/ find it) is no checkpoint: the
    Model list offered it and a job drawn with it failed to load. Before: 'image_encoder/model.safetensors' listed."""
    assert [title.split(" [")[0] for title in option_values(page, "model", "text")] == ["sdlab-tiny.safetensors"]


def test_the_keyboard_reaches_the_picture_pickers_and_each_is_named(page, base_url, tmp_path):
    wait(page, _lists_loaded, 30, "the ControlNet lists did not load")
    page.find_element(By.ID, "cn0_enabled").send_keys(Keys.TAB)     # Enable, then the unit's file picker
    assert page.switch_to.active_element.get_attribute("id") == "cn0_file"
    assert page.find_element(By.ID, "cn0_file").accessible_name == "ControlNet Unit 0: choose a picture"
    assert page.find_element(By.ID, "cn0_enabled").accessible_name == "Enable ControlNet Unit 0"
    page.find_element(By.ID, "ipa_enabled").click()
    assert page.find_element(By.ID, "ipa_clear").accessible_name == "Clear the picture of IP-Adapter"
    # a file chosen with the picker is the unit's picture and ticks its Enable, as the extension's upload does;
    # Clear takes the picture away and leaves Enable
    (tmp_path / "hint.png").write_bytes(_hint_png())
    assert not _checked(page, "cn0_enabled")
    page.find_element(By.ID, "cn0_file").send_keys(str(tmp_path / "hint.png"))
    wait(page, lambda d: d.find_element(By.ID, "cn0_view").is_displayed(), 10, "the chosen hint is not shown")
    assert page.execute_script("return controlState.pictures[0]").endswith(base64.b64encode(_hint_png()).decode())
    assert _checked(page, "cn0_enabled")
    page.find_element(By.ID, "cn0_clear").click()
    assert page.execute_script("return controlState.pictures[0]") is None and _checked(page, "cn0_enabled")
    # a picture dropped on a unit ticks it too; one the browser cannot read is the page's error and ticks nothing
    page.find_element(By.ID, "cn1_summary").click()
    drop_file(page, b"not a picture", "broken.png", "cn1_drop")
    wait(page, lambda d: text(d, "error") == "the file is not an image the browser can read", 10, "no error")
    assert not _checked(page, "cn1_enabled")
    drop_file(page, _hint_png(), "hint.png", "cn1_drop")
    wait(page, lambda d: _checked(d, "cn1_enabled"), 10, "the dropped hint does not enable unit 1")
    assert not page.find_element(By.ID, "error").is_displayed()         # the broken picture's error is over
    # an enabled unit's title says so and names its preprocessor, folded too; the picture is named
    choose(page, "cn1_module", value="canny")
    page.find_element(By.ID, "cn1_summary").click()
    assert text(page, "cn1_summary") == "ControlNet Unit 1 (enabled: canny)"
    page.find_element(By.ID, "cn0_enabled").click()
    assert text(page, "cn0_summary") == "ControlNet Unit 0"
    assert page.find_element(By.ID, "cn1_view").get_attribute("alt") == "The picture of ControlNet Unit 1"
    assert severe_console_errors(page) == []


def test_a_unit_draws_the_job_records_it_and_reuse_and_its_png_restore_it(page, base_url):
    title = _set_canny_unit(page)
    job = _generate(page, base_url, "a web controlnet house")
    assert job["status"] == "done", job
    unit = job["request"]["controls"][0]
    assert len(job["request"]["controls"]) == 1
    assert {key: unit[key] for key in ("model", "module", "strength", "start", "end", "control_mode", "resize_mode",
                                       "threshold_a", "threshold_b", "processor_res", "pixel_perfect")} == {
        "model": "tiny_canny.safetensors", "module": "canny", "strength": 0.8, "start": 0.1, "end": 1.0,
        "control_mode": "prompt", "resize_mode": "crop", "threshold_a": 100.0, "threshold_b": 200.0,
        "processor_res": 512, "pixel_perfect": False}
    assert 'ControlNet 0: "Module: canny, Model: tiny_canny [' in job["infotexts"][0]
    # Reuse in a fresh page: unit 0 enabled and filled; the picture is the page's to give again
    for restore in ("reuse", "png"):
        _restore(page, base_url, job, restore)
        wait(page, lambda d: _checked(d, "cn0_enabled"), 20, f"{restore}: unit 0 is not enabled")
        assert text(page, "notice") in ("", "Settings read from drawn.png"), text(page, "notice")
        assert [value(page, f"cn0_{key}") for key in ("model", "module", "weight", "start", "end", "control_mode",
                                                     "resize_mode", "threshold_a", "threshold_b", "processor_res")] == [
            title, "canny", "0.8", "0.1", "1", "prompt", "crop", "100", "200", "512"], restore
        assert not _checked(page, "cn1_enabled") and not _checked(page, "ipa_enabled")
        # no picture: txt2img's unit asks for one in the error box, nothing is sent
        page.find_element(By.ID, "generate").click()
        wait(page, lambda d: "ControlNet Unit 0 needs a picture" in text(d, "error"), 10, "no error for the picture")
    # with a picture again the request is the job's unit
    drop_file(page, _hint_png(), "hint.png", "cn0_drop")
    wait(page, lambda d: d.find_element(By.ID, "cn0_view").is_displayed(), 10, "the dropped hint is not shown")
    sent = page.execute_script("return collectRequest()")["controls"][0]
    assert {key: sent[key] for key in ("module", "strength", "start", "control_mode", "threshold_a")} == {
        "module": "canny", "strength": 0.8, "start": 0.1, "control_mode": "prompt", "threshold_a": 100}
    assert sent["image"] == base64.b64encode(_hint_png()).decode()


UNIT_FIELDS = ("module", "weight", "start", "end", "control_mode", "resize_mode", "threshold_a", "threshold_b",
               "processor_res")
"""A unit's boxes and selects besides its model (cnN_NAME)."""


def _fill_unit(driver, i: int, settings: dict) -> None:
    """Unit i enabled with the hint dropped on it, tiny_canny and `settings` (UNIT_FIELDS' names and
    pixel_perfect)."""
    if not driver.find_element(By.ID, f"cn{i}_enabled").is_displayed():
        driver.find_element(By.ID, f"cn{i}_summary").click()
    driver.find_element(By.ID, f"cn{i}_enabled").click()
    drop_file(driver, _hint_png(), "hint.png", f"cn{i}_drop")
    choose(driver, f"cn{i}_module", value=settings["module"])
    choose(driver, f"cn{i}_model", value=_model_title(driver, "tiny_canny"))
    for key, chosen in settings.items():
        if key in ("control_mode", "resize_mode"):
            choose(driver, f"cn{i}_{key}", value=chosen)
        elif key == "pixel_perfect":
            if _checked(driver, f"cn{i}_pixel_perfect") != chosen:
                driver.find_element(By.ID, f"cn{i}_pixel_perfect").click()
        elif key != "module":
            set_value(driver, f"cn{i}_{key}", chosen)


def _unit_shown(driver, i: int) -> dict:
    """Unit i's enable box, model, UNIT_FIELDS and Pixel perfect as the page shows them."""
    return {"enabled": _checked(driver, f"cn{i}_enabled"), "model": value(driver, f"cn{i}_model"),
            **{key: value(driver, f"cn{i}_{key}") for key in UNIT_FIELDS},
            "pixel_perfect": _checked(driver, f"cn{i}_pixel_perfect")}


def test_reuse_and_the_png_restore_every_field_of_three_units_and_the_ip_adapter(page, base_url):
    """Three units whose every field is other than its default, and the IP-Adapter: the job draws them, and Reuse
    and the drawn PNG give each box back; a PNG with one unit leaves units 1, 2 and the IP-Adapter unticked, and
    the boxes its line does not name (Processor Res, Resize Mode) take the extension's defaults."""
    wait(page, _lists_loaded, 30, "the ControlNet lists did not load")
    units = [
        {"module": "threshold", "weight": "0.6", "start": "0.2", "end": "0.7", "control_mode": "control",
         "resize_mode": "fill", "threshold_a": "80", "processor_res": "256", "pixel_perfect": False},
        {"module": "canny", "weight": "1.25", "start": "0", "end": "0.9", "control_mode": "balanced",
         "resize_mode": "resize", "threshold_a": "60", "threshold_b": "150", "pixel_perfect": True},
        {"module": "tile_resample", "weight": "0.5", "start": "0.3", "end": "1", "control_mode": "prompt",
         "resize_mode": "crop", "threshold_a": "2", "pixel_perfect": False},
    ]
    for i, settings in enumerate(units):
        _fill_unit(page, i, settings)
    page.find_element(By.ID, "ipa_enabled").click()
    choose(page, "ipa_model", value=_model_title(page, "ip-adapter_tiny", "ipa_model"))
    set_value(page, "ipa_scale", 0.4)
    drop_file(page, _reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    expected = [_unit_shown(page, i) for i in range(3)]
    job = _generate(page, base_url, "three web units")
    assert job["status"] == "done", job
    assert [unit["module"] for unit in job["request"]["controls"]] == ["threshold", "canny", "tile_resample"]
    for restore in ("reuse", "png"):
        _restore(page, base_url, job, restore)
        wait(page, lambda d: _checked(d, "cn2_enabled") and _checked(d, "ipa_enabled"), 20, f"{restore}: not filled")
        for i in range(3):
            # units 1 (Pixel perfect) and 2 (tile_resample, which has none) send no Processor res: the job records
            # null, which Reuse shows as an empty box (the preprocessor's default); their PNG lines name 512
            nulls = {"processor_res": ""} if restore == "reuse" and i > 0 else {}
            assert _unit_shown(page, i) == {**expected[i], **nulls}, (restore, i)
        assert (value(page, "ipa_model"), value(page, "ipa_scale")) == (_model_title(page, "ip-adapter_tiny", "ipa_model"),
                                                                         "0.4"), restore
    # a PNG naming one unit, its line without Processor Res or Resize Mode (an older extension's)
    set_value(page, "cn0_processor_res", 768)
    choose(page, "cn0_resize_mode", value="fill")
    line = 'ControlNet 0: "Module: canny, Model: tiny_canny, Weight: 0.9, Guidance Start: 0, Guidance End: 1"'
    drop_file(page, png_with_parameters(f"a cat\nSteps: 2, Seed: 1, Size: 64x64, {line}"), "one-unit.png")
    wait(page, lambda d: not _checked(d, "cn1_enabled"), 20, "unit 1 is still ticked")
    assert [text(page, f"cn{i}_summary") for i in range(3)] == ["ControlNet Unit 0 (enabled: canny)",
                                                                "ControlNet Unit 1", "ControlNet Unit 2"]
    assert _unit_shown(page, 0) == {**expected[1], "weight": "0.9", "end": "1", "threshold_a": "100",
                                    "threshold_b": "200", "resize_mode": "crop", "processor_res": "512",
                                    "pixel_perfect": False}
    assert not _checked(page, "cn2_enabled") and not _checked(page, "ipa_enabled")
    assert severe_console_errors(page) == []


def test_img2img_unit_takes_the_initial_image_and_bad_units_show_their_errors(page, base_url):
    _set_canny_unit(page)
    page.find_element(By.ID, "cn0_clear").click()
    page.find_element(By.CSS_SELECTOR, '[role="tab"][data-mode="img2img"]').click()
    drop_file(page, _hint_png(), "init.png", "init-drop")
    wait(page, lambda d: d.execute_script("return state.initImage") is not None, 10, "no initial image")
    # the IP-Adapter box without a picture of its own takes the initial image too
    page.find_element(By.ID, "ipa_enabled").click()
    choose(page, "ipa_model", value=_model_title(page, "ip-adapter_tiny", "ipa_model"))
    sent = page.execute_script("return collectRequest()")
    # no picture sent: the server takes each request's initial image, a unit's with img2img's mode (the
    # extension's rule), a script's passes / tiles too; the unit's own Resize mode is sent to be recorded, as the
    # extension's infotext records its unit's
    assert "image" not in sent["controls"][0] and sent["controls"][0]["resize_mode"] == "crop"
    assert "image" not in sent["ip_adapters"][0] and sent["ip_adapters"][0]["model"].startswith("ip-adapter_tiny [")
    assert not page.find_element(By.ID, "cn0_resize_mode").is_enabled()    # it does not act: greyed out
    page.find_element(By.CSS_SELECTOR, '[role="tab"][data-mode="txt2img"]').click()
    page.find_element(By.ID, "cn0_enabled").click()
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: "IP-Adapter needs a picture" in text(d, "error"), 10, "no error for the IP-Adapter")
    page.find_element(By.ID, "cn0_enabled").click()
    page.find_element(By.CSS_SELECTOR, '[role="tab"][data-mode="img2img"]').click()
    page.find_element(By.ID, "ipa_enabled").click()
    # the inpaint tab's unit takes its initial image too, with its resize mode
    page.find_element(By.CSS_SELECTOR, '[role="tab"][data-mode="inpaint"]').click()
    choose(page, "resize_mode", value="fill")
    paint_stroke(page, -20, 20)
    sent = page.execute_script("return collectRequest()")
    assert sent["mode"] == "inpaint" and "image" not in sent["controls"][0] and sent["resize_mode"] == "fill"
    assert sent["controls"][0]["resize_mode"] == "crop"
    page.find_element(By.CSS_SELECTOR, '[role="tab"][data-mode="img2img"]').click()
    # an enabled unit without a model: the page's own error (units past the first start folded)
    assert not page.find_element(By.ID, "cn1_enabled").is_displayed()
    page.find_element(By.ID, "cn1_summary").click()
    page.find_element(By.ID, "cn1_enabled").click()
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: "ControlNet Unit 1 needs a model" in text(d, "error"), 10, "no error for the model")
    page.find_element(By.ID, "cn1_enabled").click()
    # a unit the server refuses (start after end): its 422 in the error box, no job queued
    set_value(page, "cn0_start", 0.9)
    set_value(page, "cn0_end", 0.2)
    set_value(page, "prompt", "a refused unit")
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: text(d, "error").startswith("422") and "control 0" in text(d, "error"), 20,
         "the server's error is not shown")
    # a picture of its own: the unit's Resize mode counts again; in txt2img it always does
    drop_file(page, _hint_png(), "hint.png", "cn0_drop")
    wait(page, lambda d: d.find_element(By.ID, "cn0_resize_mode").is_enabled(), 10, "Resize mode still greyed out")
    page.find_element(By.ID, "cn0_clear").click()
    assert not page.find_element(By.ID, "cn0_resize_mode").is_enabled()
    page.find_element(By.CSS_SELECTOR, '[role="tab"][data-mode="txt2img"]').click()
    assert page.find_element(By.ID, "cn0_resize_mode").is_enabled()


def test_a_units_number_boxes_are_read_as_the_forms(page, base_url):
    """An emptied box is left out of the unit (the server's default), as the form's own boxes; text that is not a
    number is the page's error naming the unit and the box, and Processor res must be a whole number."""
    _set_canny_unit(page)
    page.find_element(By.ID, "cn0_weight").clear()
    sent = page.execute_script("return JSON.parse(JSON.stringify(collectRequest()))")["controls"][0]
    assert "strength" not in sent and sent["start"] == 0.1          # the server's strength: 1, not 0
    page.find_element(By.ID, "cn0_weight").send_keys("1e")           # a number box's bad input reads as ""
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: text(d, "error") == "ControlNet Unit 0: Control weight: the text typed is not a number", 10,
         "no error for the weight")
    set_value(page, "cn0_weight", 0.8)
    set_value(page, "cn0_processor_res", "512.5")
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: text(d, "error") == 'ControlNet Unit 0: Processor res: "512.5" is not a whole number', 10,
         "no error for the processor resolution")


def test_preview_shows_the_preprocessed_map(page, base_url):
    from sdlab.pipeline.preprocess import pixel_perfect_resolution, preprocess

    _set_canny_unit(page)
    set_value(page, "cn0_threshold_a", 50)
    page.find_element(By.ID, "cn0_preview_button").click()
    wait(page, lambda d: d.execute_script("const i = document.getElementById('cn0_preview');"
                                          "return !i.hidden && i.complete && i.naturalWidth > 0"), 20, "no preview")
    mapped = _shown_picture(page, "cn0_preview")
    hint = Image.open(io.BytesIO(_hint_png()))
    expected = np.asarray(preprocess(hint, "canny", 50.0, 200.0, 512).convert("RGB"))
    assert mapped.shape == expected.shape and (mapped == expected).all()
    # Pixel perfect: the resolution from the picture's and the drawing's size, as the job's unit runs at
    # (preprocess.pixel_perfect_resolution: 64 x 64 covering 64 x 96 under Crop and Resize: 96)
    page.find_element(By.ID, "cn0_pixel_perfect").click()
    assert not page.find_element(By.ID, "cn0_processor_res").is_enabled()     # as the extension hides it
    assert page.execute_script("return collectRequest()")["controls"][0]["processor_res"] is None
    set_value(page, "width", 64)
    set_value(page, "height", 96)
    page.find_element(By.ID, "cn0_preview_button").click()
    wait(page, lambda d: d.execute_script("const i = document.getElementById('cn0_preview');"
                                          "return !i.hidden && i.complete && i.naturalWidth > 0"), 20, "no preview")
    assert pixel_perfect_resolution(hint.size, 64, 96, "crop") == 96
    cases = [(picture, drawing, mode) for picture in ((64, 64), (100, 37), (33, 77), (640, 480), (4, 2))
             for drawing in ((64, 96), (512, 768), (72, 40), (5, 5)) for mode in ("resize", "crop", "fill")]
    assert page.execute_script("return arguments[0].map(([[pw, ph], [w, h], mode]) => "
                               "pixelPerfectResolution(pw, ph, w, h, mode))", cases) == [
        pixel_perfect_resolution(picture, *drawing, mode) for picture, drawing, mode in cases]   # 2.5 -> 2 too
    expected = np.asarray(preprocess(hint, "canny", 50.0, 200.0, 96).convert("RGB"))
    assert mapped.shape == (512, 512, 3)                                   # Processor res's map, above
    shown = _shown_picture(page, "cn0_preview")
    assert shown.shape == expected.shape == (96, 96, 3) and (shown == expected).all()
    assert text(page, "error") == ""
    # a preprocessor /controlnet/detect does not run: the server's reason in the error box, the button free again
    choose(page, "cn0_module", value="inpaint")
    page.find_element(By.ID, "cn0_preview_button").click()
    wait(page, lambda d: "Module not supported" in text(d, "error") and "does not run 'inpaint'" in text(d, "error"),
         10, "the preview error is not shown")
    assert page.find_element(By.ID, "cn0_preview_button").is_enabled()
    assert not page.find_element(By.ID, "cn0_preview").is_displayed()


def test_the_ip_adapter_box_sends_its_fields_and_reuse_fills_it(page, base_url):
    wait(page, _lists_loaded, 30, "the ControlNet lists did not load")
    assert not page.find_element(By.ID, "ipa-options").is_displayed()
    page.find_element(By.ID, "ipa_enabled").click()
    titles = page.execute_script("return [...document.getElementById('ipa_model').options].map((o) => o.value)")
    title = next(t for t in titles if t.startswith("ip-adapter_tiny ["))
    choose(page, "ipa_model", value=title)
    set_value(page, "ipa_scale", 0.7)
    drop_file(page, _reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    sent = page.execute_script("return collectRequest()")["ip_adapters"]
    assert sent == [{"model": title, "image": base64.b64encode(_reference_png()).decode(), "scale": 0.7}]
    job = _generate(page, base_url, "a web image prompt")
    assert job["status"] == "done", job
    assert job["request"]["ip_adapters"] == [{"model": "ip-adapter_tiny.safetensors", "scale": 0.7}]
    assert 'IP-Adapter 0: "Model: ip-adapter_tiny [' in job["infotexts"][0]
    for restore in ("reuse", "png"):
        _restore(page, base_url, job, restore)
        wait(page, lambda d: _checked(d, "ipa_enabled"), 20, f"{restore}: the IP-Adapter is not ticked")
        assert value(page, "ipa_model") == title and value(page, "ipa_scale") == "0.7", restore


@pytest.fixture(scope="module")
def empty_folder_server(tmp_path_factory: pytest.TempPathFactory):
    """A server whose ControlNet folder starts empty (and has no image_encoder folder): (its URL, the folder)."""
    root = tmp_path_factory.mktemp("webui-controlnet-empty")
    folder = root / "models" / "ControlNet"
    folder.mkdir(parents=True)
    server = start_server(root / "outputs", "--models-dir", str(root / "models"))
    yield server.url.rstrip("/"), folder
    server.stop()


def test_a_server_without_controlnets_or_an_image_encoder(browser, empty_folder_server):
    """No models: each list says so and an enabled unit asks for one; an IP-Adapter added later is listed on
    refresh, and without its image encoder the server's 422 names what is missing, shown in the page, no job
    queued."""
    import sdlab
    from sdlab.models.ip_adapter import cross_attentions

    url, folder = empty_folder_server
    open_page(browser, url)
    wait(browser, lambda d: d.execute_script("return document.getElementById('cn0_module').options.length > 1"), 30,
         "the preprocessors did not load")
    assert option_values(browser, "cn0_model", "text") == ["no ControlNets found"]
    assert browser.execute_script("return document.getElementById('ipa_model').options[0].text") == \
        "no IP-Adapters found"
    drop_file(browser, _hint_png(), "hint.png", "cn0_drop")
    wait(browser, lambda d: _checked(d, "cn0_enabled"), 10, "the dropped hint does not enable unit 0")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: "ControlNet Unit 0 needs a model" in text(d, "error"), 10, "no error for the model")
    browser.find_element(By.ID, "cn0_enabled").click()
    bundle = sdlab.load().bundle
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    write_ip_adapter(folder / "ip-adapter_tiny.safetensors",
                     ip_adapter_state(widths, bundle.unet_config.context_dim, 32, seed=3, std=0.3))
    browser.find_element(By.ID, "cn-refresh").click()
    wait(browser, lambda d: len(option_values(d, "ipa_model")) == 2, 20, "no refreshed list")
    browser.find_element(By.ID, "ipa_enabled").click()
    choose(browser, "ipa_model", index=1)
    drop_file(browser, _reference_png(), "reference.png", "ipa_drop")
    wait(browser, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    set_value(browser, "prompt", "no image encoder")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: text(d, "error").startswith("422") and "no image encoder for the IP-Adapter"
         in text(d, "error"), 20, "the missing encoder is not shown")
    assert __import__("test_webui").http_json(url, "/api/jobs")["jobs"] == []

