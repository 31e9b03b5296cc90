"""The web UI's form in a real headless browser (the helpers and fixtures of test_webui.py): a number box
holding text that is not a number is an error, never a silent default; the hires fix (with the server's
upscaler models too), clip skip and the variation seed reach the job; "Reuse" of a job and a dropped PNG fill the form alike, those controls
included, and name each setting the form has no control for and the API does not take (the noise multiplier,
ControlNet units, ...); those it takes (the drawing conventions a job records: ENSD, initial noise, img2img
steps; SDXL's conditioning) go back with the form, so Reuse of a ComfyUI-spelt job draws it again."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from server_fixtures import start_server
from test_upscale_models import new_arch_state
from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, choose, base_url, browser, checked, drop_file, http_bytes, http_json, job_by_prompt, loaded_results, open_page,
    option_values, page, paint_stroke, png_with_parameters, reuse, sdlab_server, set_value, text, value, wait, wait_job,
)


def _jobs(base: str) -> int:
    return len(http_json(base, "/api/jobs")["jobs"])


def test_text_that_is_not_a_number_is_an_error(page, base_url):
    page.find_element(By.ID, "prompt").send_keys("a number box with text")
    before = _jobs(base_url)
    for field, typed in (("steps", "e"), ("cfg_scale", "1e400")):
        set_value(page, "steps", "")
        set_value(page, "cfg_scale", "")
        set_value(page, field, typed)
        assert page.execute_script("return document.getElementById(arguments[0]).validity.badInput", field)
        page.find_element(By.ID, "generate").click()
        wait(page, lambda d: d.find_element(By.ID, "error").is_displayed(), 10, f"{field} {typed!r}: no error")
        assert "not a number" in text(page, "error"), text(page, "error")
    assert _jobs(base_url) == before                                    # nothing was sent


def set_slider(driver, element_id: str, number: float) -> None:
    """A range input set as the end of a drag sets it."""
    driver.execute_script("const s = document.getElementById(arguments[0]); s.value = arguments[1];"
                          "s.dispatchEvent(new Event('input'));", element_id, number)


COMFY_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]


def test_hires_fix_draws_the_upscaled_picture(page, base_url):
    # off and folded by default, as in A1111; txt2img's, and img2img's under ComfyUI's two-pass graph
    # (tests/test_webui_img2img_hires.py), not inpaint's
    assert not checked(page, "enable_hr") and not page.find_element(By.ID, "hires-options").is_displayed()
    assert not page.find_element(By.ID, "enable_hr-img2img-hint").is_displayed()
    page.find_element(By.ID, "tab-img2img").click()
    assert page.find_element(By.ID, "hires-section").is_displayed()
    assert page.find_element(By.ID, "enable_hr-img2img-hint").is_displayed()
    page.find_element(By.ID, "tab-inpaint").click()
    assert not page.find_element(By.ID, "hires-section").is_displayed()
    page.find_element(By.ID, "tab-txt2img").click()
    page.find_element(By.ID, "enable_hr").click()
    assert page.find_element(By.ID, "hires-options").is_displayed()
    # A1111's defaults; the upscalers the hires fix takes: the latent modes, then the plain resizes, then ComfyUI's
    # latent methods (its two-pass graph: tests/test_webui_comfy_hires.py)
    assert (value(page, "hr_scale"), value(page, "hr_width"), value(page, "hr_height"), value(page, "hr_steps"),
            value(page, "hr_denoise"), value(page, "hr_upscaler")) == ("2", "0", "0", "0", "0.7", "Latent")
    latent = [mode["name"] for mode in http_json(base_url, "/sdapi/v1/latent-upscale-modes")]
    assert option_values(page, "hr_upscaler") == [*latent, "None", "Lanczos", "Nearest", *COMFY_METHODS]

    prompt = "a hires red square"
    set_value(page, "prompt", prompt)
    set_value(page, "steps", 3)
    set_value(page, "seed", 4)
    set_value(page, "hr_scale", 1.5)
    set_value(page, "hr_steps", 2)
    set_slider(page, "hr_denoise", 0.55)
    assert text(page, "hr_denoise-value") == "0.55"
    choose(page, "hr_upscaler", value="Lanczos")
    page.find_element(By.ID, "generate").click()
    result = loaded_results(page)[0]
    image = Image.open(io.BytesIO(http_bytes(base_url, result.replace(base_url, ""))))
    assert image.size == (96, 96)
    for field in ("Size: 64x64", "Hires upscale: 1.5", "Hires steps: 2", "Hires upscaler: Lanczos",
                  "Denoising strength: 0.55"):
        assert field in image.info["parameters"], (field, image.info["parameters"])
    job = job_by_prompt(base_url, prompt)
    assert (job["request"]["hr_scale"], job["request"]["hr_steps"], job["request"]["hr_denoise"]) == (1.5, 2, 0.55)

    # "Resize width to" wins over the scale, the height follows the aspect ratio; unticked, nothing is sent
    set_value(page, "hr_width", 80)
    sent = page.execute_script("return collectRequest()")
    assert (sent["hr_width"], sent["hr_height"], sent["hr_upscaler"]) == (80, 0, "Lanczos")
    page.find_element(By.ID, "enable_hr").click()
    assert not any(key.startswith("hr_") for key in page.execute_script("return collectRequest()"))


@pytest.fixture(scope="module")
def upscalers_server(tmp_path_factory):
    """A server with a random-weight 2x Real-ESRGAN model in its --upscalers-dir."""
    root = tmp_path_factory.mktemp("webui-upscalers")
    (root / "ESRGAN").mkdir()
    save_file(new_arch_state(2), str(root / "ESRGAN" / "tinyx2.safetensors"))
    server = start_server(root / "outputs", "--upscalers-dir", str(root / "ESRGAN"))
    yield server
    server.stop()


def test_hires_fix_offers_and_draws_with_the_servers_upscaler_models(browser, upscalers_server):
    """As A1111's Upscaler select: the latent modes, then every name of /sdapi/v1/upscalers, models included (then
    ComfyUI's latent methods)."""
    base = upscalers_server.url
    open_page(browser, base)
    latent = [mode["name"] for mode in http_json(base, "/sdapi/v1/latent-upscale-modes")]
    wait(browser, lambda d: option_values(d, "hr_upscaler") == [*latent, "None", "Lanczos", "Nearest", "tinyx2",
                                                                 *COMFY_METHODS],
         20, f"the hires upscalers are {option_values(browser, 'hr_upscaler')}")
    browser.find_element(By.ID, "enable_hr").click()
    prompt = "a hires square by a model"
    set_value(browser, "prompt", prompt)
    set_value(browser, "steps", 3)
    set_value(browser, "hr_steps", 2)
    choose(browser, "hr_upscaler", value="tinyx2")
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results img.result"), message="no result")
    job = job_by_prompt(base, prompt)
    assert job["request"]["hr_upscaler"] == "tinyx2" and "Hires upscaler: tinyx2" in job["infotexts"][0]


