"""The default weight dtype (`auto`): bf16 for large U-Nets where the device computes bf16 natively, fp32 for
small models such as the shipped one; explicit dtypes are kept as given (sdlab.utils.dtypes.auto_dtype)."""

from __future__ import annotations

import argparse

import pytest
import torch

from bundle_fixtures import tiny_bundle

import sdlab.utils.dtypes as dtypes
from sdlab.api import load
from sdlab.checkpoints.load import load_bundle, plan_checkpoint, plan_dtype
from sdlab.checkpoints.save import save_bundle
from sdlab.cli.generate import _load_pipeline
from sdlab.utils.dtypes import LARGE_MODEL_PARAMETERS, auto_dtype, requested_dtype

LARGE = 860_000_000                         # SD1.5's U-Net
SMALL = 7_000_000                           # the shipped model's


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return save_bundle(tiny_bundle("sd1"), tmp_path_factory.mktemp("dtype") / "tiny.safetensors", dtype=torch.float16)


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)


@pytest.fixture
def large_threshold_zero(monkeypatch):
    """Every model counts as large (the tiny test models stand in for SD1.5)."""
    monkeypatch.setattr(dtypes, "LARGE_MODEL_PARAMETERS", 0)


def test_auto_dtype_rules(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    assert auto_dtype("cpu", LARGE) == torch.bfloat16
    assert auto_dtype("cpu", SMALL) == torch.float32
    assert auto_dtype("cpu", LARGE_MODEL_PARAMETERS - 1) == torch.float32
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    assert auto_dtype("cpu", LARGE) == torch.float32          # emulated bf16 is slower than fp32
    assert auto_dtype("mps", LARGE) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_dtype("cuda", LARGE) == torch.bfloat16
    assert auto_dtype(torch.device("cuda", 1), SMALL) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto_dtype("cuda", LARGE) == torch.float16


def test_cpu_probe_matches_torch():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert dtypes.cpu_has_native_bf16() == expected


def test_requested_dtype_names():
    assert requested_dtype("auto") is None
    assert [requested_dtype(n) for n in ("fp32", "fp16", "bf16")] == [torch.float32, torch.float16, torch.bfloat16]
    with pytest.raises(KeyError):
        requested_dtype("fp8")


def test_plan_dtype_counts_the_unet(tiny_file, native_bf16, monkeypatch):
    plan = plan_checkpoint(tiny_file)
    unet = next(c for c in plan.report.components if c.name == "unet")
    assert plan_dtype(plan, "cpu") == torch.float32                            # tiny: far below the threshold
    monkeypatch.setattr(dtypes, "LARGE_MODEL_PARAMETERS", unet.num_parameters)
    assert plan_dtype(plan, "cpu") == torch.bfloat16
    monkeypatch.setattr(dtypes, "LARGE_MODEL_PARAMETERS", unet.num_parameters + 1)  # the U-Net alone decides
    assert plan_dtype(plan, "cpu") == torch.float32


def test_load_bundle_default_is_auto(tiny_file, native_bf16, large_threshold_zero):
    assert load_bundle(tiny_file).dtype == torch.bfloat16
    assert load_bundle(tiny_file, dtype=torch.float32).dtype == torch.float32   # explicit wins
    assert load_bundle(tiny_file, dtype=torch.float16).dtype == torch.float16


def test_small_models_stay_fp32_by_default(tiny_file, native_bf16):
    assert load_bundle(tiny_file).dtype == torch.float32
    assert load().bundle.dtype == torch.float32                                   # the shipped model


def test_api_load_default_and_refiner_follow_the_base(tiny_file, native_bf16, large_threshold_zero):
    pipe = load(tiny_file)
    assert pipe.bundle.dtype == torch.bfloat16
    assert load(tiny_file, dtype=torch.float32).bundle.dtype == torch.float32
    image = pipe.txt2img("a red apple", steps=2, seed=1, width=64, height=64).images[0]
    assert image.size == (64, 64)


def _cli_args(model, dtype: str) -> argparse.Namespace:
    from sdlab.cli import build_parser

    return build_parser().parse_args(["txt2img", "x", "--model", str(model), "--dtype", dtype])


def test_cli_dtype_flag(tiny_file, native_bf16, large_threshold_zero):
    from sdlab.cli import build_parser

    default = build_parser().parse_args(["txt2img", "x", "--model", str(tiny_file)])
    assert default.dtype == "auto"
    assert build_parser().parse_args(["grid", "x", "--x", "steps=1,2", "--out", "g.png"]).dtype == "auto"
    assert _load_pipeline(default)[0].bundle.dtype == torch.bfloat16
    assert _load_pipeline(_cli_args(tiny_file, "fp32"))[0].bundle.dtype == torch.float32
    assert _load_pipeline(_cli_args(tiny_file, "bf16"))[0].bundle.dtype == torch.bfloat16


def test_eval_loads_with_auto_like_txt2img(tiny_file, native_bf16, large_threshold_zero, tmp_path, monkeypatch, capsys):
    """`sdlab eval` scores the pictures `sdlab txt2img` draws: same default dtype (it defaulted to fp32, so a full-size
    model was scored in fp32 while drawn in bf16: SD1.5-size, 256 px, 2 steps, 4840 MB peak RSS against 2580 MB)."""
    import sdlab.api
    import sdlab.tiny.evaluation
    from sdlab.cli import main

    dtypes_loaded = []
    real_load = sdlab.api.load

    def spying_load(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        dtypes_loaded.append(pipe.bundle.dtype)
        return pipe

    def one_picture_unscored(generate, prompts, seeds, out):   # the scorers are not what is tested here
        generate(prompts[0], seeds[0])
        return {"summary": {"accuracy": {}, "targets": {}, "counts": {}, "diversity": None}}

    monkeypatch.setattr(sdlab.api, "load", spying_load)
    monkeypatch.setattr(sdlab.tiny.evaluation, "evaluate", one_picture_unscored)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small pink triangle at the top on a black background\n", encoding="utf-8")
    for extra in ([], ["--dtype", "fp32"]):
        assert main(["eval", str(prompts), "--model", str(tiny_file), "--seeds", "1", "--steps", "1", "--size", "64",
                     "--out", str(tmp_path / "eval"), "--no-progress", *extra]) == 0
    assert dtypes_loaded == [torch.bfloat16, torch.float32]
