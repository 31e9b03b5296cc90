"""The web UI's Script list (A1111's selectable scripts) in a real headless browser (the helpers and fixtures of
test_webui.py): each tab lists its scripts, a script shows its own controls with A1111's labels and defaults, the
job draws its pictures (an X/Y/Z plot's grid, a Loopback's) into the viewer and the gallery, and Reuse restores the
script and its arguments."""

from __future__ import annotations

import io

from PIL import Image
from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, click_card_button, choose, option_values, selected, base_url, browser, http_bytes, http_json, open_page, page,
    sdlab_server, set_value, text, value, wait, wait_job,
)


def _queued(page, base_url: str, prompt: str) -> str:
    page.find_element(By.ID, "generate").click()
    return wait(page, lambda d: [j["id"] for j in http_json(base_url, "/api/jobs")["jobs"]
                                 if j["request"].get("prompt") == prompt and j["request"].get("script_name")], 30,
                f"no job queued; error: {text(page, 'error')}")[0]


def test_each_tab_lists_its_scripts_and_shows_the_chosen_ones_controls(page):
    txt2img = ["None", "Prompt Matrix", "Prompts from file or textbox", "X/Y/Z plot"]
    wait(page, lambda d: option_values(d, "script", "text") == txt2img, 20,       # the list loads after the page
         "txt2img's scripts are not listed")
    choose(page, "script", text="X/Y/Z plot")
    assert page.find_element(By.ID, "xyz_x_type").is_displayed()
    assert selected(page, "xyz_x_type") == "Seed"   # A1111 1.10's
    assert selected(page, "xyz_y_type") == "Nothing"
    assert page.find_element(By.ID, "xyz_draw_legend").is_selected()
    assert not page.find_element(By.ID, "lb_loops").is_displayed()
    page.find_element(By.ID, "tab-img2img").click()
    assert option_values(page, "script", "text") == ["None", "Loopback", "Outpainting mk2", "Poor man's outpainting",
                                                     "Prompt Matrix", "Prompts from file or textbox", "SD upscale",
                                                     "X/Y/Z plot"]
    assert selected(page, "script") == "X/Y/Z plot"     # kept over the tab change
    assert selected(page, "xyz_x_type") == "Seed"
    choose(page, "script", text="Loopback")
    assert (value(page, "lb_loops"), value(page, "lb_final_denoising_strength")) == ("4", "0.5")
    assert selected(page, "lb_denoising_curve") == "Linear"
    page.find_element(By.ID, "tab-txt2img").click()
    assert selected(page, "script") == "None"           # txt2img has no Loopback


def test_xyz_plot_with_a_steps_axis_draws_its_grid_into_the_viewer_and_gallery(page, base_url):
    prompt = "a blue circle (x/y/z)"
    set_value(page, "prompt", prompt)
    set_value(page, "seed", 5)
    choose(page, "script", text="X/Y/Z plot")
    choose(page, "xyz_x_type", text="Steps")
    set_value(page, "xyz_x_values", "1,2")
    job_id = _queued(page, base_url, prompt)
    job = wait_job(base_url, job_id)
    assert job["status"] == "done" and len(job["images"]) == 1, job
    assert job["request"]["script_name"] == "X/Y/Z plot" and job["request"]["script_args"][:2] == [4, "1,2"]
    assert "X Type: Steps, X Values: \"1,2\"" in job["infotexts"][0] or "X Values: 1,2" in job["infotexts"][0]
    grid = Image.open(io.BytesIO(http_bytes(base_url, job["images"][0])))
    assert grid.width == 2 * 64 and grid.height > 64                # two cells and the legend above them
    wait(page, lambda d: text(d, "progress-text").startswith("Done"), 60, "the job is not shown done")
    assert len(page.find_elements(By.CSS_SELECTOR, "#results img")) == 1
    card = f'#gallery [data-job-id="{job_id}"]'
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f"{card} img"), 20, "the gallery lacks the grid")
    assert len(page.find_elements(By.CSS_SELECTOR, "#gallery .card")) == len(
        [j for j in http_json(base_url, "/api/jobs")["jobs"] if j["status"] not in ("queued", "running")])

    set_value(page, "xyz_x_values", "")
    choose(page, "script", text="None")
    click_card_button(page, card, "reuse")
    assert selected(page, "script") == "X/Y/Z plot"
    assert value(page, "xyz_x_values") == "1,2" and text(page, "notice") == ""


def test_loopback_of_two_loops_from_the_img2img_tab(page, base_url, tmp_path):
    path = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 80, 40)).save(path)
    page.find_element(By.ID, "tab-img2img").click()
    page.find_element(By.ID, "init-image").send_keys(str(path))
    prompt = "an orange square (loopback)"
    set_value(page, "prompt", prompt)
    set_value(page, "steps", 2)
    choose(page, "script", text="Loopback")
    set_value(page, "lb_loops", 2)
    job_id = _queued(page, base_url, prompt)
    job = wait_job(base_url, job_id)
    assert job["status"] == "done" and len(job["images"]) == 3, job     # the loops' grid, then each loop's picture
    assert job["request"]["script_args"] == [2, 0.5, "Linear", "None"]
    wait(page, lambda d: text(d, "progress-text").startswith("Done"), 60, "the job is not shown done")
    assert len(page.find_elements(By.CSS_SELECTOR, "#results img")) == 3


def test_reuse_of_an_api_script_job_restores_the_arguments_it_drew_with(page, base_url):
    """A job sent with fewer script_args than the script takes drew the rest at the script's defaults (A1111 fills
    them), which Reuse restores over the form's; its X/Y/Z dropdown lists (csv_mode off) go into the values boxes of
    the axes with choices, which read them (A1111's and the server's rule): a list beside a Steps axis is left out,
    and an axis with choices and an empty list gets an empty box (the server refuses it, as it refused the job)."""
    short = {"prompt": "reuse short args", "steps": 1, "seed": 5, "width": 64, "height": 64,
             "script_name": "X/Y/Z plot", "script_args": [4, "1,2"]}
    listed = {**short, "prompt": "reuse dropdown lists", "sampler": "Euler",
              "script_args": [9, "", ["Euler", "DPM++ 2M"], 0, "", [], 0, "", [], True, False, False, False, False,
                              False, False, 0, False]}
    stray = {**short, "prompt": "reuse a stray list",
             "script_args": [4, "1,2", ["5"], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0,
                             False]}
    jobs = [wait_job(base_url, http_json(base_url, "/api/jobs", body)["id"]) for body in (short, listed, stray)]
    assert [job["status"] for job in jobs] == ["done", "done", "done"], jobs
    open_page(page, base_url)                   # the gallery lists them
    wait(page, lambda d: d.execute_script("return state.scripts !== null"), 20, "GET /api/scripts not read")
    choose(page, "script", text="X/Y/Z plot")
    choose(page, "xyz_y_type", text="CFG Scale")
    set_value(page, "xyz_y_values", "3,9")
    expected = ([4, "1,2", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, True],
                [9, "Euler, DPM++ 2M", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0,
                 True],
                [4, "1,2", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, True])
    for job, args in zip(jobs, expected):
        card = f'#gallery [data-job-id="{job["id"]}"]'
        click_card_button(page, card, "reuse")
        assert page.execute_script("return scriptRequest()")["script_args"] == args
        assert text(page, "notice") == ""
    empty = {**listed, "script_args": [9, "Euler", [], *listed["script_args"][3:]]}      # a job the server refuses
    page.execute_script("reuseSettings(arguments[0])", {"request": empty})
    assert page.execute_script("return scriptRequest()")["script_args"][:3] == [9, "", []]