def test_clip_skip_and_variation_seed_reach_the_job(page, base_url):
    assert value(page, "clip_skip") == "1" and not checked(page, "seed-extra")
    assert not page.find_element(By.ID, "seed-extra-options").is_displayed()
    page.find_element(By.ID, "seed-extra").click()
    assert (value(page, "subseed"), value(page, "subseed_strength")) == ("-1", "0")
    prompt = "a varied blue circle"
    set_value(page, "prompt", prompt)
    set_value(page, "steps", 3)
    set_value(page, "seed", 6)
    set_value(page, "batch_size", 2)
    set_value(page, "clip_skip", 2)
    set_value(page, "subseed", 8)
    set_slider(page, "subseed_strength", 0.25)
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img.result")) == 2, message="no result")
    job = job_by_prompt(base_url, prompt)
    assert (job["request"]["clip_skip"], job["request"]["subseed"], job["request"]["subseed_strength"]) == (2, 8, 0.25)
    for index, infotext in enumerate(job["infotexts"]):        # every picture keeps the seed, subseeds count up
        for field in ("Seed: 6", f"Variation seed: {8 + index}", "Variation seed strength: 0.25", "Clip skip: 2"):
            assert field in infotext, (field, infotext)
    # unticked, the variation seed is left out (the values stay for the next time)
    page.find_element(By.ID, "seed-extra").click()
    sent = page.execute_script("return collectRequest()")
    assert "subseed" not in sent and "subseed_strength" not in sent and sent["clip_skip"] == 2


def test_reuse_of_a_hires_job_fills_the_hires_fix(page, base_url):
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "a hires reuse", "steps": 2, "seed": 3,
                                                               "hr_scale": 1.5, "hr_steps": 2, "hr_denoise": 0.6,
                                                               "hr_upscaler": "Nearest"})["id"])
    assert job["status"] == "done", job
    reuse(page, base_url, job["id"])
    wait(page, lambda d: checked(d, "enable_hr"), 10, "the hires fix is not ticked")
    assert (value(page, "hr_scale"), value(page, "hr_steps"), value(page, "hr_denoise"), value(page, "hr_upscaler"),
            value(page, "hr_width"), value(page, "hr_height")) == ("1.5", "2", "0.6", "Nearest", "0", "0")
    assert value(page, "prompt") == "a hires reuse" and text(page, "notice") == ""
    assert page.find_element(By.ID, "hires-options").is_displayed()


