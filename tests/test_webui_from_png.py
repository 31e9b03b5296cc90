"""A picture dropped on the web UI draws what `sdlab txt2img --from-png` draws of it, in a real headless browser
(the helpers and fixtures of test_webui.py): the page fills its form from the server's reader of parameters
(`POST /api/parameters`, the `infotext.from_parameters` that --from-png reads with: A1111's schedule for its
sampler, its RNG and clip skip rule, ENSD, eta, churn and schedule overrides, a ComfyUI spelling's conventions,
SDXL's sizes) and sends what it has no control for with the form, as it does for a reused job."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdlab.cli import main
from sdlab.pipeline import infotext
from sdlab.server.native import SIGMA_OPTIONS, JobIn
from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, choose, click_card_button, base_url, browser, drop_file, http_bytes, http_json, page, png_with_parameters,
    sdlab_server, set_value, text, value, wait, wait_job,
)

PICTURES = {
    # A1111 1.10: "Automatic" is Euler a's uniform schedule, no RNG label is A1111's GPU, Clip skip 2 by A1111's rule
    "a1111-euler-a.png": "a red cube on a table\nNegative prompt: green sphere\nSteps: 6, Sampler: Euler a, "
                         "Schedule type: Automatic, CFG scale: 5, Seed: 31, Size: 64x64, Model hash: 16881d0066, "
                         "Model: sdlab-tiny, Clip skip: 2, ENSD: 31337, Version: v1.10.1",
    # DDIM on A1111's fixed timesteps with its eta, no Schedule type (before 1.9)
    "a1111-ddim.png": "a blue ball on grass\nNegative prompt:\nblurry\nSteps: 5, Sampler: DDIM, CFG scale: 6, "
                      "Seed: 7, Size: 64x48, Eta DDIM: 0.4, Clip skip: 2, Version: v1.6.0",
    # A1111 before 2023: a first pass at First pass size, then the hires pass to Size
    "a1111-old-hires.png": "an old hires castle\nSteps: 3, Sampler: Euler, CFG scale: 5, Seed: 9, Size: 64x64, "
                           "First pass size: 32x32, Denoising strength: 0.6, Version: v1.0.0-pre",
    # A1111's Sigma churn / tmin / noise options (Euler takes them) and its schedule's rho and discarded sigma
    "a1111-churn.png": "a yellow star\nSteps: 5, Sampler: Euler, Schedule type: Karras, CFG scale: 5, Seed: 11, "
                       "Size: 64x64, Sigma churn: 0.8, Sigma tmin: 0.2, Sigma noise: 0.9, Schedule rho: 3, "
                       "Discard penultimate sigma: True, Version: v1.10.1",
    # sdlab's record of a ComfyUI-spelt sampler (ENSD 1, ComfyUI's initial noise) with SDXL's size conditioning
    "sdlab-comfy.png": "a green tree\nSteps: 4, Sampler: Euler a, Schedule type: Karras, CFG scale: 4, Seed: 3, "
                       "Size: 48x64, ENSD: 1, RNG: NV, Initial noise: comfyui, SDXL original size: 768x512, "
                       "SDXL crop top: 16, SDXL aesthetic score: 7, Version: sdlab 0.1.0",
}


def _from_png(path, out, monkeypatch) -> dict:
    """The request `sdlab txt2img --from-png PATH` resolves and draws (its `parameters()`), caught where the CLI
    writes the picture's parameters."""
    drawn = []

    def recording(request, **kwargs):
        drawn.append(request)
        return to_parameters(request, **kwargs)

    to_parameters = infotext.to_parameters
    monkeypatch.setattr(infotext, "to_parameters", recording)
    assert main(["txt2img", "--from-png", str(path), "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    return json.loads(json.dumps(drawn[0].parameters()))          # as the job's record holds it: tuples as lists


@pytest.mark.parametrize("name", PICTURES)
def test_a_dropped_picture_draws_the_request_from_png_draws(page, base_url, tmp_path, monkeypatch, name):
    picture = tmp_path / name
    picture.write_bytes(png_with_parameters(PICTURES[name]))
    prompt = PICTURES[name].split("\n", 1)[0]
    before = {job["id"] for job in http_json(base_url, "/api/jobs")["jobs"]}
    drop_file(page, picture.read_bytes(), name)
    wait(page, lambda d: text(d, "notice") == f"Settings read from {name}", 20, "the PNG was not read cleanly")
    assert value(page, "prompt") == prompt
    page.find_element(By.ID, "generate").click()
    queued = wait(page, lambda d: [j for j in http_json(base_url, "/api/jobs")["jobs"] if j["id"] not in before], 20,
                  "the form queued no job")[0]
    job = wait_job(base_url, queued["id"])
    assert job["status"] == "done", job

    cli = _from_png(picture, tmp_path / "from-png.png", monkeypatch)
    web = {key: value for key, value in job["request"].items() if key not in ("mode", "model", "loras")}
    assert web == cli
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(http_bytes(base_url, job["images"][0])))),
                          np.asarray(Image.open(tmp_path / "from-png.png")))


