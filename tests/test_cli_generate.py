"""`sdlab txt2img | img2img | inpaint`: pictures with their parameters, regeneration, and bad input.

Every bad input must give one `sdlab: error:` line, a non-zero exit status and no file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from bundle_fixtures import tiny_bundle, write_original
from cli_helpers import pixels, png_with_parameters, run
from sdlab.pipeline import plan
from sdlab.pipeline.plan import handoff_index
from sdlab.pipeline.png_info import parse_parameters, read_parameters

FAST = ["--steps", "2", "--width", "32", "--height", "32", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-sd1.safetensors"
    write_original(tiny_bundle("sd1"), path, junk=False)
    return path


@pytest.fixture()
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def test_txt2img_writes_png_with_parameters_and_regenerates_from_it(model, tmp_path, capsys) -> None:
    out = tmp_path / "a.png"
    code, stdout, _ = run(["txt2img", "a red (apple:1.2)", "--negative", "blurry, dark", "--model", str(model),
                           "--seed", "7", "--sampler", "Euler a", "--out", str(out), *FAST], capsys)
    assert code == 0 and stdout.strip() == str(out)
    params = parse_parameters(read_parameters(out))
    assert params["Prompt"] == "a red (apple:1.2)" and params["Negative prompt"] == "blurry, dark"
    assert params["Seed"] == 7 and params["Steps"] == 2 and params["Sampler"] == "Euler a"
    assert params["Size"] == "32x32" and params["Model"] == "tiny-sd1" and len(params["Model hash"]) == 10

    again = tmp_path / "b.png"
    code, _, _ = run(["txt2img", "--from-png", str(out), "--model", str(model), "--out", str(again), "--no-progress"], capsys)
    assert code == 0
    assert np.array_equal(pixels(out), pixels(again))


def test_from_png_warns_about_embeddings_and_controlnets_it_does_not_have(model, tmp_path, capsys) -> None:
    text = ('a mystyle cat\nSteps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 5, Seed: 1, Size: 32x32, '
            'ControlNet 0: "Module: none, Model: canny [12345678], Weight: 1", TI hashes: "mystyle: 0123456789ab", '
            'Version: sdlab 0.1.0')
    recorded = png_with_parameters(tmp_path / "recorded.png", text, (32, 32))
    code, _, err = run(["txt2img", "--from-png", str(recorded), "--model", str(model),
                        "--out", str(tmp_path / "again.png"), "--no-progress"], capsys)
    assert code == 0
    assert "embeddings mystyle, which are not loaded" in err and "drawn with ControlNet 0" in err, err


def _with_chunks(path: Path, chunks: dict[str, str]) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


FOOOCUS_JSON = json.dumps({"prompt": "a red cube", "negative_prompt": "", "steps": 6, "seed": "1234",
                           "sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras", "resolution": "(32, 32)",
                           "metadata_scheme": "fooocus", "version": "Fooocus v2.5.5"})


def _other_programs_pictures(folder: Path) -> dict[Path, str]:
    """Pictures as other programs write their settings (ComfyUI, NovelAI, InvokeAI, Fooocus's own scheme in a PNG
    and, in IFD0's UserComment, in a JPEG; SwarmUI), each with the program its error must name."""
    comfy = {"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20}}}
    exif = Image.Exif()
    exif[0x9286], exif[0x0131], exif[0x927C] = FOOOCUS_JSON, "Fooocus v2.5.5", "fooocus"     # Fooocus's get_exif
    Image.new("RGB", (32, 32)).save(folder / "fooocus.jpg", exif=exif)
    return {
        _with_chunks(folder / "comfy.png", {"prompt": json.dumps(comfy), "workflow": '{"nodes": []}'}): "ComfyUI",
        _with_chunks(folder / "novelai.png", {"Description": "1girl", "Software": "NovelAI",
                                              "Comment": '{"steps": 28, "uc": "lowres"}'}): "NovelAI",
        _with_chunks(folder / "invokeai.png", {"invokeai_metadata": '{"positive_prompt": "a cat"}'}): "InvokeAI",
        _with_chunks(folder / "fooocus.png", {"parameters": FOOOCUS_JSON, "fooocus_scheme": "fooocus"}): "Fooocus",
        folder / "fooocus.jpg": "Fooocus",
        _with_chunks(folder / "swarm.png", {"parameters": '{"sui_image_params": {"prompt": "a cat"}}'}): "SwarmUI",
    }


def test_other_programs_metadata_is_named_in_one_error_never_drawn_as_a_prompt(model, tmp_path, capsys) -> None:
    out = tmp_path / "out" / "again.png"
    for picture, program in _other_programs_pictures(tmp_path).items():
        code, _, err = run(["txt2img", "--from-png", str(picture), "--model", str(model), "--out", str(out),
                            "--no-progress"], capsys)
        assert code != 0 and not out.exists(), picture
        assert err.count("sdlab: error:") == 1 and f"holds {program}'s" in err and "Traceback" not in err, err


def test_a_parameters_text_without_a_settings_line_is_drawn_as_its_prompt_with_a_warning(model, tmp_path,
                                                                                          capsys) -> None:
    recorded = png_with_parameters(tmp_path / "prompt-only.png", "a red cube\nNegative prompt: blurry", (32, 32))
    code, _, err = run(["txt2img", "--from-png", str(recorded), "--model", str(model), *FAST,
                        "--out", str(tmp_path / "again.png")], capsys)
    assert code == 0 and "have no settings line" in err, err
    assert parse_parameters(read_parameters(tmp_path / "again.png"))["Prompt"] == "a red cube"


def test_an_a1111_picture_of_a_37_part_regional_prompt_is_drawn_again(model, tmp_path, capsys) -> None:
    """A1111 has no limit on AND parts: a 6x6 latent couple with its base prompt (37 parts) read from its picture
    was refused (`the prompt has 37 AND parts; sdlab draws at most 32`)."""
    regional = " AND ".join(["two people"] + [f"cell {n}" for n in range(36)])
    recorded = png_with_parameters(tmp_path / "regional.png", f"{regional}\nSteps: 1, Sampler: Euler, CFG scale: 5, "
                                   "Seed: 3, Size: 32x32", (32, 32))
    code, _, err = run(["txt2img", "--from-png", str(recorded), "--model", str(model), "--no-progress",
                        "--out", str(tmp_path / "again.png")], capsys)
    assert code == 0, err
    assert parse_parameters(read_parameters(tmp_path / "again.png"))["Prompt"] == regional


def test_a_standalone_vae_is_recorded_as_a1111_records_it(model, tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    from sdlab.pipeline.png_info import model_hash

    vae = tmp_path / "my-vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_bundle("sd1", seed=3).vae.state_dict().items()}, str(vae))
    out = tmp_path / "v.png"
    code, _, _ = run(["txt2img", "a pear", "--model", str(model), "--vae", str(vae), "--seed", "1", "--out", str(out),
                      *FAST], capsys)
    assert code == 0
    params = parse_parameters(read_parameters(out))
    assert (params["VAE hash"], params["VAE"]) == (model_hash(vae), "my-vae.safetensors")   # sd_vae.get_loaded_*
    code, _, err = run(["txt2img", "--from-png", str(out), "--model", str(model), "--out", str(tmp_path / "w.png"),
                        "--no-progress"], capsys)
    assert code == 0 and "decoded with the VAE 'my-vae.safetensors'" in err


def test_batch_writes_one_file_per_seed_into_a_folder(model, tmp_path, capsys) -> None:
    code, stdout, _ = run(["txt2img", "two cats", "--model", str(model), "--seed", "3", "--batch", "2",
                           "--out", str(tmp_path / "dir"), *FAST], capsys)
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "dir").iterdir())
    assert names == ["00000-3-two-cats.png", "00001-4-two-cats.png"]
    # image 1 of the batch is the picture of seed 4 drawn alone
    code, _, _ = run(["txt2img", "two cats", "--model", str(model), "--seed", "4", "--out", str(tmp_path / "one.png"), *FAST], capsys)
    assert np.abs(pixels(tmp_path / "one.png") - pixels(tmp_path / "dir" / "00001-4-two-cats.png")).max() <= 1


def test_img2img_and_inpaint_and_outpaint(model, picture, tmp_path, capsys) -> None:
    code, _, _ = run(["img2img", "a dog", "--init", str(picture), "--strength", "0.5", "--model", str(model),
                      "--seed", "1", "--out", str(tmp_path / "i2i.png"), "--steps", "4", "--no-progress"], capsys)
    assert code == 0 and Image.open(tmp_path / "i2i.png").size == (32, 32)
    assert read_parameters(tmp_path / "i2i.png") and "Denoising strength: 0.5" in read_parameters(tmp_path / "i2i.png")

    mask = tmp_path / "mask.png"
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (8, 8, 24, 24))
    m.save(mask)
    code, _, _ = run(["inpaint", "a dog", "--init", str(picture), "--mask", str(mask), "--model", str(model),
                      "--seed", "1", "--out", str(tmp_path / "inp.png"), "--steps", "2", "--no-progress"], capsys)
    assert code == 0 and Image.open(tmp_path / "inp.png").size == (32, 32)
    m.resize((64, 64)).save(mask)                                     # another size: resized with the picture
    code, _, _ = run(["inpaint", "a dog", "--init", str(picture), "--mask", str(mask), "--model", str(model),
                      "--seed", "1", "--out", str(tmp_path / "inp.png"), "--steps", "2", "--no-progress"], capsys)
    assert code == 0 and Image.open(tmp_path / "inp.png").size == (32, 32)

    code, _, _ = run(["inpaint", "a dog", "--init", str(picture), "--outpaint", "16,0,0,8", "--model", str(model),
                      "--seed", "1", "--out", str(tmp_path / "out.png"), "--steps", "2", "--no-progress"], capsys)
    assert code == 0 and Image.open(tmp_path / "out.png").size == (48, 40)

    # pads off the 8-pixel grid are trimmed, so the kept picture is not resized (it was squashed to fit before)
    code, _, err = run(["inpaint", "a dog", "--init", str(picture), "--outpaint", "12,0,0,0", "--model", str(model),
                        "--seed", "1", "--out", str(tmp_path / "odd.png"), "--steps", "2", "--no-progress"], capsys)
    assert code == 0 and "trimmed to 8,0,0,0" in err
    out = np.asarray(Image.open(tmp_path / "odd.png").convert("RGB"), dtype=np.int16)
    assert out.shape == (32, 40, 3)
    original = np.asarray(Image.open(picture).convert("RGB"), dtype=np.int16)
    assert np.abs(out[:, 28:] - original[:, 20:]).max() <= 1     # right of the seam's blur: the original 1:1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "steps"),
        (["--batch", "0"], "batch"),
        (["--sampler", "Eulr"], "valid names"),
        (["--schedule", "wiggly"], "valid names"),
        (["--cfg", "nan"], "finite"),
        (["--width", "100000"], "width"),
    ],
)
def test_bad_options_give_one_error_line_and_no_file(model, tmp_path, capsys, args, message) -> None:
    out = tmp_path / "x.png"
    options = dict(zip(FAST[0:-1:2], FAST[1::2]))
    for flag, value in zip(args[0::2], args[1::2]):
        options[flag] = value
    flat = [item for pair in options.items() for item in pair]
    code, _, err = run(["txt2img", "p", "--model", str(model), "--out", str(out), "--no-progress", *flat], capsys)
    assert code != 0
    assert err.count("sdlab: error:") == 1 and message in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_size_not_a_multiple_of_8_is_snapped_with_a_warning(model, tmp_path, capsys) -> None:
    out = tmp_path / "s.png"
    code, _, err = run(["txt2img", "p", "--model", str(model), "--out", str(out), "--steps", "1",
                        "--width", "37", "--height", "33", "--no-progress"], capsys)
    assert code == 0 and Image.open(out).size == (32, 32)
    assert "not a multiple of 8" in err