def test_a_dropped_png_fills_hires_clip_skip_and_variation_and_names_the_rest(page, base_url):
    parameters = ("a red apple\nSteps: 4, Sampler: Euler, Schedule type: Uniform, CFG scale: 5, Seed: 3, Size: 64x48, "
                  "Model hash: 0123456789, Clip skip: 2, Variation seed: 9, Variation seed strength: 0.4, "
                  "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent, ENSD: 31337, "
                  "Mask blur: 3, Face restoration: CodeFormer, RNG: GPU, "
                  'ControlNet 0: "Module: canny, Model: control_canny [abc]", Version: v1.10.0')
    drop_file(page, png_with_parameters(parameters), "apple.png")
    wait(page, lambda d: text(d, "notice").startswith("Settings read from apple.png"), 20, "the PNG was not read")
    notice = text(page, "notice")
    # a ControlNet unit whose model the server has not: named, its unit filled but not enabled
    for note in ("Face restoration: CodeFormer", 'ControlNet 0 model "control_canny [abc]"'):
        assert note in notice, (note, notice)
    assert not checked(page, "cn0_enabled") and value(page, "cn0_module") == "canny"
    for applied_or_no_op in ("Model hash", "Version", "RNG", "Hires", "hires", "Clip skip", "clip skip", "Variation",
                             "variation", "Mask blur", "Steps", "Seed", "ENSD"):
        assert applied_or_no_op not in notice, (applied_or_no_op, notice)
    assert (value(page, "steps"), value(page, "seed"), value(page, "width"), value(page, "height")) == ("4", "3", "64", "48")
    assert value(page, "mask_blur") == "3" and value(page, "sampler") == "Euler" and value(page, "schedule") == "uniform"
    # the hires pass's Denoising strength is the hires fix's, not img2img's
    assert checked(page, "enable_hr") and page.find_element(By.ID, "hires-options").is_displayed()
    assert (value(page, "hr_scale"), value(page, "hr_steps"), value(page, "hr_denoise"), value(page, "hr_upscaler"),
            value(page, "hr_width"), value(page, "hr_height")) == ("2", "2", "0.5", "Latent", "0", "0")
    assert value(page, "strength") == "0.75" and value(page, "clip_skip") == "2"
    assert checked(page, "seed-extra") and (value(page, "subseed"), value(page, "subseed_strength")) == ("9", "0.4")
    assert text(page, "subseed_strength-value") == "0.40" and text(page, "hr_denoise-value") == "0.50"
    assert page.execute_script("return collectRequest().eta_noise_seed_delta") == 31337        # sent, not named

    # a Hires resize fills the resize boxes; an upscaler the server does not offer is named
    drop_file(page, png_with_parameters("a pear\nSteps: 4, Seed: 3, Size: 64x48, Denoising strength: 0.45, "
                                        "Hires resize: 96x0, Hires upscaler: 4x-UltraSharp"), "resized.png")
    wait(page, lambda d: text(d, "notice").startswith("Settings read from resized.png"), 20, "the PNG was not read")
    assert (value(page, "hr_width"), value(page, "hr_height"), value(page, "hr_denoise")) == ("96", "0", "0.45")
    assert 'hires upscaler "4x-UltraSharp"' in text(page, "notice")

    # the form's own picture: everything applies, nothing to report
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "a plain one", "steps": 2, "seed": 5})["id"])
    drop_file(page, http_bytes(base_url, job["images"][0]), "plain.png")
    wait(page, lambda d: text(d, "notice").startswith("Settings read from plain.png"), 20, "the PNG was not read")
    assert text(page, "notice") == "Settings read from plain.png" and value(page, "prompt") == "a plain one"
    assert not checked(page, "enable_hr") and not checked(page, "seed-extra") and value(page, "clip_skip") == "1"