def test_churn_goes_with_the_sampler_and_the_schedule_overrides_with_the_schedule(page):
    """A dropped picture's churn and noise scale are sent until another sampler is picked, its schedule's ends,
    rho and discarded sigma until another sampler or schedule is."""
    drop_file(page, png_with_parameters(PICTURES["a1111-churn.png"]), "a1111-churn.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from a1111-churn.png", 20, "the PNG was not read cleanly")
    churn = {"s_churn": 0.8, "s_tmin": 0.2, "s_noise": 0.9}

    def kept() -> dict:
        sent = page.execute_script("return keptRequest()")
        return {key: sent[key] for key in SIGMA_OPTIONS if key in sent}

    assert kept() == {**churn, "schedule_rho": 3, "discard_penultimate_sigma": True}
    choose(page, "schedule", value="exponential")
    assert kept() == churn
    choose(page, "sampler", value="Heun")
    assert kept() == {}


def test_the_reader_answers_the_settings_from_png_reads_and_names_the_rest(base_url):
    a1111 = ("a cat\nSteps: 4, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, Emphasis: No norm, "
             'ControlNet 0: "Module: canny, Model: control_canny [abc]", Model hash: 0123456789, Version: v1.10.1')
    answer = http_json(base_url, "/api/parameters", {"image": base64.b64encode(png_with_parameters(a1111)).decode()})
    assert answer["info"] == a1111
    assert answer["settings"]["schedule"] == "ddim"                 # ddim_uniform as /sdapi/v1/schedulers names it
    assert {key: answer["settings"][key] for key in ("sampler", "clip_skip_convention", "rng", "emphasis")} == {
        "sampler": "DDIM", "clip_skip_convention": "a1111", "rng": "GPU", "emphasis": "No norm"}
    # the ControlNet unit's line is read as a native `controls` entry (its picture the page's to give)
    assert answer["settings"]["controls"] == [{"model": "control_canny [abc]", "module": "canny"}]
    assert answer["unread"] == []
    # a line with a preprocessor sdlab has not is named unread, the others read
    depth = a1111.replace("Emphasis", 'ControlNet 1: "Module: depth_midas, Model: control_depth [def]", Emphasis')
    answer = http_json(base_url, "/api/parameters", {"image": base64.b64encode(png_with_parameters(depth)).decode()})
    assert answer["settings"]["controls"] == [{"model": "control_canny [abc]", "module": "canny"}]
    assert answer["unread"] == ["ControlNet 1: Module: depth_midas, Model: control_depth [def]"]


@pytest.mark.parametrize("hires, listed", [("Hires sampler: DDIM", "ddim"), ("Hires schedule type: Beta", "Beta"),
                                           ("Hires schedule type: KL Optimal", "KL Optimal")])
def test_the_readers_hires_schedule_is_named_as_the_schedulers_list_names_it(base_url, hires, listed):
    """The form's hires schedule choices are `/sdapi/v1/schedulers`' names, as its schedule's are: a hires DDIM's
    ddim_uniform is "ddim", A1111's Beta and KL Optimal are theirs."""
    a1111 = (f"a cat\nSteps: 4, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 64x64, "
             f"Denoising strength: 0.5, Hires upscale: 2, {hires}, Version: v1.10.1")
    answer = http_json(base_url, "/api/parameters", {"image": base64.b64encode(png_with_parameters(a1111)).decode()})
    assert answer["settings"]["hr_schedule"] == listed
    assert listed in {row["name"] for row in http_json(base_url, "/sdapi/v1/schedulers")}


def test_another_programs_picture_is_named_and_leaves_the_form_as_it_was(page, tmp_path):
    comfy = tmp_path / "comfy.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", '{"3": {"class_type": "KSampler", "inputs": {"seed": 5}}}')
    Image.new("RGB", (64, 64)).save(comfy, pnginfo=info)
    drop_file(page, comfy.read_bytes(), "comfy.png")
    wait(page, lambda d: d.find_element(By.ID, "error").is_displayed(), 20, "no error")
    assert "comfy.png" in text(page, "error") and "ComfyUI's workflow" in text(page, "error")
    assert value(page, "prompt") == "" and text(page, "notice") == ""


# The page's defaults of the request fields it has no control for, read from app.js as the browser evaluates it
PAGE_TABLES = """return {
  kept: Object.fromEntries(Object.entries(KEPT).map(([key, entry]) => [key, entry.none])),
  notInForm: Object.fromEntries(Object.entries(NOT_IN_FORM).map(([key, entry]) => [key, entry.none])),
  controls: [...document.querySelectorAll("#settings [id]")].map((element) => element.id),
  apart: [...KEPT_APART],
  seedRange: [String(MIN_SEED), String(MAX_SEED)],
};"""


