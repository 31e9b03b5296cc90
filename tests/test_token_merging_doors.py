"""Token merging reaches the U-Net through every door: the request (Python API), its hires pass, the infotext written
as A1111 1.10 writes it and read back, the command line (--token-merging-ratio, --token-merging-ratio-hr,
--from-png), A1111's API options and override_settings (txt2img, img2img and hires rules of its
`get_token_merging_ratio`), and the native API. The numbers themselves are tests/test_token_merging.py's.

A1111 1.10 (AUTOMATIC1111/stable-diffusion-webui, modules/processing.py), transcribed:
    StableDiffusionProcessing.get_token_merging_ratio(for_hr):
        for_hr: p.token_merging_ratio_hr or opts.token_merging_ratio_hr or p.token_merging_ratio or opts.token_merging_ratio
        else:   p.token_merging_ratio or opts.token_merging_ratio
    StableDiffusionProcessingImg2Img.get_token_merging_ratio:
        p.token_merging_ratio or ("token_merging_ratio" in p.override_settings and opts.token_merging_ratio)
        or opts.token_merging_ratio_img2img or opts.token_merging_ratio
    create_infotext: "Token merging ratio": None if token_merging_ratio == 0 else token_merging_ratio,
                     "Token merging ratio hr": None if not enable_hr or token_merging_ratio_hr == 0 else ...hr
    (after "ENSD", before "RNG"); options token_merging_ratio (infotext 'Token merging ratio'),
    token_merging_ratio_hr ('Token merging ratio hr'), token_merging_ratio_img2img (none).
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from bundle_fixtures import init_picture, tiny_bundle, write_original
from cli_helpers import pixels, run
from server_fixtures import b64_png, start_server, wait_for_job

import sdlab.pipeline.generate as generate_module
from sdlab.pipeline.generate import generate, generate_with_refiner
from sdlab.pipeline.hires import generate_hires, second_pass_request
from sdlab.pipeline.infotext import from_parameters, to_parameters
from sdlab.pipeline.plan import make_plan
from sdlab.pipeline.png_info import format_parameters, parse_parameters, read_parameters
from sdlab.pipeline.request import GenerationRequest, RequestError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SIZE = 32


@pytest.fixture(scope="module")
def tiny_sd1():
    return tiny_bundle("sd1", seed=11)


def _request(**changes) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a wall", "steps": 2, "seed": 3, "width": SIZE, "height": SIZE, **changes})


def _ratios_seen(bundle) -> list:
    """The token merging setting of every call of `bundle`'s U-Net, recorded from its forward."""
    seen: list = []
    bundle.unet.register_forward_pre_hook(
        lambda module, args: seen.append(None if module.token_merging is None else module.token_merging.ratio))
    return seen


# ---------------------------------------------------------------- the request and its passes


def test_each_pass_merges_with_its_ratio_and_the_model_lets_go_after(tiny_sd1):
    bundle = tiny_bundle("sd1", seed=11)
    seen = _ratios_seen(bundle)
    generate(bundle, make_plan(bundle, _request(token_merging_ratio=0.5)))
    assert set(seen) == {0.5}
    for hr, second in ((0.3, 0.3), (0.0, 0.5)):        # the hires ratio, else the first pass's (A1111's rule)
        seen.clear()
        plan = make_plan(bundle, _request(token_merging_ratio=0.5, token_merging_ratio_hr=hr, hr_scale=1.5,
                                          hr_denoise=0.5))
        generate_hires(bundle, plan)
        assert seen[:2] == [0.5, 0.5] and set(seen[2:]) == {second}, seen     # 2 steps, Euler: 2 calls a pass
    seen.clear()
    generate(bundle, make_plan(bundle, _request()))
    assert set(seen) == {None}
    assert bundle.unet.token_merging is None


def test_a_refiner_draws_without_merging():
    base, refiner = tiny_bundle("sdxl", seed=1), tiny_bundle("sdxl-refiner", seed=2)
    base_seen, refiner_seen = _ratios_seen(base), _ratios_seen(refiner)
    plan = make_plan(base, _request(steps=4, token_merging_ratio=0.5), refiner=refiner, switch_at=0.5)
    generate_with_refiner(base, refiner, plan)
    assert set(base_seen) == {0.5} and set(refiner_seen) == {None}


