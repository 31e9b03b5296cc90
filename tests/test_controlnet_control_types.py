"""The extension's Control Type filter (`GET /controlnet/control_types`, the web UI's Control Type radios) follows
sd-webui-controlnet's current `select_control_type`: a type keeps the models whose names hold its words and whose
family, guessed from the name, passes the loaded model's; a type with no such model lists "None" alone (the older
rule's fall back to every model is gone). The extension's route asks for no family; the radios ask for the model
the form draws with (`?model=`)."""

from __future__ import annotations

import httpx
import pytest

from bundle_fixtures import tiny_bundle, write_original
from server_fixtures import start_server
from test_webui import (  # noqa: F401  (fixture: browser)
    By, choose, browser, open_page, severe_console_errors, wait,
)

from sdlab.server.a1111_controlnet import _control_type
from sdlab.server.control_types import CONTROL_TYPES

# ---------------------------------------------------------------- the extension's rule, transcribed
# Mikubill/sd-webui-controlnet, scripts/enums.py (read at commit 0314d28129a179a21ddee78d67e957bd2ad5ba43)
# `StableDiffusionVersion.detect_from_model_name` / `is_compatible_with`, and scripts/global_state.py
# `select_control_type(control_type, sd_version=UNKNOWN, cn_models=...)` of the v1.1.44x releases (the form with
# `sd_version`; its Control Type radio passes `get_sd_version()`, scripts/api.py's /controlnet/control_types
# passes none). Its filters come from `Preprocessor.tag_to_filters` (scripts/supported_preprocessor.py, commit
# 01de1cb9028c1c3d6a799f2230d3ae06caa1fedb), below.
UNKNOWN, SD1x, SD2x, SDXL = 0, 1, 2, 3


def _detect_from_model_name(model_name: str) -> int:
    if any(f"sd{v}" in model_name.lower() for v in ("14", "15", "16")):
        return SD1x
    if "sd21" in model_name or "2.1" in model_name:
        return SD2x
    if "xl" in model_name.lower():
        return SDXL
    return UNKNOWN


def _is_compatible_with(version: int, other: int) -> bool:
    return any(v == UNKNOWN for v in [version, other]) or sum(v == SDXL for v in [version, other]) != 1


def _tag_to_filters(tag: str) -> set[str]:
    filters_aliases = {
        "instructp2p": ["ip2p"],
        "segmentation": ["seg"],
        "normalmap": ["normal"],
        "t2i-adapter": ["t2i_adapter", "t2iadapter", "t2ia"],
        "ip-adapter": ["ip_adapter", "ipadapter"],
        "openpose": ["openpose", "densepose"],
        "instant-id": ["instant_id", "instantid"],
        "scribble": ["sketch"],
        "tile": ["blur"],
    }
    tag = tag.lower()
    return set([tag] + filters_aliases.get(tag, []))


def _extension_models(control_type: str, sd_version: int, all_models: list[str]) -> tuple[list[str], str]:
    pattern = control_type.lower()
    if pattern == "all":
        return all_models, "None"
    filters = _tag_to_filters(control_type)
    filtered_model_list = [
        model for model in all_models
        if model.lower() == "none" or ((
            pattern in model.lower() or any(a in model.lower() for a in filters)
        ) and _is_compatible_with(sd_version, _detect_from_model_name(model)))
    ]
    if len(filtered_model_list) == 1:
        default_model = "None"
    else:
        default_model = filtered_model_list[1]
        for x in filtered_model_list:
            if "11" in x.split("[")[0]:
                default_model = x
                break
    return filtered_model_list, default_model