def test_reuse_fills_the_clip_skip_and_variation_seed(page, base_url):
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "a varied one", "steps": 2, "seed": 3,
                                                               "clip_skip": 2, "subseed": 8, "subseed_strength": 0.25})["id"])
    assert job["status"] == "done", job
    reuse(page, base_url, job["id"])
    wait(page, lambda d: checked(d, "seed-extra"), 10, "the variation seed is not ticked")
    assert (value(page, "subseed"), value(page, "subseed_strength"), value(page, "clip_skip")) == ("8", "0.25", "2")
    assert value(page, "seed") == "3" and text(page, "notice") == ""
    assert not checked(page, "enable_hr")


def test_generate_sends_the_prompt_as_typed_with_its_lora_tags(page, base_url):
    # spacing and line breaks kept; a tag with a U-Net weight of its own stays for the server to read
    typed = "a red  circle,\n\nBREAK  on white <lora:sdlab-tiny-lcm:te=0.2:unet=1.5>"
    page.find_element(By.ID, "prompt").send_keys(typed)
    set_value(page, "steps", 2)
    set_value(page, "seed", 7)
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: text(d, "progress-text").startswith("Done"), message="the job did not finish")
    job = job_by_prompt(base_url, typed)
    assert job["request"]["loras"] == [] and job["infotexts"][0].startswith(typed)
    assert value(page, "prompt") == typed and page.find_elements(By.CSS_SELECTOR, "#lora-list li") == []


def test_the_schedule_list_names_each_schedule_once(page, base_url):
    labels = page.execute_script("return [...document.getElementById('schedule').options].map((o) => o.text)")
    assert labels[0] == "Automatic" and value(page, "schedule") == ""          # unset: the sampler's own
    assert len(labels) == len(set(labels)), labels
    served = [s["name"] for s in http_json(base_url, "/sdapi/v1/schedulers") if s["name"] != "automatic"]
    assert option_values(page, "schedule") == ["", *served]


def generated(driver, base: str, prompt: str) -> dict:
    """Click Generate and wait for the job the page queued with `prompt` to end."""
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: any(job["request"].get("prompt") == prompt for job in http_json(base, "/api/jobs")["jobs"]),
         20, f"no job with the prompt {prompt!r}")
    return wait_job(base, job_by_prompt(base, prompt)["id"])


def test_seeds_past_two_to_the_53_stay_exact(page, base_url):
    big = 2**53 + 1                                             # a JavaScript number would round it to 2**53
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "a big seed", "steps": 1, "seed": big})["id"])
    reuse(page, base_url, job["id"])
    wait(page, lambda d: value(d, "seed") == str(big), 10, "Reuse did not fill the seed exactly")
    card = page.execute_script("return document.querySelector(arguments[0]).innerText",   # one read: the gallery
                               f'#gallery [data-job-id="{job["id"]}"]')                  # is drawn again
    assert f"seed {big}" in card
    set_value(page, "prompt", "a big seed again")
    assert generated(page, base_url, "a big seed again")["request"]["seed"] == big
    # the largest seed the server takes draws; one past it is refused with the range, before any request
    set_value(page, "seed", 2**64 - 1)
    set_value(page, "prompt", "the largest seed")
    largest = generated(page, base_url, "the largest seed")
    assert largest["status"] == "done" and largest["request"]["seed"] == 2**64 - 1 and text(page, "error") == ""
    drop_file(page, png_with_parameters(f"a dropped seed\nSteps: 2, Seed: {2**64 - 2}, Size: 64x64, "
                                        f"Variation seed: {2**60 + 1}, Variation seed strength: 0.5"), "seed.png")
    wait(page, lambda d: value(d, "seed") == str(2**64 - 2), 10, "the PNG's seed was not filled exactly")
    assert value(page, "subseed") == str(2**60 + 1)
    before = _jobs(base_url)
    set_value(page, "seed", 2**64)
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: d.find_element(By.ID, "error").is_displayed(), 10, "no error")
    assert f"from {-2**63} to {2**64 - 1} (-1: random)" in text(page, "error") and _jobs(base_url) == before


def test_a_side_that_is_not_a_multiple_of_8_is_an_error(page, base_url):
    page.find_element(By.ID, "prompt").send_keys("a side of 63")
    before = _jobs(base_url)
    for field, typed, advice in (("width", 63, "use 56 or 64"), ("height", 4, "use 8"), ("hr_width", 100, "use 96 or 104")):
        set_value(page, "width", 64)
        set_value(page, "height", 64)
        if field == "hr_width":
            page.find_element(By.ID, "enable_hr").click()
        set_value(page, field, typed)
        page.find_element(By.ID, "generate").click()
        wait(page, lambda d: "multiple of 8" in text(d, "error"), 10, f"{field} {typed}: no error")
        assert advice in text(page, "error"), text(page, "error")
    assert _jobs(base_url) == before                                    # nothing was sent