def test_every_field_the_api_takes_reaches_the_job_with_the_apis_defaults(page):
    """Each field of the native API's request is a control of the form, one it keeps and sends (`KEPT`, its
    default the API's) or one it takes apart (mode, model, LoRAs, ...); the request fields the API does not take
    are named in the notice by `NOT_IN_FORM`, its defaults `GenerationRequest`'s. The page's seed range is
    Python's (`request.MIN_SEED`, `MAX_SEED`)."""
    from sdlab.pipeline.request import MAX_SEED, MIN_SEED, GenerationRequest
    from sdlab.server.inputs import JobSpec

    js = page.execute_script(PAGE_TABLES)
    for field, spec in JobIn.model_fields.items():
        if field in js["kept"]:
            default = spec.default
            assert (list(default) if isinstance(default, tuple) else default) == js["kept"][field], field
        else:
            assert field in js["controls"] or field in js["apart"] or field in (
                "init_image", "mask_image", "controls", "preset", "ip_adapters"), field   # no IP-Adapter control yet
    request = {f.name: f.default for f in dataclasses.fields(GenerationRequest)}
    request["batch_count"] = JobSpec.batch_count
    for field, none in js["notInForm"].items():
        assert field not in JobIn.model_fields, field
        assert request[field] == none, field
    assert js["seedRange"] == [str(MIN_SEED), str(MAX_SEED)]


def test_every_field_the_page_keeps_is_one_the_api_takes(page):
    """The page sends each `KEPT` field with the form's requests: the native API must take it (a field it lacks
    would refuse every request after a Reuse or a PNG drop that keeps it)."""
    kept = page.execute_script(PAGE_TABLES)["kept"]
    assert sorted(set(kept) - set(JobIn.model_fields)) == []


def test_a_dropped_unipc_picture_draws_again_with_its_options(page, base_url):
    """A1111's UniPC options, which its picture records, are settings the page keeps and the native API takes."""
    drawn = http_json(base_url, "/sdapi/v1/txt2img", {
        "prompt": "a red cube", "steps": 2, "seed": 5, "width": 64, "height": 64, "sampler_name": "UniPC",
        "override_settings": {"uni_pc_variant": "bh2", "uni_pc_order": 2, "uni_pc_lower_order_final": False}})
    before = {job["id"] for job in http_json(base_url, "/api/jobs")["jobs"]}
    drop_file(page, base64.b64decode(drawn["images"][0]), "unipc.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from unipc.png", 20, "the PNG was not read cleanly")
    page.find_element(By.ID, "generate").click()
    queued = wait(page, lambda d: [j for j in http_json(base_url, "/api/jobs")["jobs"] if j["id"] not in before]
                  or text(d, "error"), 20, "the form queued no job")
    assert isinstance(queued, list), queued
    job = wait_job(base_url, queued[0]["id"])
    assert {key: job["request"][key] for key in ("unipc_variant", "unipc_order", "unipc_lower_order_final")} == {
        "unipc_variant": "bh2", "unipc_order": 2, "unipc_lower_order_final": False}
    assert job["infotexts"][0].split("\n")[-1] == json.loads(drawn["info"])["infotexts"][0].split("\n")[-1]


def test_a_dropped_picture_with_a_hires_ddims_own_eta_draws_again_with_it(page, base_url):
    """A1111's hires DDIM behind another sampler draws at its eta_ddim option, recorded as `Eta DDIM`: the page keeps
    it (`hr_eta`) and the native API takes it."""
    drawn = http_json(base_url, "/sdapi/v1/txt2img", {
        "prompt": "a red cube", "steps": 6, "seed": 5, "width": 64, "height": 64, "sampler_name": "Euler a",
        "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 4, "denoising_strength": 0.6,
        "hr_sampler_name": "DDIM", "override_settings": {"eta_ddim": 0.6}})
    assert "Eta DDIM: 0.6" in json.loads(drawn["info"])["infotexts"][0]
    before = {job["id"] for job in http_json(base_url, "/api/jobs")["jobs"]}
    drop_file(page, base64.b64decode(drawn["images"][0]), "hires.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from hires.png", 20, "the PNG was not read cleanly")
    page.find_element(By.ID, "generate").click()
    queued = wait(page, lambda d: [j for j in http_json(base_url, "/api/jobs")["jobs"] if j["id"] not in before]
                  or text(d, "error"), 20, "the form queued no job")
    assert isinstance(queued, list), queued
    job = wait_job(base_url, queued[0]["id"])
    assert (job["request"]["eta"], job["request"]["hr_eta"]) == (None, 0.6)
    assert job["infotexts"][0].split("\n")[-1] == json.loads(drawn["info"])["infotexts"][0].split("\n")[-1]


