"""In real chromium: the hires Upscaler list ends with ComfyUI's latent methods ("ComfyUI bislerp", ...), which draw its
two-pass graph (hr_convention comfyui, README); a picture of that graph dropped on the web UI selects its method and
keeps its Hires crop, seed and CFG Scale (no controls of their own: `KEPT`, going with the hires controls); another
upscaler lets them go and draws A1111's hires fix."""

from __future__ import annotations

import pytest

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    base_url, browser, drop_file, generate_and_finish, page, png_with_parameters, sdlab_server, text, wait,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PICTURE = ("a two-pass hat\nSteps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 5, Seed: 3, Size: 64x64, "
           "Denoising strength: 0.5, Hires resize: 112x64, Hires upscaler: bislerp, Hires seed: 9, "
           "Hires CFG Scale: 2.5, Hires convention: comfyui, Hires crop: center, ENSD: 1, Initial noise: comfyui, "
           "Version: sdlab 0.1.0")


def test_a_dropped_comfyui_hires_picture_keeps_its_hires_fields(page, base_url):
    drop_file(page, png_with_parameters(PICTURE), "hires.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from hires.png", 20, "the PNG was not read cleanly")
    kept = page.execute_script("return keptRequest()")
    assert {name: kept.get(name) for name in ("hr_convention", "hr_crop", "hr_seed", "hr_cfg_scale")} == {
        "hr_convention": "comfyui", "hr_crop": "center", "hr_seed": 9, "hr_cfg_scale": 2.5}
    hires = page.execute_script("return hiresRequest()")
    assert (hires["hr_upscaler"], hires["hr_convention"]) == ("bislerp", "comfyui")
    job = generate_and_finish(page, base_url, "a two-pass hat")               # drawn as the picture says
    assert {name: job["request"].get(name) for name in ("hr_convention", "hr_upscaler", "hr_crop", "hr_seed",
                                                        "hr_cfg_scale", "hr_width", "hr_height")} == {
        "hr_convention": "comfyui", "hr_upscaler": "bislerp", "hr_crop": "center", "hr_seed": 9,
        "hr_cfg_scale": 2.5, "hr_width": 112, "hr_height": 64}
    page.execute_script("const s = document.getElementById('hr_upscaler'); s.value = 'Latent';"
                        "s.dispatchEvent(new Event('change'));")
    kept = page.execute_script("return keptRequest()")
    assert not {"hr_convention", "hr_crop", "hr_seed", "hr_cfg_scale"} & set(kept)
    assert page.execute_script("return hiresRequest()").get("hr_convention") is None      # undefined: not sent


def test_the_upscaler_list_ends_with_comfyuis_methods(page):
    options = page.execute_script("return [...document.getElementById('hr_upscaler').options]"
                                  ".map((o) => [o.text, o.value])")
    assert options[-5:] == [[f"ComfyUI {m}", m] for m in ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")]
    assert options[0] == ["Latent", "Latent"]
