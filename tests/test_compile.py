"""`--compile` / `sdlab.load(compile=True)`: the U-Net goes through torch.compile with a compile cache on disk,
and draws the same picture as without.

The fast tests check the wiring (cache folder, flag -> load -> compiled U-Net with its own parameters)
without compiling; the ones that really compile take minutes on 2 busy cores and sit behind `--run-slow`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import pixels, run

import sdlab.api
from sdlab.models.unet import UNet
from sdlab.utils.compile import compile_cache_dir, compile_module, is_compiled, use_compile_cache

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ARGS = ["a red apple", "--steps", "2", "--width", "32", "--height", "32", "--seed", "3", "--cfg", "5",
        "--sampler", "DPM++ 2M", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1", seed=4), path, junk=False)
    return path


@pytest.fixture(autouse=True)
def sdlab_cache(monkeypatch, tmp_path) -> Path:
    """sdlab's cache folder in `tmp_path` and no TORCHINDUCTOR_CACHE_DIR, both as they were again after the test.
    `use_compile_cache` sets TORCHINDUCTOR_CACHE_DIR itself; monkeypatch restores it only once it has recorded it,
    and a `delenv` of an unset variable records nothing: the `setenv` first records it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("SDLAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_compile_cache_lives_in_sdlab_cache_dir(sdlab_cache) -> None:
    assert compile_cache_dir() == sdlab_cache / "compile"
    assert use_compile_cache() == sdlab_cache / "compile"
    assert (sdlab_cache / "compile").is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(sdlab_cache / "compile")  # what inductor reads
    import torch._inductor.config as inductor_config

    assert inductor_config.fx_graph_cache


def test_user_inductor_cache_dir_wins(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


def test_load_compile_compiles_each_unet_and_keeps_its_parameters(model) -> None:
    plain = sdlab.api.load(model)
    compiled = sdlab.api.load(model, compile=True)
    assert not is_compiled(plain.bundle.unet)
    assert is_compiled(compiled.bundle.unet)
    assert isinstance(compiled.bundle.unet, UNet)  # compiled in place: LoRA merges and casts see the same module
    ours, theirs = compiled.bundle.unet.state_dict(), plain.bundle.unet.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_cli_compile_flag_compiles_the_unet(model, tmp_path, capsys, monkeypatch) -> None:
    compiled = []

    def record(module):  # the wiring only: compiling itself is the slow test below
        compiled.append(module)
        return module

    monkeypatch.setattr(sdlab.api, "compile_module", record)
    code, _, err = run(["txt2img", *ARGS, "--model", str(model), "--out", str(tmp_path / "a.png"), "--compile"], capsys)
    assert code == 0, err
    assert len(compiled) == 1 and isinstance(compiled[0], UNet)
    code, _, err = run(["txt2img", *ARGS, "--model", str(model), "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    assert len(compiled) == 1  # not without the flag


@pytest.mark.slow
def test_compiled_unet_matches_eager_and_fills_the_cache(sdlab_cache) -> None:
    """Inductor reorders float sums; the compiled U-Net stays within 1e-4 of eager (outputs ~1), also for a second
    U-Net at another size in the same process (which once crashed inductor's dynamic-shape lowering)."""
    unet = tiny_bundle("sd1", seed=2).unet
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 700.0])
    context = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    with torch.inference_mode():
        eager = unet(x, t, context)
        compile_module(unet)
        out = unet(x, t, context)
    assert out.shape == eager.shape and out.dtype == eager.dtype
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    other = tiny_bundle("sd1", seed=3).unet  # a second instance and size in the process: another static graph
    small = x[:, :, :4, :4].contiguous()
    with torch.inference_mode():
        eager_small = other(small, t, context)
        compile_module(other)
        torch.testing.assert_close(other(small, t, context), eager_small, atol=1e-4, rtol=1e-4)
    assert any((sdlab_cache / "compile").rglob("*.py")) or any((sdlab_cache / "compile").rglob("*.so"))


@pytest.mark.slow
def test_cli_compile_draws_the_same_picture(model, tmp_path, capsys) -> None:
    """--compile changes only the order of float sums: the picture is within 2/255 of the eager one."""
    code, _, err = run(["txt2img", *ARGS, "--model", str(model), "--out", str(tmp_path / "eager.png")], capsys)
    assert code == 0, err
    code, _, err = run(["txt2img", *ARGS, "--model", str(model), "--out", str(tmp_path / "compiled.png"), "--compile"],
                       capsys)
    assert code == 0, err
    difference = abs(pixels(tmp_path / "compiled.png") - pixels(tmp_path / "eager.png"))
    assert difference.max() <= 2, difference.max()
