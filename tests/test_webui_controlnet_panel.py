"""The web UI's ControlNet / IP-Adapter panel in a real headless browser, on the server of test_webui_controlnet.py
(tiny_canny and ip-adapter_tiny in its ControlNet folder): a unit lists ControlNets only and the IP-Adapter box
IP-Adapters only; the IP-Adapter's image encoder module survives Reuse and a PNG; a picture's `ControlNet N` line
fills unit N; a job's null Processor res comes back as the preprocessor's default; Pixel perfect's Preview takes
the model's default size; errors name models, not server paths; the Control Type filter narrows the lists as the
extension's does."""

from __future__ import annotations

import numpy as np
from PIL import Image

from test_webui import (  # noqa: F401  (fixtures: browser, page)
    By, choose, option_values, browser, drop_file, http_json, open_page, page, png_with_parameters, set_value,
    severe_console_errors, text, value, wait, wait_job,
)
from test_webui_controlnet import (  # noqa: F401  (fixtures: base_url, empty_folder_server)
    _checked, _generate, _hint_png, _lists_loaded, _model_title, _reference_png, _restore, _set_canny_unit,
    _shown_picture, base_url, empty_folder_server,
)


def _options(driver, select_id: str) -> list[str]:
    return driver.execute_script("return [...document.getElementById(arguments[0]).options].map((o) => o.value)",
                                 select_id)


def _stems(titles: list[str]) -> list[str]:
    return [title.split(" [")[0] for title in titles]


def test_units_list_controlnets_and_the_ip_adapter_box_ip_adapters(page, base_url):
    """The folder holds a ControlNet and an IP-Adapter: a unit's Model lists the ControlNet alone (a job with an
    IP-Adapter there is a 422 at submit), its Preprocessor no IP-Adapter module; the IP-Adapter box lists the
    IP-Adapter and offers the modules as its image encoder."""
    wait(page, _lists_loaded, 30, "the ControlNet lists did not load")
    for i in range(3):
        assert _stems(_options(page, f"cn{i}_model")) == ["", "tiny_canny"]
        assert not [name for name in _options(page, f"cn{i}_module") if name.startswith("ip-adapter")]
    assert _stems(_options(page, "ipa_model")) == ["", "ip-adapter_tiny"]
    types = http_json(base_url, "/controlnet/control_types")["control_types"]
    names = dict(zip(http_json(base_url, "/controlnet/module_list?alias_names=true")["module_list"],
                     http_json(base_url, "/controlnet/module_list")["module_list"]))
    assert _options(page, "ipa_module") == ["", *(names[label] for label in types["IP-Adapter"]["module_list"][1:])]
    assert sorted(http_json(base_url, "/controlnet/model_list")["model_list"]) == sorted(
        _options(page, "cn0_model")[1:] + _options(page, "ipa_model")[1:])      # A1111's list: both, as the extension


def test_the_ip_adapter_module_survives_reuse_and_the_png(page, base_url):
    """The image encoder an A1111 IP-Adapter unit names (its Module) is the box's Image encoder: sent as the native
    entry's `module`, recorded, and given back by Reuse and by the drawn PNG (its `ControlNet 0` line)."""
    wait(page, _lists_loaded, 30, "the ControlNet lists did not load")
    page.find_element(By.ID, "ipa_enabled").click()
    choose(page, "ipa_model", value=_options(page, "ipa_model")[1])
    choose(page, "ipa_module", value="ip-adapter_clip_sd15")
    set_value(page, "ipa_scale", 0.6)
    drop_file(page, _reference_png(), "reference.png", "ipa_drop")
    wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    job = _generate(page, base_url, "a web unit's image encoder")
    assert job["status"] == "done", job
    assert job["request"]["ip_adapters"] == [{"model": "ip-adapter_tiny.safetensors", "scale": 0.6,
                                              "module": "ip-adapter_clip_sd15"}]
    assert 'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: ip-adapter_tiny [' in job["infotexts"][0]
    for restore in ("reuse", "png"):
        _restore(page, base_url, job, restore)
        wait(page, lambda d: _checked(d, "ipa_enabled"), 20, f"{restore}: the IP-Adapter is not ticked")
        assert value(page, "ipa_module") == "ip-adapter_clip_sd15", restore
        drop_file(page, _reference_png(), "reference.png", "ipa_drop")
        wait(page, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "no picture shown")
        sent = page.execute_script("return collectRequest()")["ip_adapters"][0]
        assert sent["module"] == "ip-adapter_clip_sd15" and sent["scale"] == 0.6, restore
    # a job without a module empties the box again
    drop_file(page, png_with_parameters('a\nSteps: 2, Seed: 1, Size: 64x64, IP-Adapter 0: "Model: ip-adapter_tiny, '
                                        'Weight: 0.5"'), "plain.png")
    wait(page, lambda d: value(d, "ipa_scale") == "0.5", 20, "the plain IP-Adapter line is not read")
    assert value(page, "ipa_module") == ""