FAMILIES = {None: UNKNOWN, "sd1": SD1x, "sd2": SD2x, "sdxl": SDXL}
MODELS = ["None", "control_v11p_sd15_canny [1111aaaa]", "control_sd15_depth [2222bbbb]",
          "diffusers_xl_canny_mid [3333cccc]", "t2i-adapter_xl_canny [4444dddd]", "t2iadapter_canny_sd14v1 [5555eeee]",
          "controlnet_sd21_openpose [6666ffff]", "control_v11p_SD21_seg [77770000]", "control-2.1_tile [88881111]",
          "kohya_controllllite_xl_depth_anime [99992222]", "sai_xl_depth_256lora [aaaa3333]",
          "thibaud_XL_openpose [bbbb4444]", "control_canny-fp16 [cccc5555]", "ip-adapter_sd15 [dddd6666]",
          "ip-adapter_xl [eeee7777]", "ip-adapter-plus_sdxl_vit-h [ffff8888]", "control_v11e_sd15_shuffle [00009999]",
          "control_v11p_sd15_sketch [12121212]", "control_instant_id_sdxl [34343434]",
          "controlnet_blur_sd15 [56565656]", "control_v11e_sd15_ip2p [78787878]"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_types_models_and_default_model_are_the_extensions(family):
    """Every control type, for each family the loaded model may have (None: the extension's UNKNOWN, which its
    route passes), lists the models and picks the default model as the transcribed `select_control_type`."""
    for name in CONTROL_TYPES:
        served = _control_type(name, MODELS, family)
        assert (served["model_list"], served["default_model"]) == _extension_models(name, FAMILIES[family], MODELS), (
            name, family)


def test_a_type_with_no_model_of_the_family_lists_none_alone():
    """SDXL loaded: Depth's SD1 model is left out; Canny keeps the XL ones and the one of no family; a type whose
    models are all of another family, or with none at all, lists "None" alone with "None" chosen (the older
    extension gave every model back then)."""
    models = ["None", "control_v11f1p_sd15_depth [1]", "diffusers_xl_canny_mid [2]", "control_canny-fp16 [3]",
              "control_v11p_sd15_canny [4]"]
    assert _control_type("Depth", models, "sdxl") == {**_control_type("Depth", models, "sdxl"),
                                                      "model_list": ["None"], "default_model": "None"}
    assert _control_type("MLSD", models, None)["model_list"] == ["None"]
    xl = _control_type("Canny", models, "sdxl")
    assert xl["model_list"] == ["None", "diffusers_xl_canny_mid [2]", "control_canny-fp16 [3]"]
    assert xl["default_model"] == "diffusers_xl_canny_mid [2]"
    sd1 = _control_type("Canny", models, "sd1")             # SD1 and SD2 pass each other; "11" first
    assert sd1["model_list"] == ["None", "control_canny-fp16 [3]", "control_v11p_sd15_canny [4]"]
    assert sd1["default_model"] == "control_v11p_sd15_canny [4]"
    assert _control_type("Depth", models, "sd2")["model_list"] == ["None", "control_v11f1p_sd15_depth [1]"]
    assert _control_type("All", models, "sdxl")["model_list"] == models


# ---------------------------------------------------------------- the route and the web UI, on SD1 and SDXL models

CONTROLNETS = ("control_v11p_sd15_canny", "diffusers_xl_canny_mid", "control_v11f1p_sd15_depth", "control_canny")


@pytest.fixture(scope="module")
def family_server(tmp_path_factory: pytest.TempPathFactory):
    """A server whose models are a reduced SD1 file (the one it starts with: selected) and a reduced SDXL file, and
    whose ControlNet folder holds files named as SD1 / SDXL / no family's ControlNets (listed by name only)."""
    root = tmp_path_factory.mktemp("control-types")
    checkpoints = root / "models" / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    write_original(tiny_bundle("sd1"), checkpoints / "a_sd1.safetensors")
    write_original(tiny_bundle("sdxl"), checkpoints / "b_sdxl.safetensors")
    controlnets = root / "models" / "ControlNet"
    controlnets.mkdir()
    for name in CONTROLNETS:
        (controlnets / f"{name}.safetensors").write_bytes(b"\0" * 4096)
    server = start_server(root / "outputs", "--models-dir", str(root / "models"),
                          "--model", str(checkpoints / "a_sd1.safetensors"))
    try:
        yield server.url
    finally:
        server.stop()


def _stems(titles: list[str]) -> list[str]:
    return [title.split(" [")[0] for title in titles]


def _types(url: str, **params) -> dict:
    answer = httpx.get(url + "/controlnet/control_types", params=params, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["control_types"]


def test_the_route_narrows_to_the_family_of_the_model_asked_for(family_server):
    models = {m["model_name"]: m["title"] for m in httpx.get(family_server + "/sdapi/v1/sd-models").json()}
    plain = _types(family_server)                       # the extension's route: no family asked for
    assert _stems(plain["Canny"]["model_list"]) == ["None", "control_canny", "control_v11p_sd15_canny",
                                                    "diffusers_xl_canny_mid"]
    xl = _types(family_server, model=models["b_sdxl"])
    assert _stems(xl["Canny"]["model_list"]) == ["None", "control_canny", "diffusers_xl_canny_mid"]
    assert xl["Depth"]["model_list"] == ["None"] and xl["Depth"]["default_model"] == "None"
    sd1 = _types(family_server, model=models["a_sd1"])
    assert _stems(sd1["Canny"]["model_list"]) == ["None", "control_canny", "control_v11p_sd15_canny"]
    assert _stems([sd1["Canny"]["default_model"]]) == ["control_v11p_sd15_canny"]
    assert _types(family_server, model="") == sd1       # empty: the server's selected model
    unknown = httpx.get(family_server + "/controlnet/control_types", params={"model": "nope"}, timeout=60)
    assert unknown.status_code == 404 and "unknown model 'nope'" in unknown.text


def _options(driver, select_id: str) -> list[str]:
    return driver.execute_script("return [...document.getElementById(arguments[0]).options].map((o) => o.value)",
                                 select_id)


def test_the_web_uis_radio_narrows_to_the_chosen_models_family(browser, family_server):
    """The page's Model list under a Control Type holds the ControlNets of the family of the model chosen in the
    form (read again as a type is chosen and as the model changes), as the extension's radio holds those of the
    loaded model's."""
    open_page(browser, family_server)
    wait(browser, lambda d: len(_options(d, "cn0_model")) > 1, 30, "the ControlNet lists did not load")
    browser.get_log("browser")
    radios = browser.execute_script("return [...document.getElementsByName('cn0_type')].map((r) => r.value)")
    choose(browser, "model", value=next(v for v in _options(browser, "model") if v.startswith("b_sdxl")))
    browser.find_element(By.ID, f"cn0_type_{radios.index('Canny')}").click()
    wait(browser, lambda d: _stems(_options(d, "cn0_model")) == ["", "control_canny", "diffusers_xl_canny_mid"], 20,
         "Canny does not list the SDXL ControlNets alone")
    # the first listed: no name holds "11"
    assert _stems([browser.find_element(By.ID, "cn0_model").get_attribute("value")]) == ["control_canny"]
    browser.find_element(By.ID, f"cn0_type_{radios.index('Depth')}").click()
    wait(browser, lambda d: _options(d, "cn0_model") == [""], 20, "Depth lists a ControlNet of another family")
    choose(browser, "model", value=next(v for v in _options(browser, "model") if v.startswith("a_sd1")))
    wait(browser, lambda d: _stems(_options(d, "cn0_model")) == ["", "control_v11f1p_sd15_depth"], 20,
         "the SD1 model's Depth ControlNet is not listed")
    assert severe_console_errors(browser) == []