def test_prompt_length_limit(model, tmp_path, capsys) -> None:
    long_ok = " ".join(["apple"] * 1_700)  # 10,000+ characters: accepted, encoded in 75-token chunks
    assert len(long_ok) > 10_000
    code, _, _ = run(["txt2img", long_ok, "--model", str(model), "--out", str(tmp_path / "ok.png"), *FAST], capsys)
    assert code == 0
    code, _, err = run(["txt2img", "a" * 20_001, "--model", str(model), "--out", str(tmp_path / "no.png"), *FAST], capsys)
    assert code != 0 and "limit" in err and not (tmp_path / "no.png").exists()


def test_bad_files_and_folders(model, picture, tmp_path, capsys) -> None:
    cases = [
        (["img2img", "p", "--init", str(tmp_path / "missing.png")], "does not exist"),
        (["img2img", "p", "--init", str(model)], "cannot read"),
        (["img2img", "p"], "--init"),
        (["inpaint", "p", "--init", str(picture)], "--mask"),
        (["txt2img", "p", "--out", str(picture / "sub")], "output folder"),
    ]
    for args, message in cases:
        before = sorted(tmp_path.rglob("*"))
        code, _, err = run([*args, "--model", str(model), *FAST], capsys)
        assert code != 0, args
        assert err.count("sdlab: error:") == 1 and message in err, (args, err)
        assert sorted(tmp_path.rglob("*")) == before


