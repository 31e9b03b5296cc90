"""The web UI's X/Y/Z plot offers the FreeU and PAG axes (sd-webui-freeu's names for FreeU's factors, sdlab's own for
its window and the PAG scale) after A1111's, in a real headless browser (test_webui.py's fixtures), and a plot over
them draws: its job sends their indices in the server's axis list and its grid names them."""

from __future__ import annotations

from test_webui import (  # noqa: F401  (fixtures: base_url, browser, page; the session's sdlab_server)
    By, choose, option_values, generate_and_finish, base_url, browser, http_json, page, sdlab_server, set_value,
)

AXES = ["[FreeU] Enabled", "[FreeU] Stage 1 Backbone Scale", "[FreeU] Stage 1 Skip Scale",
        "[FreeU] Stage 2 Backbone Scale", "[FreeU] Stage 2 Skip Scale", "FreeU start", "FreeU end", "PAG scale"]


def test_the_freeu_and_pag_axes_are_offered_and_drawn(page, base_url):
    prompt = "a green cone (freeu x pag)"
    set_value(page, "prompt", prompt)
    choose(page, "script", text="X/Y/Z plot")
    assert option_values(page, "xyz_x_type", "text")[-len(AXES):] == AXES               # after A1111's, in both tabs
    choose(page, "xyz_x_type", text="[FreeU] Stage 2 Backbone Scale")
    set_value(page, "xyz_x_values", "1,1.6")
    choose(page, "xyz_y_type", text="PAG scale")
    set_value(page, "xyz_y_values", "2")
    job = generate_and_finish(page, base_url, prompt)
    listed = [a["label"] for a in http_json(base_url, "/api/scripts")["txt2img"]["axes"]]
    axes = {a["label"]: a["index"] for a in http_json(base_url, "/api/scripts")["txt2img"]["axes"]}
    assert set(AXES) <= set(listed)
    args = job["request"]["script_args"]
    assert (args[0], args[1], args[3], args[4]) == (axes["[FreeU] Stage 2 Backbone Scale"], "1,1.6",
                                                    axes["PAG scale"], "2")
    assert "X Type: [FreeU] Stage 2 Backbone Scale" in job["infotexts"][0] and "Y Type: PAG scale" in job["infotexts"][0]
    assert "freeu_b2: 1," in job["infotexts"][0] and "PerturbedAttentionGuidance_scale: 2" in job["infotexts"][0]
    page.find_element(By.ID, "tab-img2img").click()
    assert option_values(page, "xyz_x_type", "text")[-len(AXES):] == AXES