def test_a_dropped_picture_with_clip_skip_sdxl_keeps_it(page):
    """sdlab's `Clip skip SDXL` (A1111's sdxl_clip_l_skip option) is a setting the page keeps and sends with the clip
    skip and its rule, not one it names as unavailable and draws without."""
    parameters = ("a red cube\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64, Clip skip: 2, "
                  "Clip skip rule: a1111, Clip skip SDXL: True, Version: sdlab 0.1.0")
    drop_file(page, png_with_parameters(parameters), "clip-l.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from clip-l.png", 20, "the PNG was not read cleanly")
    sent = page.execute_script("return collectRequest()")
    assert {key: sent.get(key) for key in ("clip_skip", "clip_skip_convention", "sdxl_clip_l_skip")} == {
        "clip_skip": 2, "clip_skip_convention": "a1111", "sdxl_clip_l_skip": True}


KEPT_SHOWN = "return [...document.querySelectorAll('#kept-list li')].map((li) => li.textContent)"


def test_the_chips_are_the_kept_settings_the_tab_sends(page):
    """LCM's img2img steps rule does not inpaint (the inpaint tab leaves it out of the request): its chip goes in
    that tab and comes back in img2img's, so the chips are always what the form sends."""
    drop_file(page, png_with_parameters("a cat\nSteps: 4, Sampler: LCM, CFG scale: 1, Seed: 1, Size: 64x64, "
                                        "Denoising strength: 0.5, Img2img steps: lcm"), "lcm.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from lcm.png", 20, "the PNG was not read cleanly")
    for tab in ("inpaint", "img2img"):
        page.find_element(By.ID, f"tab-{tab}").click()
        keys = page.execute_script("return [...document.querySelectorAll('#kept-list li')].map((li) => li.dataset.key)")
        assert sorted(keys) == sorted(page.execute_script("return keptRequest()")), tab
        assert ("img2img_convention" in keys) == (tab == "img2img"), tab


def test_kept_settings_are_shown_as_removable_chips_and_go_with_the_form(page, base_url):
    """What the form keeps of a dropped picture without a control of its own (A1111's NGMS, Skip Early CFG, Noise
    Schedule, Emphasis, its clip skip, img2img steps and ControlNet step rules) shows under "Override settings", one
    chip each, as A1111 shows a pasted picture's: the chips are what the form sends, whatever else is typed, until
    removed; a reload forgets them with the rest of the form, so no setting ever acts unseen."""
    a1111 = ("an old photo\nSteps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 5, Seed: 1, Size: 64x64, "
             "NGMS: 1.5, Skip Early CFG: 0.4, Noise Schedule: Zero Terminal SNR, Emphasis: No norm, Version: v1.10.1")
    assert page.execute_script("return Object.values(KEPT).filter((entry) => !entry.name)") == []
    assert not page.find_element(By.ID, "kept").is_displayed()
    drop_file(page, png_with_parameters(a1111), "old.png")
    wait(page, lambda d: text(d, "notice") == "Settings read from old.png", 20, "the PNG was not read cleanly")
    shown = [f"{chip}\u00d7" for chip in ("Img2img steps: a1111", "NGMS: 1.5", "Skip Early CFG: 0.4", "Clip skip rule: a1111",
                                          "Control steps: a1111", "Emphasis: No norm",
                                          "Noise Schedule: Zero Terminal SNR")]
    assert page.find_element(By.ID, "kept").is_displayed() and page.execute_script(KEPT_SHOWN) == shown
    set_value(page, "prompt", "a (blue:1.3) house, a prompt of my own")
    set_value(page, "seed", 42)
    sent = page.execute_script("return collectRequest()")
    assert {key: sent[key] for key in ("s_min_uncond", "skip_early_cond", "clip_skip_convention", "emphasis",
                                       "zero_terminal_snr")} == {
        "s_min_uncond": 1.5, "skip_early_cond": 0.4, "clip_skip_convention": "a1111", "emphasis": "No norm",
        "zero_terminal_snr": True}
    click_card_button(page, '#kept-list li[data-key="zero_terminal_snr"]', "remove-kept")
    assert page.execute_script(KEPT_SHOWN) == shown[:-1]
    assert "zero_terminal_snr" not in page.execute_script("return collectRequest()")
    page.refresh()
    wait(page, lambda d: len(d.execute_script("return [...document.getElementById('sampler').options]")) > 1, 30)
    assert page.execute_script(KEPT_SHOWN) == [] and not page.find_element(By.ID, "kept").is_displayed()
    assert page.execute_script("return keptRequest()") == {}