def test_missing_model_says_so(tmp_path, capsys) -> None:
    code, _, err = run(["txt2img", "p", "--model", str(tmp_path / "nope.safetensors"), *FAST], capsys)
    assert code != 0 and err.count("sdlab: error:") == 1


def test_sdxl_with_refiner(tmp_path, capsys) -> None:
    base, refiner = tmp_path / "base.safetensors", tmp_path / "refiner.safetensors"
    write_original(tiny_bundle("sdxl"), base, junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), refiner, junk=False)
    common = ["txt2img", "a castle", "--model", str(base), "--seed", "2", "--sampler", "Euler", "--steps", "4",
              "--width", "32", "--height", "32", "--no-progress"]
    assert run([*common, "--out", str(tmp_path / "plain.png")], capsys)[0] == 0
    assert run([*common, "--refiner", str(refiner), "--refiner-switch", "0.5", "--out", str(tmp_path / "ref.png")], capsys)[0] == 0
    assert not np.array_equal(pixels(tmp_path / "plain.png"), pixels(tmp_path / "ref.png"))
    text = Image.open(tmp_path / "ref.png").info["parameters"]     # as A1111 records it (`apply_refiner`)
    assert re.search(r"Refiner: refiner \[[0-9a-f]{10}\], Refiner switch at: 0\.5", text), text
    assert "Refiner" not in Image.open(tmp_path / "plain.png").info["parameters"]
    code, _, err = run([*common, "--refiner", str(refiner), "--refiner-switch", "1.5", "--out", str(tmp_path / "x.png")], capsys)
    assert code != 0 and "refiner-switch" in err and not (tmp_path / "x.png").exists()