def test_second_pass_request_takes_the_hires_ratio_or_the_first_passs(tiny_sd1):
    def second(**changes) -> GenerationRequest:
        return second_pass_request(make_plan(tiny_sd1, _request(hr_scale=2.0, **changes)).request, 2)

    assert (second(token_merging_ratio=0.5, token_merging_ratio_hr=0.2).token_merging_ratio,
            second(token_merging_ratio=0.5, token_merging_ratio_hr=0.2).token_merging_ratio_hr) == (0.2, 0.0)
    assert second(token_merging_ratio=0.5).token_merging_ratio == 0.5
    assert second(token_merging_ratio_hr=0.3).token_merging_ratio == 0.3


@pytest.mark.parametrize("field", ["token_merging_ratio", "token_merging_ratio_hr"])
@pytest.mark.parametrize("value", [1.0, -0.1, float("nan")])
def test_a_ratio_outside_0_to_1_is_refused(tiny_sd1, field, value):
    with pytest.raises(RequestError, match=field):
        make_plan(tiny_sd1, _request(**{field: value}))


def test_a_hires_ratio_without_the_hires_fix_is_refused(tiny_sd1):
    """As every other hr_* field: the hires pass's ratio without a hires pass is an error, not dropped."""
    with pytest.raises(RequestError, match=r"token_merging_ratio_hr \(0.5\) needs hr_scale .*hires fix"):
        make_plan(tiny_sd1, _request(token_merging_ratio_hr=0.5))
    make_plan(tiny_sd1, _request(token_merging_ratio_hr=0.5, hr_scale=1.5, hr_denoise=0.5))


# ---------------------------------------------------------------- infotext


def test_the_infotext_says_the_ratios_as_a1111_does_and_reads_them_back(tiny_sd1):
    def text(**changes) -> str:
        return format_parameters(to_parameters(make_plan(tiny_sd1, _request(**changes)).request))

    merged = text(token_merging_ratio=0.5).splitlines()[-1].split(", ")
    assert "Token merging ratio: 0.5" in merged and not any("ratio hr" in item for item in merged)
    assert merged.index("Token merging ratio: 0.5") < merged.index("RNG: CPU")
    assert "Token merging" not in text()
    hires = text(token_merging_ratio=0.5, hr_scale=1.5).splitlines()[-1].split(", ")
    assert "Token merging ratio hr: 0.5" in hires                         # the first pass's, as A1111's
    hires = text(token_merging_ratio=0.5, token_merging_ratio_hr=0.3, hr_scale=1.5)
    assert "Token merging ratio hr: 0.3" in hires.splitlines()[-1].split(", ")
    fields = from_parameters(parse_parameters(hires))
    assert (fields["token_merging_ratio"], fields["token_merging_ratio_hr"]) == (0.5, 0.3)
    a1111 = ("a wall\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, Token merging ratio: 0.4, "
             "Version: v1.10.1")
    assert from_parameters(parse_parameters(a1111))["token_merging_ratio"] == 0.4


# ---------------------------------------------------------------- the command line


