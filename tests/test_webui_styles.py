"""The web UI's prompt styles and a script picture's script, in a real headless browser (the helpers and fixtures of
test_webui.py, on a server of its own with a styles file): the Styles list holds the server's styles (GET
/sdapi/v1/prompt-styles), a job drawn with some draws the styled prompts and Reuse restores them, a dropped picture
has its styles taken out of its prompts (POST /api/parameters, as /sdapi/v1/png-info), and a dropped X/Y/Z plot or
Loopback picture selects its script again."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from server_fixtures import start_server
from test_webui import (  # noqa: F401  (fixtures: browser, page; the session's sdlab_server)
    By, click_card_button, choose, selected, generate_and_finish, browser, drop_file, http_bytes, http_json, open_page,
    option_values, page, png_with_parameters, sdlab_server, set_value, text, value, wait, wait_job,
)

from sdlab.pipeline.styles import StyleDatabase

STYLES_CSV = ('name,prompt,negative_prompt\n'
              'cinematic,"{prompt}, film grain",blurry\n'
              'ink,"ink drawing, monochrome",\n')


@pytest.fixture(scope="module")
def styled_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("webui-styles")
    (folder / "styles.csv").write_text(STYLES_CSV, encoding="utf-8")
    server = start_server(folder / "out", "--styles-file", str(folder / "styles.csv"))
    yield server, StyleDatabase.load([folder / "styles.csv"]), folder / "styles.csv"
    server.stop()


@pytest.fixture(scope="module")
def base_url(styled_server) -> str:            # the page fixture's server: this module's
    return styled_server[0].url


@pytest.fixture(scope="module")
def styles(styled_server) -> StyleDatabase:
    return styled_server[1]


def chips(page) -> list[str]:
    """The chosen styles' chips, read in one script: the list is drawn again (renderStyles) as styles change."""
    return page.execute_script("return [...document.querySelectorAll('#style-list li')].map((li) => li.dataset.name)")


def chip_title(page, name: str) -> str:
    return page.execute_script(
        "return document.querySelector(`#style-list [data-name=\"${arguments[0]}\"] span`).title", name)


def choose_styles(page, *names: str) -> None:
    for name in names:
        choose(page, "style-choice", text=name)


def remove_styles(page) -> None:
    """Remove every chip by its button; the chips are drawn again after each, so each click is tried again on them."""
    while chips(page):
        click_card_button(page, "#style-list li", "remove-style")


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_the_styles_list_holds_the_servers_styles_or_says_it_has_none(page, sdlab_server):
    assert option_values(page, "style-choice", "text") == [
        "add a style", "cinematic", "ink"]
    choose_styles(page, "ink", "cinematic", "ink")                  # once each, in the order chosen
    assert chips(page) == ["ink", "cinematic"]
    assert chip_title(page, "cinematic") == "{prompt}, film grain\nNegative: blurry"
    open_page(page, sdlab_server.url)                               # a server without styles
    choice = page.find_element(By.ID, "style-choice")
    wait(page, lambda d: not choice.is_enabled(), 10, "the styles list is not disabled")
    assert option_values(page, "style-choice", "text") == ["no styles (sdlab serve --styles-file)"]


def test_a_job_with_styles_draws_the_styled_prompts_and_reuse_restores_them(page, base_url, styles):
    prompt, names = "a blue circle (styles)", ["ink", "cinematic"]
    set_value(page, "prompt", prompt)
    set_value(page, "negative_prompt", "ugly")
    set_value(page, "steps", 2)
    set_value(page, "seed", 5)
    choose_styles(page, *names)
    page.find_element(By.ID, "generate").click()
    job = wait_job(base_url, wait(page, lambda d: [j for j in http_json(base_url, "/api/jobs")["jobs"]
                                                   if j["request"].get("prompt") == prompt], 30, "no job")[0]["id"])
    assert job["status"] == "done", job
    assert (job["request"]["prompt"], job["request"]["styles"]) == (prompt, names)      # as sent: it draws again
    drawn = job["infotexts"][0].splitlines()
    assert drawn[:2] == [styles.apply(prompt, names), "Negative prompt: " + styles.apply_negative("ugly", names)]
    typed_out = {key: job["request"][key] for key in ("steps", "seed", "sampler", "schedule", "cfg_scale", "width",
                                                      "height", "rng", "clip_skip")}  # the styled prompts sent plain
    plain = wait_job(base_url, http_json(base_url, "/api/jobs", {**typed_out, "prompt": drawn[0],
                                                                 "negative_prompt": "ugly, blurry"})["id"])
    assert np.array_equal(pixels(http_bytes(base_url, job["images"][0])),
                          pixels(http_bytes(base_url, plain["images"][0])))

    remove_styles(page)
    set_value(page, "prompt", "something else")
    card = f'#gallery [data-job-id="{job["id"]}"]'
    click_card_button(page, card, "reuse")
    assert (value(page, "prompt"), value(page, "negative_prompt"), chips(page)) == (prompt, "ugly", names)
    assert text(page, "notice") == ""

    remove_styles(page)                                     # a dropped picture: its styles out of its prompts
    set_value(page, "prompt", "")
    drop_file(page, http_bytes(base_url, job["images"][0]), "styled.png")
    wait(page, lambda d: value(d, "prompt") == prompt, 20, "the picture's prompt is not read")
    assert (value(page, "negative_prompt"), chips(page)) == ("ugly", names)
    assert text(page, "notice") == "Settings read from styled.png"
    drop_file(page, png_with_parameters("a dog\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64"),
              "plain.png")
    wait(page, lambda d: value(d, "prompt") == "a dog", 20, "the plain picture is not read")
    assert chips(page) == names             # none found: the chosen ones stay (A1111's option "Apply if any")