def test_a_pictures_controlnet_1_line_fills_unit_1(page, base_url):
    """A1111's paste keeps the unit: a picture whose only unit line is `ControlNet 1` fills unit 1, unit 0 unticked;
    lines 0 and 2 fill units 0 and 2 with unit 1 unticked."""
    wait(page, _lists_loaded, 30, "the ControlNet lists did not load")
    line = '"Module: canny, Model: tiny_canny, Weight: 0.9, Guidance Start: 0.1, Guidance End: 1"'
    drop_file(page, png_with_parameters(f"a cat\nSteps: 2, Seed: 1, Size: 64x64, ControlNet 1: {line}"), "one.png")
    wait(page, lambda d: _checked(d, "cn1_enabled"), 20, "unit 1 is not filled")
    assert not _checked(page, "cn0_enabled") and not _checked(page, "cn2_enabled")
    assert (_stems([value(page, "cn1_model")]), value(page, "cn1_weight"), value(page, "cn1_start")) == (
        ["tiny_canny"], "0.9", "0.1")
    drop_file(page, png_with_parameters(f"a cat\nSteps: 2, Seed: 1, Size: 64x64, ControlNet 0: {line}, "
                                        f"ControlNet 2: {line.replace('0.9', '0.4')}"), "two.png")
    wait(page, lambda d: _checked(d, "cn2_enabled") and not _checked(d, "cn1_enabled"), 20, "units 0 / 2 not filled")
    assert _checked(page, "cn0_enabled") and (value(page, "cn0_weight"), value(page, "cn2_weight")) == ("0.9", "0.4")


def test_a_jobs_null_processor_res_comes_back_as_the_default(page, base_url):
    """A native job whose canny unit leaves processor_res null (the preprocessor's default): Reuse leaves the box
    empty (its placeholder: default) and the job sent again has the original's unit."""
    import base64

    hint = base64.b64encode(_hint_png()).decode()
    unit = {"model": "tiny_canny", "image": hint, "module": "canny", "strength": 0.7}
    posted = http_json(base_url, "/api/jobs", {"prompt": "a null processor res", "steps": 2, "width": 64,
                                               "height": 64, "seed": 3, "controls": [unit]})
    job = wait_job(base_url, posted["id"])
    assert job["status"] == "done" and job["request"]["controls"][0]["processor_res"] is None, job
    _restore(page, base_url, job, "reuse")
    wait(page, lambda d: _checked(d, "cn0_enabled"), 20, "unit 0 is not filled")
    assert value(page, "cn0_processor_res") == ""
    assert page.find_element(By.ID, "cn0_processor_res").get_attribute("placeholder") == "default"
    drop_file(page, _hint_png(), "hint.png", "cn0_drop")
    wait(page, lambda d: d.find_element(By.ID, "cn0_view").is_displayed(), 10, "the dropped hint is not shown")
    set_value(page, "prompt", "a null processor res again")
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: any(j["request"].get("prompt") == "a null processor res again"
                             for j in http_json(base_url, "/api/jobs")["jobs"]), 30, "no job queued")
    again = next(j for j in http_json(base_url, "/api/jobs")["jobs"]
                 if j["request"].get("prompt") == "a null processor res again")
    assert wait_job(base_url, again["id"])["request"]["controls"] == job["request"]["controls"]


def test_pixel_perfect_preview_takes_the_models_default_size(page, base_url):
    """Width and Height left empty: Pixel perfect's Preview runs at the resolution of the size the job draws at, the
    model's default side (GET /api/model-size), as the job's unit would."""
    import io

    import sdlab
    from sdlab.pipeline.preprocess import pixel_perfect_resolution, preprocess

    side = sdlab.load().bundle.default_size
    assert http_json(base_url, "/api/model-size")["width"] == side == http_json(base_url, "/api/model-size")["height"]
    _set_canny_unit(page)
    page.find_element(By.ID, "cn0_pixel_perfect").click()
    assert value(page, "width") == value(page, "height") == ""
    page.find_element(By.ID, "cn0_preview_button").click()
    wait(page, lambda d: d.execute_script("const i = document.getElementById('cn0_preview');"
                                          "return !i.hidden && i.complete && i.naturalWidth > 0"), 20,
         f"no preview: {text(page, 'error')!r}")
    hint = Image.open(io.BytesIO(_hint_png()))
    resolution = pixel_perfect_resolution(hint.size, side, side, "crop")
    expected = np.asarray(preprocess(hint, "canny", 100.0, 200.0, resolution).convert("RGB"))
    shown = _shown_picture(page, "cn0_preview")
    assert shown.shape == expected.shape and (shown == expected).all()
    assert text(page, "error") == ""