def test_the_command_line_draws_records_and_redraws_with_token_merging(tmp_path, capsys, monkeypatch):
    model = tmp_path / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1"), model, junk=False)
    fast = ["--model", str(model), "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--no-progress"]
    settings = []
    merging_tokens = generate_module.merging_tokens
    monkeypatch.setattr(generate_module, "merging_tokens",
                        lambda unet, setting: settings.append(setting.ratio) or merging_tokens(unet, setting))
    merged, hires, again = (tmp_path / f"{name}.png" for name in ("merged", "hires", "again"))
    assert run(["txt2img", "a wall", "--token-merging-ratio", "0.5", "--out", str(merged), *fast], capsys)[0] == 0
    assert settings == [0.5] and parse_parameters(read_parameters(merged))["Token merging ratio"] == "0.5"
    settings.clear()
    assert run(["txt2img", "--from-png", str(merged), "--out", str(again), *fast], capsys)[0] == 0
    assert settings == [0.5] and np.array_equal(pixels(again), pixels(merged))
    settings.clear()
    assert run(["txt2img", "a wall", "--token-merging-ratio", "0.5", "--token-merging-ratio-hr", "0.3", "--hr-scale",
                "1.5", "--hr-denoise", "0.5", "--out", str(hires), *fast], capsys)[0] == 0
    assert settings == [0.5, 0.3]
    assert parse_parameters(read_parameters(hires))["Token merging ratio hr"] == "0.3"
    settings.clear()
    assert run(["txt2img", "--from-png", str(hires), "--out", str(again), *fast], capsys)[0] == 0
    assert settings == [0.5, 0.3] and np.array_equal(pixels(again), pixels(hires))
    init_picture(64).save(tmp_path / "init.png")
    settings.clear()
    assert run(["img2img", "a wall", "--init", str(tmp_path / "init.png"), "--token-merging-ratio", "0.4",
                "--out", str(again), *fast], capsys)[0] == 0
    assert settings == [0.4]
    code, _, err = run(["txt2img", "a wall", "--token-merging-ratio", "1.5", "--out", str(again), *fast], capsys)
    assert code != 0 and "token_merging_ratio must lie in [0, 1)" in err and "Traceback" not in err
    lone = tmp_path / "lone-hr.png"
    code, _, err = run(["txt2img", "a wall", "--token-merging-ratio-hr", "0.5", "--out", str(lone), *fast], capsys)
    assert code != 0 and "token_merging_ratio_hr (0.5) needs hr_scale" in err and "Traceback" not in err
    assert not lone.exists()


# ---------------------------------------------------------------- A1111's API rules (no server)


def test_the_a1111_apis_options_and_overrides_give_its_ratios():
    from sdlab.server.a1111 import Img2ImgIn, Txt2ImgIn, _check_options, _infotext_overrides, _request as a1111_request
    from sdlab.server.inputs import BadRequest

    def ratios(options=None, overrides=None, img2img=False, hires=False):
        hr = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5} if hires else {}
        body = (Img2ImgIn if img2img else Txt2ImgIn)(prompt="x", override_settings=overrides or {}, **hr)
        req = a1111_request(body, inits=(init_picture(64),) if img2img else (), options=options)
        return req.token_merging_ratio, req.token_merging_ratio_hr

    assert ratios() == (0.0, 0.0)
    assert ratios({"token_merging_ratio": 0.5, "token_merging_ratio_hr": 0.3}, hires=True) == (0.5, 0.3)
    # without the hires fix A1111 never reads the hires option: it is not sent (the request would refuse it)
    assert ratios({"token_merging_ratio": 0.5, "token_merging_ratio_hr": 0.3}) == (0.5, 0.0)
    assert ratios(overrides={"token_merging_ratio": 0.4}) == (0.4, 0.0)
    # img2img: its own option over txt2img's, unless the request overrides txt2img's
    assert ratios({"token_merging_ratio": 0.5}, img2img=True)[0] == 0.5
    assert ratios({"token_merging_ratio": 0.5, "token_merging_ratio_img2img": 0.2}, img2img=True)[0] == 0.2
    assert ratios({"token_merging_ratio_img2img": 0.2}, {"token_merging_ratio": 0.6}, img2img=True)[0] == 0.6
    assert ratios({"token_merging_ratio_img2img": 0.2}, {"token_merging_ratio": 0.0}, img2img=True)[0] == 0.2
    for bad in (1.0, -0.5, "0.5", True):
        with pytest.raises(BadRequest, match="token_merging_ratio_hr"):
            _check_options({"token_merging_ratio_hr": bad})
    # an infotext pasted into a request sets the options its labels name (A1111's infotext=... of the options)
    params = parse_parameters("x\nSteps: 2, Seed: 1, Token merging ratio: 0.5, Token merging ratio hr: 0.3")
    assert _infotext_overrides(params, {}) == {"token_merging_ratio": 0.5, "token_merging_ratio_hr": 0.3}


# ---------------------------------------------------------------- both servers' APIs


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("tome-server") / "outputs")
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
    server.stop()