INPAINT_BOX = {"resize_mode": "crop", "invert_mask": "true", "inpaint_fill": "latent noise",
               "inpaint_only_masked": "true"}


def png_bytes(size=(64, 64), colour=(30, 60, 160), box=None) -> bytes:
    image = Image.new("RGB", size, colour)
    if box is not None:
        image.paste((255, 255, 255), box)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_the_inpaint_box_reaches_the_job_and_reuse_fills_it(page, base_url):
    page.find_element(By.ID, "tab-inpaint").click()
    drop_file(page, png_bytes(), "init.png", "init-drop")
    wait(page, lambda d: d.find_element(By.ID, "mask-canvas").is_displayed(), 10, "the image was not taken")
    paint_stroke(page, -60, 60)
    for field, option in INPAINT_BOX.items():
        choose(page, field, value=option)
    set_value(page, "inpaint_padding", 8)
    set_value(page, "mask_blur", 2)
    set_value(page, "steps", 2)
    set_value(page, "prompt", "an inpainted one")
    job = generated(page, base_url, "an inpainted one")
    assert job["status"] == "done", job
    request = job["request"]
    assert (request["resize_mode"], request["invert_mask"], request["inpaint_fill"], request["inpaint_only_masked"],
            request["inpaint_padding"], request["mask_blur"]) == ("crop", True, "latent noise", True, 8, 2)

    reuse(page, base_url, job["id"])                                   # a fresh page: the form's defaults first
    wait(page, lambda d: value(d, "prompt") == "an inpainted one", 10, "the settings were not reused")
    assert {field: value(page, field) for field in INPAINT_BOX} == INPAINT_BOX
    assert (value(page, "inpaint_padding"), value(page, "mask_blur"), text(page, "notice")) == ("8", "2", "")


def test_reuse_and_a_dropped_png_name_alike_what_the_form_lacks(page, base_url):
    init = base64.b64encode(png_bytes()).decode()
    mask = base64.b64encode(png_bytes(colour=(0, 0, 0), box=(16, 16, 48, 48))).decode()
    response = httpx.post(base_url + "/sdapi/v1/img2img", timeout=120, json={
        "prompt": "an A1111 inpaint", "steps": 2, "init_images": [init], "mask": mask, "inpainting_mask_invert": 1,
        "inpainting_fill": 2, "inpaint_full_res": True, "inpaint_full_res_padding": 4,
        "initial_noise_multiplier": 0.9})
    assert response.status_code == 200, response.text
    job = job_by_prompt(base_url, "an A1111 inpaint")
    reuse(page, base_url, job["id"])
    wait(page, lambda d: text(d, "notice").startswith("Settings reused"), 10, "no notice")
    reused = text(page, "notice")
    assert "Noise multiplier 0.9" in reused and "Img2img steps" not in reused, reused      # the steps rule is sent
    assert page.execute_script("return collectRequest().img2img_convention") == "a1111"
    assert (value(page, "invert_mask"), value(page, "inpaint_fill"), value(page, "inpaint_only_masked"),
            value(page, "inpaint_padding")) == ("true", "latent noise", "true", "4")
    open_page(page, base_url)
    drop_file(page, http_bytes(base_url, job["images"][0]), "a1111.png")
    wait(page, lambda d: text(d, "notice").startswith("Settings read from a1111.png"), 10, "the PNG was not read")
    assert text(page, "notice").split("; ", 1)[1] == reused.split("; ", 1)[1]
    assert (value(page, "invert_mask"), value(page, "inpaint_fill"), value(page, "inpaint_only_masked"),
            value(page, "inpaint_padding")) == ("true", "latent noise", "true", "4")
    # any other field the form lacks is named once it holds something, unless the form sends it (`KEPT`)
    named = page.execute_script("return settingsNotInForm(arguments[0])",
                                {**job["request"], "original_size": [96, 96], "mask_blur_y": 7, "some_new_field": 3})
    assert {"Mask blur y 7", "some_new_field 3"} <= set(named), named
    assert not any("original_size" in note for note in named), named