def test_the_xyz_axes_are_those_the_server_draws(page, base_url):
    drawn = [axis["label"] for axis in http_json(base_url, "/api/scripts")["txt2img"]["axes"]]
    offered = wait(page, lambda d: (texts := d.execute_script(
        "return [...document.getElementById('xyz_x_type').options].map((o) => o.text)")) == drawn and texts, 10,
        "the X type list is not GET /api/scripts' axes")
    assert {"Styles", "Checkpoint name", "VAE", "Size", "Refiner checkpoint", "Refiner switch at"} <= set(offered)


def test_a_dropped_xyz_grid_selects_its_plot_and_draws_it_again(page, base_url):
    """The grid of an X/Y/Z plot (POST /sdapi/v1/txt2img) dropped on the page selects the plot with its axes by
    their labels and values; Generate draws the same grid, pixel-equal."""
    a1111 = http_json(base_url, "/sdapi/v1/txt2img", {
        "prompt": "a red square (grid)", "steps": 2, "seed": 9, "sampler_name": "Euler", "cfg_scale": 5,
        "width": 64, "height": 64, "script_name": "x/y/z plot", "script_args": [4, "1,2", [], 6, "3,6"]})
    choose(page, "script", text="None")
    drop_file(page, base64.b64decode(a1111["images"][0]), "grid.png")
    wait(page, lambda d: value(d, "prompt") == "a red square (grid)", 20, "the grid's parameters are not read")
    assert selected(page, "script") == "X/Y/Z plot"
    types = [selected(page, f"xyz_{a}_type") for a in "xyz"]
    assert types == ["Steps", "CFG Scale", "Nothing"]
    assert (value(page, "xyz_x_values"), value(page, "xyz_y_values")) == ("1,2", "3,6")
    page.find_element(By.ID, "generate").click()
    job = wait_job(base_url, wait(page, lambda d: [j for j in http_json(base_url, "/api/jobs")["jobs"]
                                                   if j["request"].get("script_name") == "X/Y/Z plot"], 30,
                                  f"no job; error: {text(page, 'error')}")[0]["id"])
    assert job["status"] == "done" and job["request"]["script_args"][:5] == [4, "1,2", [], 6, "3,6"], job
    assert np.array_equal(pixels(http_bytes(base_url, job["images"][0])),
                          pixels(base64.b64decode(a1111["images"][0])))

    drop_file(page, png_with_parameters("a cat\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64"),
              "plain.png")
    wait(page, lambda d: value(d, "prompt") == "a cat", 20, "the plain picture is not read")
    assert selected(page, "script") == "None"
    drop_file(page, png_with_parameters("a cat\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64, "
                                        "Script: X/Y/Z plot, X Type: Face restore, X Values: True"), "faces.png")
    wait(page, lambda d: "Face restore" in text(d, "notice"), 20, "the axis sdlab lacks is not named")
    assert selected(page, "script") == "None"
    assert 'script "X/Y/Z plot" (X type "Face restore" not here)' in text(page, "notice")


def test_a_dropped_loopback_picture_selects_loopback_in_the_img2img_tab(page):
    page.find_element(By.ID, "tab-img2img").click()
    choose(page, "script", text="Loopback")
    set_value(page, "lb_loops", 3)
    choose(page, "script", text="None")
    drop_file(page, png_with_parameters("a cat\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64, "
                                        "Denoising strength: 0.5, Final denoising strength: 0.25, "
                                        "Denoising curve: Aggressive"), "loop.png")
    wait(page, lambda d: value(d, "prompt") == "a cat", 20, "the picture is not read")
    assert selected(page, "script") == "Loopback"
    assert (value(page, "lb_loops"), value(page, "lb_final_denoising_strength")) == ("3", "0.25")   # loops: unsaid
    assert selected(page, "lb_denoising_curve") == "Aggressive"