def test_both_apis_draw_and_record_the_ratios(client):
    body = {"prompt": "a wall", "steps": 2, "seed": 3, "width": 64, "height": 64}

    def a1111_line(route: str = "txt2img", **changes) -> list[str]:
        response = client.post(f"/sdapi/v1/{route}", json={**body, **changes})
        assert response.status_code == 200, response.text
        return json.loads(response.json()["info"])["infotexts"][0].splitlines()[-1].split(", ")

    assert not any(item.startswith("Token merging") for item in a1111_line())
    assert "Token merging ratio: 0.5" in a1111_line(override_settings={"token_merging_ratio": 0.5})
    # the hires option without the hires fix: drawn, unread, as A1111 draws it
    assert not any(item.startswith("Token merging") for item in a1111_line(
        override_settings={"token_merging_ratio_hr": 0.3}))
    hires = a1111_line(enable_hr=True, hr_scale=1.5, denoising_strength=0.5,
                       override_settings={"token_merging_ratio": 0.5, "token_merging_ratio_hr": 0.3})
    assert "Token merging ratio: 0.5" in hires and "Token merging ratio hr: 0.3" in hires
    try:
        assert client.post("/sdapi/v1/options", json={"token_merging_ratio_img2img": 0.2}).status_code == 200
        assert "Token merging ratio: 0.2" in a1111_line("img2img", init_images=[b64_png(init_picture(64))])
        assert not any(item.startswith("Token merging") for item in a1111_line())      # txt2img's is 0
        refused = client.post("/sdapi/v1/options", json={"token_merging_ratio": 1.0})
        assert refused.status_code == 422 and "token_merging_ratio" in refused.text
    finally:
        client.post("/sdapi/v1/options", json={"token_merging_ratio_img2img": 0.0})
    native = client.post("/api/jobs", json={**body, "token_merging_ratio": 0.5, "token_merging_ratio_hr": 0.3,
                                            "hr_scale": 1.5, "hr_denoise": 0.5})
    assert native.status_code == 202, native.text
    job = wait_for_job(client, native.json()["id"])
    line = job["infotexts"][0].splitlines()[-1].split(", ")
    assert job["status"] == "done" and "Token merging ratio: 0.5" in line and "Token merging ratio hr: 0.3" in line
    assert job["request"]["token_merging_ratio"] == 0.5
    for field in ("token_merging_ratio", "token_merging_ratio_hr"):     # true is no ratio (pydantic's 1.0)
        refused = client.post("/api/jobs", json={**body, field: True, "hr_scale": 1.5, "hr_denoise": 0.5})
        assert refused.status_code == 422 and f"{field} must be a number in [0, 1), got true" in refused.text
    lone = client.post("/api/jobs", json={**body, "token_merging_ratio_hr": 0.3})
    assert lone.status_code == 400 and "token_merging_ratio_hr (0.3) needs hr_scale" in lone.text, lone.text
    bad = client.post("/api/jobs", json={**body, "token_merging_ratio": 1.5})
    if bad.status_code == 202:                                   # refused when drawn: the job fails with the reason
        failed = wait_for_job(client, bad.json()["id"])
        assert failed["status"] == "error" and "token_merging_ratio" in failed.get("error", ""), failed
    else:
        assert 400 <= bad.status_code < 500 and "token_merging_ratio" in bad.text


# ---------------------------------------------------------------- X/Y/Z plot: A1111's two Token merging axes


def test_the_x_y_z_plots_token_merging_axes_set_the_ratios():
    """A1111 1.10's xyz_grid.py: AxisOption("Token merging ratio", float, apply_override('token_merging_ratio')),
    AxisOption("Token merging ratio high-res", float, apply_override('token_merging_ratio_hr')); the server's
    plot sends them as those override_settings (`OPTION_FIELDS`), which `_token_merging` reads."""
    from sdlab.pipeline.grid import Plot, parse_axis
    from sdlab.server.a1111_scripts import A1111_AXES, OPTION_FIELDS, sdlab_field

    plot = Plot(parse_axis("Token merging ratio=0,0.5"), parse_axis("Token merging ratio high-res=0.2"))
    cells = [options for _, options in plot.cells({"prompt": "a wall"})]
    assert [(c["token_merging_ratio"], c["token_merging_ratio_hr"]) for c in cells] == [(0.0, 0.2), (0.5, 0.2)]
    assert plot.x.labels == ("Token merging ratio: 0.0", "Token merging ratio: 0.5")
    fields = {axis.label: sdlab_field(axis) for axis in A1111_AXES}
    for label, name in (("Token merging ratio", "token_merging_ratio"),
                        ("Token merging ratio high-res", "token_merging_ratio_hr")):
        assert fields[label].name == name and OPTION_FIELDS[name] == name
