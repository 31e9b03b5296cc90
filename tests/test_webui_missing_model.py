"""Reuse of a finished job whose model file was renamed since, in a real headless browser (the helpers of
test_webui.py) on a real `sdlab serve --models-dir`: the notice names the missing model and the model the form draws
with instead, every other setting is restored, and the Model list is marked and focused for the user to pick one."""

from __future__ import annotations

import shutil

import pytest

from test_webui import (  # noqa: F401  (fixtures: browser, base_url, page; the session's sdlab_server)
    By, Keys, base_url, browser, choose, click_card_button, drop_file, http_json, open_page, option_values, page,
    png_with_parameters, sdlab_server, text, value, wait, wait_job,
)


@pytest.fixture(scope="module")
def renamed_server(tmp_path_factory):
    """A server whose models folder holds `first.safetensors` and `second.safetensors` (copies of the shipped model)."""
    from sdlab.api import shipped_model_path
    from server_fixtures import start_server

    models = tmp_path_factory.mktemp("webui-missing-model") / "models"
    models.mkdir()
    for name in ("first", "second"):
        shutil.copyfile(shipped_model_path(), models / f"{name}.safetensors")
    server = start_server(models.parent / "outputs", "--models-dir", str(models))
    yield server
    server.stop()


def test_reuse_of_a_job_whose_model_was_renamed_names_it_and_keeps_the_rest(browser, renamed_server):
    """Before: the notice said 'not available here: model "second.safetensors [...]" (the form draws without them)',
    at the form's foot, though the form draws with the model left chosen; nothing at the Model list said so."""
    base = renamed_server.url
    titles = {m["model_name"]: m["title"] for m in http_json(base, "/sdapi/v1/sd-models")}
    settings = {"prompt": "a teal circle", "negative_prompt": "grainy", "steps": 3, "seed": 4321, "cfg_scale": 5.5,
                "width": 48, "height": 40, "sampler": "Euler", "model": titles["second"]}
    job = wait_job(base, http_json(base, "/api/jobs", settings)["id"])
    assert job["status"] == "done", job
    models = renamed_server.output_dir.parent / "models"
    (models / "second.safetensors").rename(models / "second-v2.safetensors")
    http_json(base, "/sdapi/v1/refresh-checkpoints", {})

    open_page(browser, base)
    browser.get_log("browser")
    assert job["model"] not in option_values(browser, "model")
    drawing_with = value(browser, "model")
    click_card_button(browser, f'#gallery [data-job-id="{job["id"]}"]', "reuse")

    notice = text(browser, "notice")
    assert f'model "{job["model"]}" is not on this server' in notice, notice
    assert f'draws with "{drawing_with}"' in notice and "draws without" not in notice, notice
    assert job["model"] in text(browser, "model-missing")
    model = browser.find_element(By.ID, "model")
    assert model.get_attribute("aria-invalid") == "true"
    assert browser.switch_to.active_element == model           # the keyboard picks one from here
    # every other setting is restored
    assert [value(browser, field) for field in ("prompt", "negative_prompt", "steps", "seed", "width", "height",
                                                "sampler")] == ["a teal circle", "grainy", "3", "4321", "48", "40",
                                                                "Euler"]
    assert float(value(browser, "cfg_scale")) == 5.5

    # the renamed file, picked, ends the mark; a job drawn then is its
    renamed = next(title for title in option_values(browser, "model") if title.startswith("second-v2"))
    choose(browser, "model", value=renamed)
    assert not browser.find_element(By.ID, "model-missing").is_displayed()
    assert model.get_attribute("aria-invalid") is None
    browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    queued = wait(browser, lambda d: [j["id"] for j in http_json(base, "/api/jobs")["jobs"] if j["id"] != job["id"]],
                  30, f"no job queued; error: {text(browser, 'error')}")
    redrawn = wait_job(base, queued[0])
    assert redrawn["status"] == "done" and redrawn["model"].startswith("second-v2.safetensors"), redrawn
    assert redrawn["request"]["seed"] == 4321


def test_a_dropped_pngs_refiner_the_server_has_not_is_named_and_its_list_marked(page):
    """Before: 'not available here: refiner "gone" (the form draws without them)', though Refiner was
    ticked and the form drew with the refiner left chosen."""
    drawing_with = value(page, "refiner")
    drop_file(page, png_with_parameters("a castle\nSteps: 4, Seed: 9, Size: 64x64, Refiner: gone [0123456789], "
                                        "Refiner switch at: 0.6, Version: v1.10.1"), "castle.png")
    wait(page, lambda d: text(d, "notice").startswith("Settings read from castle.png"), 20, "the PNG was not read")
    notice = text(page, "notice")
    assert 'refiner "gone" is not on this server' in notice, notice
    assert f'draws with "{drawing_with}" until you pick another under Refiner model' in notice, notice
    assert "draws without" not in notice, notice
    refiner = page.find_element(By.ID, "refiner")
    assert page.find_element(By.ID, "enable_refiner").is_selected() and refiner.get_attribute("aria-invalid") == "true"
    assert page.switch_to.active_element == refiner
    assert (value(page, "prompt"), value(page, "seed"), value(page, "refiner_switch")) == ("a castle", "9", "0.6")
