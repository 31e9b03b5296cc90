"""Few-step presets: the table, "what the user gives wins", the CLI flag and the native API field.

Pictures against diffusers for each preset are in tests/test_presets_parity.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_helpers import run

from sdlab.cli import build_parser
from sdlab.cli.errors import UserError
from sdlab.cli.generate import _options_from_args
from sdlab.diffusion.discretization import DISCRETIZATIONS
from sdlab.diffusion.samplers import get_sampler
from sdlab.pipeline.png_info import parse_parameters, read_parameters
from sdlab.pipeline.presets import PRESETS, apply_preset, get_preset, preset_names
from sdlab.pipeline.request import RequestError
from sdlab.pipeline.styles import StyleDatabase

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# What each model card publishes (docs/few-step.md): sampler, steps, CFG (diffusers' guidance 0 = CFG 1), eta
PUBLISHED = {
    "turbo": ("Euler a", 1, 1.0, None),
    "lcm": ("LCM", 4, 1.0, None),
    "lightning": ("Euler", 4, 1.0, None),
    "hyper": ("DDIM", 4, 1.0, None),
    "tcd": ("TCD", 4, 1.0, 0.3),
    "lcm-model": ("LCM", 4, 8.5, None),       # full LCM models: CFG 8.5 is their embedded w = 7.5
}


def test_every_preset_names_a_real_sampler_and_schedule_and_what_is_published():
    assert set(preset_names()) == set(PUBLISHED) == set(PRESETS)
    for name, (sampler, steps, cfg, eta) in PUBLISHED.items():
        options = get_preset(name).options()
        assert get_sampler(options["sampler"]).name == sampler
        assert options["schedule"] in DISCRETIZATIONS and options["schedule"] == "trailing"
        assert (options["steps"], options["cfg_scale"], options.get("eta")) == (steps, cfg, eta)


def test_turbo_img2img_runs_at_least_one_step_at_the_default_strength():
    assert get_preset("turbo").options("img2img")["steps"] == 2 and get_preset("lcm").options("inpaint")["steps"] == 4


def test_what_the_user_gives_wins_and_none_is_unset():
    options = apply_preset("TCD ", {"steps": 8, "eta": None, "prompt": "a fox"})
    assert options == {"sampler": "TCD", "schedule": "trailing", "steps": 8, "cfg_scale": 1.0, "eta": 0.3, "prompt": "a fox"}
    assert apply_preset(None, {"steps": 3}) == {"steps": 3}
    with pytest.raises(RequestError, match="unknown preset 'fast'.*turbo, lcm, lightning, hyper, tcd"):
        get_preset("fast")


def test_the_preset_eta_goes_with_its_sampler():
    """TCD's eta (its gamma) is no other sampler's: Euler a would run at ancestral eta 0.3, DDIM stochastic."""
    assert apply_preset("tcd", {"sampler": "Euler a"}) == {"sampler": "Euler a", "schedule": "trailing", "steps": 4,
                                                           "cfg_scale": 1.0}
    assert "eta" not in apply_preset("tcd", {"sampler": "DDIM"}) and "eta" not in apply_preset("tcd", {"sampler": "?"})
    assert apply_preset("tcd", {"sampler": "tcd"})["eta"] == 0.3 == apply_preset("tcd", {"sampler": None})["eta"]
    assert apply_preset("tcd", {"sampler": "Euler a", "eta": 0.5})["eta"] == 0.5           # an eta given still wins
    assert "eta" not in _options_from_args(_parsed("txt2img", "a fox", "--preset", "tcd", "--sampler", "Euler a"))
    assert _options_from_args(_parsed("txt2img", "a fox", "--preset", "tcd", "--sampler", "TCD"))["eta"] == 0.3


def _parsed(*argv: str):
    return build_parser().parse_args(list(argv))


def test_cli_preset_fills_unset_options_and_flags_win():
    options = _options_from_args(_parsed("txt2img", "a fox", "--preset", "lightning"))
    assert (options["sampler"], options["schedule"], options["steps"], options["cfg_scale"]) == ("Euler", "trailing", 4, 1.0)
    options = _options_from_args(_parsed("txt2img", "a fox", "--preset", "lightning", "--steps", "2", "--cfg", "1.5",
                                         "--sampler", "Euler a", "--schedule", "sgm_uniform"))
    assert (options["sampler"], options["schedule"], options["steps"], options["cfg_scale"]) == ("Euler a", "sgm_uniform", 2, 1.5)
    options = _options_from_args(_parsed("img2img", "a fox", "--preset", "turbo", "--init", "x.png"))
    assert options["steps"] == 2 and options["sampler"] == "Euler a"
    with pytest.raises(UserError, match="unknown preset"):
        _options_from_args(_parsed("txt2img", "a fox", "--preset", "fastest"))
    subcommand = build_parser()._subparsers._group_actions[0].choices["txt2img"]
    assert ", ".join(PRESETS) in " ".join(subcommand.format_help().split())     # the help lists every preset


def test_cli_preset_draws_and_records_its_settings(tmp_path: Path, capsys):
    """The shipped model, end to end: the picture's parameters carry the preset's settings, a flag wins."""
    out = tmp_path / "fox.png"
    code, _, err = run(["txt2img", "a fox", "--preset", "tcd", "--seed", "3", "--steps", "2", "--out", str(out),
                        "--no-progress"], capsys)
    assert code == 0, err
    recorded = parse_parameters(read_parameters(out))
    assert recorded["Sampler"] == "TCD" and recorded["Schedule type"] == "trailing"
    assert int(recorded["Steps"]) == 2 and float(recorded["CFG scale"]) == 1.0
    assert "Eta" not in recorded            # the preset's eta, 0.3, is TCD's own default: A1111 writes no default eta
    code, _, err = run(["txt2img", "a fox", "--preset", "nope", "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and err.startswith("sdlab: error: unknown preset 'nope'") and not (tmp_path / "x.png").exists()


def _native_job(body: dict):
    """POST /api/jobs's handler with a stand-in service: the GenerationRequest it would queue."""
    from sdlab.server.config import Limits
    from sdlab.server.native import JobIn, create_job

    queued = []
    service = SimpleNamespace(config=SimpleNamespace(limits=Limits()), controlnets=None, styles=StyleDatabase(),
                              submit=lambda spec, mode, model: queued.append(spec) or (SimpleNamespace(id="1", status="queued"), 0))
    create_job(JobIn(**body), SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(service=service))))
    return queued[0].request


