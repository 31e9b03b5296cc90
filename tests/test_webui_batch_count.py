"""The web UI's Batch count (A1111's) in a real headless browser (the helpers and fixtures of test_webui.py): the
box sends `batch_count`, the viewer and the gallery show every batch's pictures, the progress names the batch
being drawn, Reuse restores the count, and Skip ends the batch being drawn and goes on with the next."""

from __future__ import annotations

import io

from PIL import Image
from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, click_card_button, base_url, browser, http_bytes, http_json, job_by_prompt, page, sdlab_server, set_value,
    text, value, wait, wait_job,
)


def _generate(page, base_url: str, prompt: str, steps: int, batch_size: int, batch_count: int) -> str:
    """Queue `prompt` from the form with these boxes; the job's id."""
    set_value(page, "prompt", prompt)
    set_value(page, "steps", steps)
    set_value(page, "seed", 321)
    set_value(page, "batch_size", batch_size)
    set_value(page, "batch_count", batch_count)
    page.find_element(By.ID, "generate").click()
    return wait(page, lambda d: [j["id"] for j in http_json(base_url, "/api/jobs")["jobs"]
                                 if j["request"].get("prompt") == prompt], 20, "no job queued")[0]


def test_the_batch_count_box_draws_every_batch_and_the_gallery_shows_them(page, base_url):
    """Batch count 2 x Batch size 2 (64 px, 2 steps) queues one job of 4 pictures, seeds 321..324; the viewer and
    its gallery card show all 4; Reuse of it sets the box to 2 and Reuse of a one-batch job back to 1."""
    job_id = _generate(page, base_url, "a yellow star (two batches)", 2, 2, 2)
    job = wait_job(base_url, job_id)
    assert job["status"] == "done" and job["request"]["batch_count"] == 2 and len(job["images"]) == 4, job
    assert [t.split("Seed: ")[1].split(",")[0] for t in job["infotexts"]] == ["321", "322", "323", "324"]
    wait(page, lambda d: text(d, "progress-text").startswith("Done"), 30, "the job is not shown done")
    assert len(page.find_elements(By.CSS_SELECTOR, "#results img")) == 4
    card = f'#gallery [data-job-id="{job_id}"]'
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, f"{card} img")) == 4, 20, "the gallery lacks pictures")

    one = http_json(base_url, "/api/jobs", {"prompt": "a yellow star (one batch)", "steps": 2})
    one = wait_job(base_url, one["id"])
    set_value(page, "batch_count", 5)
    click_card_button(page, card, "reuse")
    assert value(page, "batch_count") == "2" and text(page, "notice") == ""
    click_card_button(page, f'#gallery [data-job-id="{one["id"]}"]', "reuse")
    assert value(page, "batch_count") == "1"


def test_skip_in_a_two_batch_job_goes_on_with_the_second_batch(page, base_url):
    """Skip while batch 1 of 2 draws (the progress reads "Batch 1 / 2") ends it as far as it got and batch 2 is
    drawn to its end ("Batch 2 / 2"): the job ends done with both pictures, the second the picture of seed + 1
    drawn alone, the first not the one seed draws to its end."""
    steps = 120
    job_id = _generate(page, base_url, "a green moon (skipped batch)", steps, 1, 2)
    wait(page, lambda d: text(d, "progress-text").startswith("Batch 1 / 2 \u00b7 Step ")
         and d.find_element(By.ID, "skip").is_enabled(), 30, "batch 1 is not shown drawing")
    page.find_element(By.ID, "skip").click()
    wait(page, lambda d: text(d, "progress-text").startswith("Batch 2 / 2 \u00b7 Step ")
         or text(d, "progress-text").startswith("Done"), 60, "batch 2 is not shown drawing")
    job = wait_job(base_url, job_id)
    assert job["status"] == "done" and len(job["images"]) == 2 and job["step"] == job["steps"] == 2 * steps, job
    alone = {key: job["request"][key] for key in ("prompt", "steps", "sampler", "schedule", "cfg_scale", "width",
                                                   "height")}
    drawn = [wait_job(base_url, http_json(base_url, "/api/jobs", {**alone, "seed": seed})["id"]) for seed in (321, 322)]
    pixels = [Image.open(io.BytesIO(http_bytes(base_url, url))).tobytes()
              for url in (*job["images"], drawn[0]["images"][0], drawn[1]["images"][0])]
    assert pixels[1] == pixels[3], "batch 2 is not the picture of seed + 1"
    assert pixels[0] != pixels[2], "batch 1 was drawn to its end"