def test_reuse_and_a_dropped_png_send_the_sdxl_conditioning_until_the_size_changes(page, base_url):
    """SDXL's size, crop and aesthetic conditioning, which the form has no control for, is recorded in the
    picture's parameters: Reuse of its job and a dropped PNG of it keep it and send it with the form, unnamed,
    until the picture's size is changed."""
    sdxl = {"original_size": [512, 768], "target_size": [64, 72], "crops_coords_top_left": [0, 32],
            "negative_crops_coords_top_left": [8, 0], "aesthetic_score": 7.5}
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "an sdxl reuse", "steps": 2, "seed": 5,
                                                               **sdxl})["id"])
    assert job["status"] == "done", job
    reuse(page, base_url, job["id"])
    wait(page, lambda d: value(d, "prompt") == "an sdxl reuse", 10, "the settings were not reused")
    assert text(page, "notice") == "" and page.execute_script("return collectRequest()").items() >= sdxl.items()
    open_page(page, base_url)
    drop_file(page, http_bytes(base_url, job["images"][0]), "sdxl.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from sdxl.png", 10, "the PNG was not read cleanly")
    assert page.execute_script("return collectRequest()").items() >= sdxl.items()
    set_value(page, "width", 48)
    page.find_element(By.ID, "prompt").click()                        # the width box's change event
    assert not set(page.execute_script("return collectRequest()")) & set(sdxl)


def _pixels_of(base: str, job: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(http_bytes(base, job["images"][0]))))


def test_reuse_of_a_comfyui_spelt_job_draws_the_same_picture(page, base_url):
    """A job whose sampler is spelt as ComfyUI spells it ("euler_ancestral") is recorded as "Euler a" with the
    conventions that spelling chose (ENSD 1, ComfyUI's initial noise, img2img steps and empty negative). Reuse,
    and a dropped PNG of it, keep them and send them back with the form, so Generate draws the same picture;
    picking another sampler or schedule lets them go."""
    prompt = "a comfy reuse"
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": prompt, "steps": 3, "seed": 5,
                                                               "sampler": "euler_ancestral"})["id"])
    assert job["status"] == "done", job
    reuse(page, base_url, job["id"])
    wait(page, lambda d: value(d, "prompt") == prompt, 10, "the settings were not reused")
    assert (value(page, "sampler"), text(page, "notice")) == ("Euler a", "")
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: len([j for j in http_json(base_url, "/api/jobs")["jobs"] if j["request"].get("prompt") == prompt])
         == 2, 20, "the form queued no job")
    again = wait_job(base_url, job_by_prompt(base_url, prompt)["id"])
    assert again["id"] != job["id"] and again["status"] == "done", again
    assert np.array_equal(_pixels_of(base_url, again), _pixels_of(base_url, job))
    choose(page, "sampler", value="Euler")
    assert page.execute_script("return keptRequest()") == {}

    drop_file(page, http_bytes(base_url, job["images"][0]), "comfy.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from comfy.png", 20, "the PNG was not read cleanly")
    # no zero_empty_negative: the tiny model's family encodes an empty negative anyway (no `Empty negative` label)
    assert page.execute_script("return keptRequest()") == {"eta_noise_seed_delta": 1, "init_noise": "comfyui"}
    choose(page, "schedule", value="karras")
    assert page.execute_script("return keptRequest()") == {}


def test_a_dropped_png_of_a_cfg_pp_picture_recorded_under_forges_label_draws_it_again(page, base_url):
    """`euler_cfg_pp` is recorded under its Forge twin's label, "Euler CFG++", with the initial noise its spelling
    chose ("Initial noise: comfyui"); a dropped PNG of it keeps that and sends it with the form, so Generate
    draws the same picture, where the label alone starts from A1111's sigma_max and draws another."""
    prompt = "a cfg++ drop"
    job = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": prompt, "steps": 3, "seed": 5,
                                                               "sampler": "euler_cfg_pp"})["id"])
    assert job["status"] == "done" and job["request"]["sampler"] == "Euler CFG++", job
    label_alone = wait_job(base_url, http_json(base_url, "/api/jobs", {"prompt": "a cfg++ label", "steps": 3,
                                                                       "seed": 5, "sampler": "Euler CFG++"})["id"])
    assert not np.array_equal(_pixels_of(base_url, label_alone), _pixels_of(base_url, job))
    open_page(page, base_url)
    drop_file(page, http_bytes(base_url, job["images"][0]), "cfgpp.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from cfgpp.png", 20, "the PNG was not read cleanly")
    assert value(page, "sampler") == "Euler CFG++"
    assert page.execute_script("return keptRequest()") == {"init_noise": "comfyui"}
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: len([j for j in http_json(base_url, "/api/jobs")["jobs"] if j["request"].get("prompt") == prompt])
         == 2, 20, "the form queued no job")
    again = wait_job(base_url, job_by_prompt(base_url, prompt)["id"])
    assert again["id"] != job["id"] and again["status"] == "done", again
    assert np.array_equal(_pixels_of(base_url, again), _pixels_of(base_url, job))