def test_native_api_preset_field():
    from sdlab.server.inputs import BadRequest

    request = _native_job({"prompt": "a fox", "preset": "lcm"})
    assert (request.sampler, request.schedule, request.steps, request.cfg_scale) == ("LCM", "trailing", 4, 1.0)
    request = _native_job({"prompt": "a fox", "preset": "lcm", "steps": 20, "cfg_scale": 1.5})   # given: they win
    assert (request.sampler, request.steps, request.cfg_scale) == ("LCM", 20, 1.5)
    assert _native_job({"prompt": "a fox"}).steps is None                   # no preset: the model's default steps
    assert _native_job({"prompt": "a fox", "preset": "tcd"}).eta == 0.3
    assert _native_job({"prompt": "a fox", "preset": "tcd", "sampler": "Euler a"}).eta is None    # Euler a's own
    with pytest.raises(BadRequest, match="unknown preset"):
        _native_job({"prompt": "a fox", "preset": "warp"})


def test_python_api_preset_option():
    import sdlab

    pipe = sdlab.load()
    request = pipe.txt2img("a fox", preset="lightning", steps=2, seed=1).request
    assert (request.sampler, request.schedule, request.steps, request.cfg_scale) == ("Euler", "trailing", 2, 1.0)
    from PIL import Image
    picture = Image.new("RGB", (64, 64), (120, 40, 200))
    assert pipe.img2img("a fox", picture, preset="turbo", seed=1).request.steps == 2
    assert pipe.txt2img("a fox", preset="tcd", sampler="Euler a", steps=1, seed=1).request.eta is None
    with pytest.raises(RequestError, match="unknown preset"):
        pipe.txt2img("a fox", preset="rapid")