def test_the_pages_errors_name_models_not_the_servers_paths(browser, empty_folder_server):
    """An IP-Adapter without its image encoder: the 422 the page shows names the adapter by its title and the places
    looked in by folder name, none by the server's absolute path."""
    import sdlab
    from ip_adapter_fixtures import ip_adapter_state, write_ip_adapter
    from sdlab.models.ip_adapter import cross_attentions

    url, folder = empty_folder_server
    bundle = sdlab.load().bundle
    widths = [attn.to_q.weight.shape[0] for attn in cross_attentions(bundle.unet)]
    write_ip_adapter(folder / "ip-adapter_tiny.safetensors",
                     ip_adapter_state(widths, bundle.unet_config.context_dim, 32, seed=3, std=0.3))
    open_page(browser, url)
    wait(browser, lambda d: len(option_values(d, "ipa_model")) == 2, 30, "no IP-Adapter listed")
    browser.find_element(By.ID, "ipa_enabled").click()
    choose(browser, "ipa_model", index=1)
    drop_file(browser, _reference_png(), "reference.png", "ipa_drop")
    wait(browser, lambda d: d.find_element(By.ID, "ipa_view").is_displayed(), 10, "the dropped picture is not shown")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: text(d, "error").startswith("422"), 20, "no error shown")
    shown = text(browser, "error")
    assert "no image encoder for the IP-Adapter 'ip-adapter_tiny [" in shown, shown
    assert str(folder.parent.parent) not in shown and "ControlNet/image_encoder" in shown, shown


def test_the_control_type_narrows_the_lists_and_picks_its_defaults(page, base_url):
    """The extension's Control Type radio (its types as GET /controlnet/control_types serves them, IP-Adapter left
    to the IP-Adapter box): Canny narrows Preprocessor to canny's and Model to tiny_canny, both selected; a type
    without a model here (Depth) lists Model None alone, as the extension's current `select_control_type` (its
    older one listed every model then); All gives every one back, preprocessor none."""
    wait(page, _lists_loaded, 30, "the ControlNet lists did not load")
    types = http_json(base_url, "/controlnet/control_types")["control_types"]
    radios = page.execute_script("return [...document.getElementsByName('cn0_type')].map((r) => r.value)")
    assert radios == [name for name in types if name != "IP-Adapter"] and radios[0] == "All"
    assert page.find_element(By.ID, "cn0_type_0").is_selected()
    every_module, every_model = _options(page, "cn0_module"), _options(page, "cn0_model")
    canny = radios.index("Canny")
    page.find_element(By.ID, f"cn0_type_{canny}").click()        # the types are read again as one is chosen
    wait(page, lambda d: value(d, "cn0_module") == "canny", 20, "Canny is not chosen")
    assert _options(page, "cn0_module") == [m for m in every_module if m in types["Canny"]["module_list"]
                                            or m == "invert"] == ["none", "canny", "invert"]
    assert value(page, "cn0_module") == "canny" == types["Canny"]["default_option"]
    title = _model_title(page, "tiny_canny")
    assert value(page, "cn0_model") == title == types["Canny"]["default_model"]
    assert text(page, "cn0_threshold_a_label") == "Canny Low Threshold"     # canny's sliders shown
    assert _options(page, "cn1_module") == every_module                     # the other units keep theirs
    page.find_element(By.ID, f"cn0_type_{radios.index('Depth')}").click()
    wait(page, lambda d: _options(d, "cn0_module") == ["none"], 20, "Depth is not chosen")
    assert value(page, "cn0_module") == "none" and types["Depth"]["model_list"] == ["None"]
    assert _options(page, "cn0_model") == [""] and value(page, "cn0_model") == ""     # none of its own: None alone
    page.find_element(By.ID, "cn0_type_0").click()
    wait(page, lambda d: _options(d, "cn0_module") == every_module, 20, "All is not chosen")
    assert _options(page, "cn0_module") == every_module and _options(page, "cn0_model") == every_model
    assert value(page, "cn0_module") == "none"
    # Reuse of a unit shows every type again
    page.find_element(By.ID, f"cn0_type_{canny}").click()
    wait(page, lambda d: value(d, "cn0_module") == "canny", 20, "Canny is not chosen")
    drop_file(page, png_with_parameters('a\nSteps: 2, Seed: 1, Size: 64x64, ControlNet 0: "Module: threshold, '
                                        'Model: tiny_canny, Weight: 1"'), "threshold.png")
    wait(page, lambda d: value(d, "cn0_module") == "threshold", 20, "the unit is not filled")
    assert page.find_element(By.ID, "cn0_type_0").is_selected() and _options(page, "cn0_module") == every_module
    assert severe_console_errors(page) == []