def test_reuse_of_an_a1111_job_picks_the_schedules_its_request_records(page, base_url):
    """A job's request records sdlab's names of A1111's schedules ("ddim_uniform", "a1111_beta"); the Schedule and
    Hires schedule lists name them as `/sdapi/v1/schedulers` does ("ddim", "Beta") with those names as aliases,
    so Reuse picks them and Generate draws the same picture."""
    prompt = "an a1111 ddim reuse"
    http_json(base_url, "/sdapi/v1/txt2img", {
        "prompt": prompt, "steps": 2, "seed": 4, "width": 64, "height": 64, "sampler_name": "Euler",
        "scheduler": "ddim", "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 2,
        "hr_sampler_name": "Euler", "hr_scheduler": "Beta", "denoising_strength": 0.6})
    job = job_by_prompt(base_url, prompt)
    assert (job["request"]["schedule"], job["request"]["hr_schedule"]) == ("ddim_uniform", "a1111_beta")
    reuse(page, base_url, job["id"])
    wait(page, lambda d: value(d, "prompt") == prompt, 10, "the settings were not reused")
    assert (value(page, "schedule"), value(page, "hr_schedule"), text(page, "notice")) == ("ddim", "Beta", "")
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: job_by_prompt(base_url, prompt)["id"] != job["id"], 20, "the form queued no job")
    again = wait_job(base_url, job_by_prompt(base_url, prompt)["id"])
    assert again["status"] == "done", again
    assert np.array_equal(_pixels_of(base_url, again), _pixels_of(base_url, job))


def test_reuse_of_an_a1111_job_drawn_without_extra_networks_draws_it_again(page, base_url):
    """An A1111 job drawn with `disable_extra_networks` records its prompt with the tags and the flag: Reuse keeps
    the flag under "Override settings" and Generate draws the same picture, the tags again unapplied (a LoRA the
    server does not have no 404)."""
    prompt = "an unapplied reuse <lora:nothere:1>"
    http_json(base_url, "/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "seed": 4, "width": 64, "height": 64,
                                              "disable_extra_networks": True})
    job = job_by_prompt(base_url, prompt)
    reuse(page, base_url, job["id"])
    wait(page, lambda d: value(d, "prompt") == prompt, 10, "the settings were not reused")
    assert page.execute_script("return keptRequest()")["disable_extra_networks"] is True
    assert text(page, "notice") == ""
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: job_by_prompt(base_url, prompt)["id"] != job["id"], 20, "the form queued no job")
    again = wait_job(base_url, job_by_prompt(base_url, prompt)["id"])
    assert again["status"] == "done", again
    assert np.array_equal(_pixels_of(base_url, again), _pixels_of(base_url, job))


@pytest.mark.parametrize("typed", ["", "abc"])
def test_an_empty_or_mistyped_lora_weight_is_an_error_not_weight_0(page, base_url, typed):
    """The LoRA box's Weight and a listed LoRA's weight take a number: an emptied box or text is one error naming
    the box, never the LoRA at weight 0 (A1111's `<lora:name>` is weight 1)."""
    page.execute_script("fillSelect($('lora'), [{label: 'wobble', value: 'wobble'}]); $('lora-add').disabled = false;")
    choose(page, "lora", value="wobble")
    set_value(page, "lora-weight", typed)
    page.find_element(By.ID, "lora-add").click()
    assert text(page, "error").startswith("Weight:") and page.execute_script("return state.loras") == []
    set_value(page, "lora-weight", "0.7")
    page.find_element(By.ID, "lora-add").click()
    assert page.execute_script("return state.loras") == [{"name": "wobble", "weight": 0.7}] and text(page, "error") == ""
    set_value(page, "lora-weight-0", typed)
    before = _jobs(base_url)
    page.find_element(By.ID, "generate").click()
    wait(page, lambda d: text(d, "error"), 10, "no error")
    assert text(page, "error").startswith("Weight of wobble:") and _jobs(base_url) == before