def test_an_edited_styles_file_is_listed_when_the_page_is_back_in_focus(page, styled_server):
    """styles.csv edited while the server runs: back on the page (a window focus event) the Styles list holds the
    file as it now is, without a restart or a reload; the chosen styles stay chosen."""
    import os

    path = styled_server[2]

    def edit(text: str) -> None:
        stamp = path.stat().st_mtime_ns + 10**9        # a coarse file system's clock moves on too
        path.write_text(text, encoding="utf-8")
        os.utime(path, ns=(stamp, stamp))

    def listed() -> list[str]:
        return option_values(page, "style-choice", "text")

    choose_styles(page, "ink")
    edit(STYLES_CSV + "neon,neon lights,dark\n")
    try:
        page.execute_script("window.dispatchEvent(new Event('focus'))")
        wait(page, lambda d: listed() == ["add a style", "cinematic", "ink", "neon"], 10, "neon is not listed")
        assert chips(page) == ["ink"]
        choose_styles(page, "neon")
        assert chips(page) == ["ink", "neon"]
        assert chip_title(page, "neon") == "neon lights\nNegative: dark"
    finally:
        edit(STYLES_CSV)
    page.execute_script("window.dispatchEvent(new Event('focus'))")
    wait(page, lambda d: listed() == ["add a style", "cinematic", "ink"], 10, "neon is still listed")


def test_a_failed_reload_on_focus_names_what_could_not_be_loaded(page, base_url):
    """Back in focus, the page reads the styles and the scripts again; a failed read names the one that failed."""
    wait(page, lambda d: d.execute_script("return state.scripts !== null"), 20, "GET /api/scripts not read")
    page.execute_script("""
      window.realFetch = window.realFetch || window.fetch;
      window.fetch = (url, ...rest) => String(url).includes("/api/scripts")
        ? Promise.resolve(new Response('{"detail": "scripts are down"}',
                                       { status: 500, headers: { "Content-Type": "application/json" } }))
        : window.realFetch(url, ...rest);
      window.dispatchEvent(new Event("focus"));""")
    try:
        wait(page, lambda d: text(d, "error").startswith("Could not load the scripts"), 10,
             "the failed scripts reload is not named")
    finally:
        page.execute_script("window.fetch = window.realFetch")


def test_xyz_axes_with_choices_offer_the_servers_values_and_typing_still_works(page, base_url):
    """A1111's value dropdown and Fill button beside the X/Y/Z values box of an axis with choices: Styles (the
    server's styles), Sampler, Schedule type, Checkpoint name and VAE offer the server's values (`GET /api/scripts`);
    a value picked joins what was typed, Fill puts every one; an axis without choices shows none. The plot drawn
    sends the box's text."""
    prompt = "a grey cube (xyz choices)"
    set_value(page, "prompt", prompt)
    wait(page, lambda d: d.execute_script("return state.scripts !== null"), 20, "GET /api/scripts not read")
    choose(page, "script", text="X/Y/Z plot")

    def offered(letter: str) -> list[str]:
        return option_values(page, f"xyz_{letter}_choice", "text")[1:]

    def axis(letter: str, label: str) -> None:
        choose(page, f"xyz_{letter}_type", text=label)

    assert not page.find_element(By.ID, "xyz_x_choices").is_displayed()      # Seed: typed only
    axis("x", "Styles")
    assert page.find_element(By.ID, "xyz_x_choices").is_displayed()
    assert offered("x") == ["cinematic", "ink"]
    page.find_element(By.ID, "xyz_x_fill").click()
    assert value(page, "xyz_x_values") == "cinematic, ink"
    axis("y", "Sampler")
    assert "Euler" in offered("y") and "DPM++ 2M" in offered("y")
    set_value(page, "xyz_y_values", "Euler a")                               # typed, then one picked
    choose(page, "xyz_y_choice", text="Euler")
    assert value(page, "xyz_y_values") == "Euler a, Euler"
    axis("z", "Schedule type")
    assert {"Automatic", "Karras", "Uniform"} <= set(offered("z"))
    axis("z", "Checkpoint name")
    models = [m["title"] for m in http_json(base_url, "/sdapi/v1/sd-models")]
    assert offered("z") == sorted(models, key=str.casefold)
    axis("z", "VAE")
    assert offered("z")[:2] == ["Automatic", "None"]
    axis("z", "Steps")
    assert not page.find_element(By.ID, "xyz_z_choices").is_displayed()
    axis("z", "Nothing")
    job = generate_and_finish(page, base_url, prompt)
    args = job["request"]["script_args"]
    assert (args[1], args[4]) == ("cinematic, ink", "Euler a, Euler")
    assert "X Type: Styles" in job["infotexts"][0] and "Y Type: Sampler" in job["infotexts"][0]