def test_from_png_hands_off_to_the_refiner_by_the_pictures_rule(tmp_path, capsys, monkeypatch) -> None:
    """--from-png takes the picture's `Refiner switch at` and the rule it was drawn by: A1111's for a picture
    A1111 drew (`apply_refiner`: the nearest training timestep), the recorded `Refiner steps` for sdlab's. On
    Uniform 21 steps, switch 0.8, diffusers' `denoising_end` hands off after 16 steps, A1111 after 17."""
    base, refiner = tmp_path / "base.safetensors", tmp_path / "refiner.safetensors"
    write_original(tiny_bundle("sdxl"), base, junk=False)
    write_original(tiny_bundle("sdxl-refiner", seed=5), refiner, junk=False)
    text = ("a castle\nSteps: 21, Sampler: Euler, Schedule type: Uniform, CFG scale: 5, Seed: 2, Size: 32x32, "
            "Refiner: refiner [0123456789], Refiner switch at: 0.8, Version: v1.10.1")
    drawn_by_a1111 = png_with_parameters(tmp_path / "a1111.png", text, (32, 32))
    common = ["txt2img", "--model", str(base), "--refiner", str(refiner), "--no-progress"]

    splits = []
    monkeypatch.setattr(plan, "handoff_index", lambda *a, **k: splits.append(handoff_index(*a, **k)) or splits[-1])

    def handoff(*args: str) -> tuple[int, dict]:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*.png')))}.png"
        assert run([*common, *args, "--out", str(out)], capsys)[0] == 0
        return splits[-1], parse_parameters(read_parameters(out))

    steps, params = handoff("--from-png", str(drawn_by_a1111))
    assert steps == 17 and (params["Refiner switch at"], params["Refiner steps"]) == ("0.8", "a1111")
    assert handoff("--from-png", str(tmp_path / "out0.png"))[0] == 17     # sdlab's picture names the rule
    steps, params = handoff("a castle", "--steps", "21", "--schedule", "normal", "--sampler", "Euler",
                            "--width", "32", "--height", "32", "--refiner-switch", "0.8")
    assert steps == 16 and params["Refiner steps"] == "diffusers"