def test_mask_blur_starts_at_4_and_a_picture_without_one_sets_0(page):
    """A1111's inpaint tab starts Mask blur at 4 and writes it only above 0: a dropped img2img / inpaint picture
    without the label was drawn with none, one with it at its value; a txt2img picture leaves the box as it is."""
    assert value(page, "mask_blur") == "4"
    for settings, blur in (("Denoising strength: 0.5, Mask blur: 3", "3"), ("Denoising strength: 0.5", "0"), ("", "7")):
        if not settings:
            page.execute_script("document.getElementById('mask_blur').value = 7")     # the inpaint tab's box
        drop_file(page, png_with_parameters(f"a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64, {settings}"),
                  "drawn.png")
        wait(page, lambda d: text(d, "notice").startswith("Settings read from"), 20, "the PNG was not read")
        assert value(page, "mask_blur") == blur, settings
        page.execute_script("showNotice('')")


def _mask_file(mode: str, size: tuple[int, int]) -> Image.Image:
    """A mask picture with a box to repaint: white (half grey at its right) on black, an opaque box on a
    transparent picture (its colour black), or a half-transparent white box (LA: its alpha is not read)."""
    box, w, h = (8, 16, 40, 48), *size
    box = tuple(v * w // 64 if i % 2 == 0 else v * h // 64 for i, v in enumerate(box))
    mask = Image.new(mode, size, {"L": 0, "RGBA": (255, 255, 255, 0), "LA": (0, 0)}[mode])
    mask.paste({"L": 255, "RGBA": (0, 0, 0, 255), "LA": (255, 100)}[mode], box)
    if mode == "L":
        mask.paste(128, (box[2], box[1], box[2] + w // 4, box[3]))
    return mask


def test_a_mask_file_and_the_jobs_sent_with_it_read_the_mask_without_a_canvas_warning(page, base_url, tmp_path):
    """The mask canvas is read back when a mask file loads and again for each job sent: Chrome logged 'Canvas2D:
    Multiple readback operations using getImageData are faster with the willReadFrequently attribute set to true'
    by the second; its context is made with willReadFrequently."""
    page.find_element(By.ID, "tab-inpaint").click()
    drop_file(page, png_bytes(), "init.png", "init-drop")
    wait(page, lambda d: d.find_element(By.ID, "mask-canvas").is_displayed(), 10, "the image was not taken")
    for size in ((64, 64), (32, 32)):                      # a mask file loaded again reads the canvas again
        _mask_file("L", size).save(tmp_path / "mask.png")
        page.execute_script("state.maskPainted = false")
        page.find_element(By.ID, "mask-file").send_keys(str(tmp_path / "mask.png"))
        wait(page, lambda d: d.execute_script("return state.maskPainted"), 10, "no mask")
    page.execute_script("maskDataUrl()")                    # as Generate reads it
    warnings = [entry["message"] for entry in page.get_log("browser") if "willReadFrequently" in entry["message"]]
    assert warnings == []
    assert page.execute_script("return document.getElementById('mask-canvas').getContext('2d')"
                               ".getContextAttributes().willReadFrequently") is True


@pytest.mark.parametrize(("mode", "size"), [("L", (64, 64)), ("L", (32, 32)), ("L", (64, 32)), ("RGBA", (64, 64)),
                                            ("LA", (48, 48))])
def test_a_mask_file_is_the_mask_the_form_sends(page, base_url, tmp_path, mode, size):
    """A1111's Inpaint upload: the mask file loaded is sent as it is, read by the server as an API mask (an RGBA
    picture's transparency, its own size blurred then resized by the resize mode); the job drawn with it is the
    job of the same file sent to the API."""
    page.find_element(By.ID, "tab-inpaint").click()
    drop_file(page, png_bytes(), "init.png", "init-drop")
    wait(page, lambda d: d.find_element(By.ID, "mask-canvas").is_displayed(), 10, "the image was not taken")
    _mask_file(mode, size).save(tmp_path / "mask.png")
    page.find_element(By.ID, "mask-file").send_keys(str(tmp_path / "mask.png"))
    wait(page, lambda d: d.execute_script("return state.maskPainted"), 10, "no mask")
    prompt = f"a masked one {mode} {size}"
    set_value(page, "steps", 2)
    set_value(page, "seed", 3)
    set_value(page, "prompt", prompt)
    job = generated(page, base_url, prompt)
    assert job["status"] == "done", job
    body = {key: job["request"][key] for key in ("prompt", "seed", "steps", "mask_blur", "sampler", "strength")}
    direct = wait_job(base_url, http_json(base_url, "/api/jobs", {
        **body, "mode": "inpaint", "init_image": base64.b64encode(png_bytes()).decode(),
        "mask_image": base64.b64encode((tmp_path / "mask.png").read_bytes()).decode()})["id"])
    assert np.array_equal(_pixels_of(base_url, job), _pixels_of(base_url, direct))
