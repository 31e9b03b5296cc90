"""Prompt LoRAs end to end: `Pipeline.run` / `sdlab txt2img` with ``<lora:NAME:...>`` tags.

- A tag draws exactly what the same file merged at load (`sdlab.load(..., loras=...)`) draws; the next
  request without it draws the plain model again, and the model's tensors are the originals afterwards.
- ``<lora:NAME:TE:UNET>``: weight 0 on both is the plain model; the U-Net weight alone changes the picture.
- A LyCORIS (LoHa) file by tag works as a LoRA does; the same set twice is merged once.
- Tags in the negative prompt are text, as in A1111 (not applied).
- A missing name or a file that is not a LoRA is a `RequestError` before drawing; on the command line one
  ``sdlab: error:`` line, exit 2, nothing written.
- The CLI records the prompt as typed and ``Lora hashes``; ``--from-png`` draws the same picture again;
  LoRAs are found in ``--lora-dir`` subfolders and in the A1111 ``models/Lora`` folder beside the model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdlab
import sdlab.api as sdlab_api
from bundle_fixtures import tiny_bundle, write_original
from server_fixtures import picture, sdlab_server, wait_for_job  # noqa: F401  (a session fixture)
from sdlab.cli import main
from sdlab.pipeline import prompt_loras
from sdlab.pipeline.png_info import lora_hash, parse_parameters, read_parameters
from sdlab.pipeline.request import RequestError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
OPTIONS = dict(steps=2, width=32, height=32, seed=3, cfg_scale=5.0)
FAST = ["--steps", "2", "--width", "32", "--height", "32", "--seed", "3", "--cfg", "5", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "Stable-diffusion" / "tiny.safetensors"
    path.parent.mkdir()
    write_original(tiny_bundle("sd1"), path, junk=False)
    return path


def _write_lora(path: Path, kind: str = "lora", seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if kind == "lora":
        modules = {TO_Q: {"lora_down.weight": r(4, 32), "lora_up.weight": r(32, 4), "alpha": torch.tensor(4.0)},
                   TE_Q: {"lora_down.weight": r(4, 64), "lora_up.weight": r(64, 4), "alpha": torch.tensor(4.0)},
                   CONV: {"lora_down.weight": r(4, 32, 3, 3) * 0.3, "lora_up.weight": r(32, 4, 1, 1) * 0.3}}
    else:
        modules = {TO_Q: {"hada_w1_a": r(32, 2), "hada_w1_b": r(2, 32), "hada_w2_a": r(32, 2), "hada_w2_b": r(2, 32)},
                   TE_Q: {"hada_w1_a": r(64, 2), "hada_w1_b": r(2, 64), "hada_w2_a": r(64, 2), "hada_w2_b": r(2, 64)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{n}.{f}": t.contiguous() for n, m in modules.items() for f, t in m.items()}, str(path))
    return path


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images])


def _state(pipe) -> dict[str, torch.Tensor]:
    tensors = {f"unet.{k}": v for k, v in pipe.bundle.unet.state_dict().items()}
    tensors |= {f"te.{k}": v for k, v in pipe.bundle.text_encoders[0].model.state_dict().items()}
    return {k: v.detach().clone() for k, v in tensors.items()}


def test_tag_draws_what_a_load_time_merge_draws_and_is_taken_out_after(model, tmp_path):
    folder = tmp_path / "loras"
    style = _write_lora(folder / "style.safetensors")
    plain = sdlab.load(model).txt2img("a red apple", **OPTIONS)
    merged = sdlab.load(model, loras=[(style, 0.7)]).txt2img("a red apple", **OPTIONS)
    assert not np.array_equal(_pixels(plain), _pixels(merged))

    pipe = sdlab.load(model, lora_dirs=[folder])
    before = _state(pipe)
    tagged = pipe.txt2img("a red apple <lora:style:0.7>", **OPTIONS)
    assert np.array_equal(_pixels(tagged), _pixels(merged))
    assert tagged.request.prompt == "a red apple <lora:style:0.7>"          # as typed
    after = _state(pipe)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert np.array_equal(_pixels(pipe.txt2img("a red apple", **OPTIONS)), _pixels(plain))

    # text-encoder and U-Net weights apart
    assert np.array_equal(_pixels(pipe.txt2img("a red apple <lora:style:0:0>", **OPTIONS)), _pixels(plain))
    unet_only = pipe.txt2img("a red apple <lora:style:0:0.7>", **OPTIONS)
    assert not np.array_equal(_pixels(unet_only), _pixels(plain))
    assert not np.array_equal(_pixels(unet_only), _pixels(merged))


def test_lycoris_by_tag_and_repeats_merge_once(model, tmp_path, monkeypatch):
    folder = tmp_path / "loras"
    loha = _write_lora(folder / "sub" / "hada.safetensors", kind="loha", seed=1)
    merged = sdlab.load(model, loras=[(loha, 0.5)]).txt2img("a boat", **OPTIONS)
    calls = []
    real = prompt_loras.bundle_lora_weights
    monkeypatch.setattr(prompt_loras, "bundle_lora_weights", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    pipe = sdlab.load(model, lora_dirs=[folder])
    first = pipe.txt2img("a boat <lyco:hada:0.5>", **OPTIONS)
    second = pipe.txt2img("a boat <lyco:hada:0.5>", **OPTIONS)
    assert np.array_equal(_pixels(first), _pixels(merged)) and np.array_equal(_pixels(second), _pixels(merged))
    assert calls == [loha]


def test_negative_prompt_tags_are_text_as_in_a1111(model, tmp_path):
    folder = tmp_path / "loras"
    _write_lora(folder / "style.safetensors")
    with_folder = sdlab.load(model, lora_dirs=[folder]).txt2img("a cat", "<lora:style:1> blurry", **OPTIONS)
    without = sdlab.load(model, lora_dirs=[]).txt2img("a cat", "<lora:style:1> blurry", **OPTIONS)
    assert np.array_equal(_pixels(with_folder), _pixels(without))


def test_other_extra_network_tags_are_left_out_unapplied_as_in_a1111(model, tmp_path):
    """`<hypernet:...>`, `<LORA:...>` (A1111 reads only lower-case lora / lyco): out of the encoded text, no
    LoRA looked up (none of these names exists), the picture the prompt without them draws."""
    pipe = sdlab.load(model, lora_dirs=[tmp_path])
    tagged = pipe.txt2img("a cat <hypernet:anime:1> <LORA:nothere:1><embedding:x>", **OPTIONS)
    bare = pipe.txt2img("a cat  ", **OPTIONS)
    assert np.array_equal(_pixels(tagged), _pixels(bare))
    assert tagged.request.prompt == "a cat <hypernet:anime:1> <LORA:nothere:1><embedding:x>"


def test_a1111_api_disable_extra_networks_takes_the_tags_out_unapplied(sdlab_server):
    """A1111's `disable_extra_networks`: the tags leave the prompt and none is applied (a LoRA the server does
    not have is then no 404); without it the same request names the missing LoRA."""
    fields = {"steps": 2, "seed": 3, "width": 64, "height": 64}
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=120) as client:
        disabled = client.post("/txt2img", json={"prompt": "a cat <lora:nothere:1> <hypernet:x:1>",
                                                 "disable_extra_networks": True, **fields})
        plain = client.post("/txt2img", json={"prompt": "a cat  ", **fields})
        enabled = client.post("/txt2img", json={"prompt": "a cat <lora:nothere:1>", **fields})
    assert disabled.status_code == plain.status_code == 200, disabled.text
    assert _answer_pixels(disabled) == _answer_pixels(plain)
    assert enabled.status_code == 404 and "nothere" in enabled.text


def test_a1111_api_disable_extra_networks_records_the_tags_as_sent(sdlab_server):
    """A1111 1.10 takes the tags out of the prompts it draws only (`process_images_inner`:
    `p.parse_extra_network_prompts()` strips `p.prompts` / `p.hr_prompts`; `disable_extra_networks` just skips
    `extra_networks.activate`); the infotext is written after `p.prompts = p.all_prompts[...]` and `Processed.js`
    answers `"prompt": self.all_prompts[0]`, both with the tags, and `init` sets
    `extra_generation_params["Hires prompt"] = self.hr_prompt` when `tuple(self.hr_prompt) != tuple(self.prompt)`.
    So the pictures are those of the prompts without their tags, and the record keeps the tags."""
    fields = {"steps": 2, "seed": 3, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 1.5,
              "hr_upscaler": "Latent"}
    prompt, hr_prompt = "a red apple <lora:style:1>", "sharp <lora:other:0.5>"
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=120) as client:
        disabled = client.post("/txt2img", json={"prompt": prompt, "hr_prompt": hr_prompt,
                                                 "disable_extra_networks": True, **fields})
        plain = client.post("/txt2img", json={"prompt": "a red apple ", "hr_prompt": "sharp ", **fields})
        same = client.post("/txt2img", json={"prompt": prompt, "hr_prompt": prompt,
                                             "disable_extra_networks": True, **fields})
        spaced = client.post("/txt2img", json={"prompt": prompt, "hr_prompt": prompt.replace(" ", "  ", 1),
                                               "disable_extra_networks": True, **fields})
    assert disabled.status_code == plain.status_code == same.status_code == spaced.status_code == 200, disabled.text
    assert _answer_pixels(disabled) == _answer_pixels(plain)
    info = json.loads(disabled.json()["info"])
    assert info["prompt"] == prompt and info["all_prompts"] == [prompt]
    assert info["extra_generation_params"]["Hires prompt"] == hr_prompt
    params = parse_parameters(info["infotexts"][0])
    assert (params["Prompt"], params["Hires prompt"]) == (prompt, hr_prompt)
    assert "Lora hashes" not in params
    same_info = json.loads(same.json()["info"])
    assert "Hires prompt" not in same_info["extra_generation_params"]
    assert "Hires prompt" not in parse_parameters(same_info["infotexts"][0])
    spaced_info = json.loads(spaced.json()["info"])     # compared character for character, as A1111 compares
    assert spaced_info["extra_generation_params"]["Hires prompt"] == "a  red apple <lora:style:1>"
    assert _answer_pixels(spaced) == _answer_pixels(same)


def test_a_disable_extra_networks_jobs_record_draws_it_again(sdlab_server):
    """The history row of an A1111 job drawn with `disable_extra_networks` keeps the prompts as sent, tags included,
    and the flag, which the native API takes: the row sent back (as Reuse sends it) draws the same picture, the
    tag of a LoRA the server does not have no 404."""
    from sdlab.server.native import JobIn

    fields = {"steps": 2, "seed": 3, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 1.5,
              "hr_upscaler": "Latent"}
    prompt, hr_prompt = "a red apple <lora:nothere:1>", "sharp <lora:other:0.5>"
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as client:
        first = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "hr_prompt": hr_prompt,
                                                       "disable_extra_networks": True, **fields})
        assert first.status_code == 200, first.text
        row = client.get("/api/jobs", params={"limit": 1}).json()["jobs"][0]
        record = row["request"]
        assert (record["prompt"], record["hr_prompt"], record["disable_extra_networks"]) == (prompt, hr_prompt, True)
        body = {key: value for key, value in record.items() if key in JobIn.model_fields and value is not None}
        again = client.post("/api/jobs", json=body)
        assert again.status_code == 202, again.text
        job = wait_for_job(client, again.json()["id"])
        assert job["status"] == "done", job
        redrawn = Image.open(io.BytesIO(client.get(job["images"][0]).content)).convert("RGB")
        assert job["request"]["prompt"] == prompt and job["request"]["disable_extra_networks"] is True
    assert redrawn.tobytes() == picture(first.json()["images"][0]).tobytes()
    assert job["infotexts"] == [json.loads(first.json()["info"])["infotexts"][0]]


def _answer_pixels(answer: httpx.Response) -> list[bytes]:
    """The pixels of an A1111 answer's pictures (their parameters text left out)."""
    return [picture(b64).tobytes() for b64 in answer.json()["images"]]


def test_missing_or_non_lora_names_fail_before_drawing(model, tmp_path, monkeypatch):
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(folder / "full.safetensors"))
    pipe = sdlab.load(model, lora_dirs=[folder])
    monkeypatch.setattr(sdlab_api, "generate", lambda *a, **k: pytest.fail("drew before checking the LoRAs"))
    with pytest.raises(RequestError, match="<lora:nothere:1>"):
        pipe.txt2img("a cat <lora:nothere:1>", **OPTIONS)
    with pytest.raises(RequestError, match="not a LoRA"):
        pipe.txt2img("a cat <lora:full:1>", **OPTIONS)


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _first_ranks(source: Path, out: Path, dyn: int) -> Path:
    """The LoRA A1111 merges for ``dyn=N`` (extensions-builtin/Lora: `lyco_helpers.rebuild_conventional` cuts
    ``up[:, :dyn] @ down[:dyn]``, `network_lora` scales it by alpha / the full rank), written as a file of its own:
    the first N ranks of every plain module, alpha * N / r (alpha r where the file has none)."""
    from safetensors.torch import load_file

    state = load_file(str(source))
    cut = {}
    for key, tensor in state.items():
        module, field = key.split(".", 1)
        rank = state[f"{module}.lora_down.weight"].shape[0]
        kept = min(dyn, rank)
        if field == "lora_down.weight":
            cut[key] = tensor[:kept].contiguous()
        elif field == "lora_up.weight":
            cut[key] = tensor[:, :kept].contiguous()
        else:
            cut[key] = tensor * kept / rank
        if field == "lora_down.weight" and f"{module}.alpha" not in state:
            cut[f"{module}.alpha"] = torch.tensor(float(kept))
    save_file(cut, str(out))
    return out


@pytest.mark.parametrize("tag, dyn", [("<lora:style:0.5:0.9:dyn=2>", 2), ("<lora:style:0.5:0.9:1>", 1),
                                      ("<lora:style:0.5:0.9:dyn=64>", 4)])
def test_a_dynamic_rank_merges_the_first_ranks_as_a1111(model, tmp_path, capsys, tag, dyn):
    """``<lora:NAME:TE:UNET:dyn=N>`` (or N as the 4th positional, A1111's extra_networks_lora) draws the picture
    of the file holding only the first N ranks at the full rank's scale; N past the rank is the whole LoRA.
    Before: 'dynamic rank (dyn) is not supported; the full rank is used', warned once per conditioning (9 lines
    for one tag in a 2-step run), the whole LoRA merged."""
    folder = tmp_path / "loras"
    style = _write_lora(folder / "style.safetensors")              # rank 4; its conv module has no alpha
    _first_ranks(style, tmp_path / "first.safetensors", dyn)
    drawn = {}
    for name, prompt, loras in (("dyn", f"a red apple {tag}", folder),
                                ("first", "a red apple <lora:first:0.5:0.9>", tmp_path),
                                ("whole", "a red apple <lora:style:0.5:0.9>", folder)):
        out = tmp_path / f"{name}.png"
        code, err = _run(["txt2img", prompt, "--model", str(model), "--lora-dir", str(loras), *FAST,
                          "--out", str(out)], capsys)
        assert code == 0 and "dyn" not in err, err
        drawn[name] = np.asarray(_open(out)).astype(int)
    assert np.array_equal(drawn["dyn"], drawn["first"])
    assert (np.abs(drawn["dyn"] - drawn["whole"]).max() > 0) == (dyn < 4)


@pytest.mark.parametrize("tag", ["<lora:style:1:1:dyn=0>", "<lora:style:1:1:0>"])
def test_a_dynamic_rank_of_zero_draws_without_the_plain_modules(model, tmp_path, capsys, tag):
    """``dyn=0`` (or 0 as the 4th positional) gives each plain module A1111's zero update
    (`lyco_helpers.rebuild_conventional`: ``up[:, :0] @ down[:0]``): the picture is the one drawn without the tag,
    and another LoRA of the prompt (a LoHa, which merges whole under any dyn) applies as alone. Before:
    'none of its 0 LoRA modules matches a layer of this sd1 model', exit 2."""
    folder = tmp_path / "loras"
    _write_lora(folder / "style.safetensors")
    _write_lora(folder / "hada.safetensors", kind="loha")
    drawn = {}
    for name, prompt in (("dyn0", f"a red apple {tag}"), ("plain", "a red apple"),
                         ("dyn0_hada", f"a red apple {tag} <lora:hada:1>"), ("hada", "a red apple <lora:hada:1>"),
                         ("whole", "a red apple <lora:style:1:1>")):
        out = tmp_path / f"{name}.png"
        code, err = _run(["txt2img", prompt, "--model", str(model), "--lora-dir", str(folder), *FAST,
                          "--out", str(out)], capsys)
        assert code == 0, err
        drawn[name] = np.asarray(_open(out)).astype(int)
    assert np.array_equal(drawn["dyn0"], drawn["plain"])
    assert np.array_equal(drawn["dyn0_hada"], drawn["hada"])
    assert np.abs(drawn["whole"] - drawn["plain"]).max() > 0 and np.abs(drawn["hada"] - drawn["plain"]).max() > 0


@pytest.mark.parametrize("tag", ["<lora:style:1:1:dyn=x>", "<lora:style:1:1:1.5>", "<lora:style:dyn=-1>"])
def test_a_dynamic_rank_that_is_no_whole_number_is_one_error(model, tmp_path, capsys, tag):
    folder = tmp_path / "loras"
    _write_lora(folder / "style.safetensors")
    code, err = _run(["txt2img", f"a red apple {tag}", "--model", str(model), "--lora-dir", str(folder), *FAST,
                      "--out", str(tmp_path / "a.png")], capsys)
    assert code == 2 and "dynamic rank" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a.png").exists()


def test_cli_records_tags_as_typed_and_from_png_redraws(model, tmp_path, capsys):
    folder = tmp_path / "loras"
    style = _write_lora(folder / "styles" / "style.safetensors")
    out, again = tmp_path / "a.png", tmp_path / "again.png"
    prompt = "a red apple <lora:style:0.5:0.9>"
    code, err = _run(["txt2img", prompt, "--model", str(model), "--lora-dir", str(folder), *FAST, "--out", str(out)], capsys)
    assert code == 0, err
    params = parse_parameters(read_parameters(out))
    assert params["Prompt"] == prompt and params["Lora hashes"] == f"style: {lora_hash(style)}"
    reference = sdlab.load(model, lora_dirs=[folder]).txt2img(prompt, **OPTIONS)
    assert np.array_equal(np.asarray(_open(out)), _pixels(reference)[0])

    code, err = _run(["txt2img", "--from-png", str(out), "--model", str(model), "--lora-dir", str(folder),
                      "--no-progress", "--out", str(again)], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(_open(again)), np.asarray(_open(out)))
    assert parse_parameters(read_parameters(again))["Prompt"] == prompt


def _open(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def test_cli_finds_loras_in_the_a1111_folder_beside_the_model(model, tmp_path, capsys):
    lora_folder = model.parent.parent / "Lora"
    _write_lora(lora_folder / "beside.safetensors", seed=4)
    try:
        out = tmp_path / "b.png"
        code, err = _run(["txt2img", "a pear <lora:beside:0.6>", "--model", str(model), *FAST, "--out", str(out)], capsys)
        assert code == 0, err
        assert "beside:" in parse_parameters(read_parameters(out))["Lora hashes"]
    finally:
        for p in lora_folder.iterdir():
            p.unlink()
        lora_folder.rmdir()


def test_cli_finds_lycoris_files_in_the_a1111_lycoris_folder_beside_the_model(model, tmp_path, capsys):
    """A1111 (1.5.1+) reads models/LyCORIS beside models/Lora (its Lora extension's --lyco-dir-backcompat), where
    users of the old LyCORIS extension keep their files: ``<lyco:NAME>`` and ``<lora:NAME>`` find them there.
    Before: 'the prompt asks for the LoRA <lyco:locon:0.6> but there is no locon.safetensors ...'."""
    lycoris = model.parent.parent / "LyCORIS"
    _write_lora(lycoris / "locon.safetensors", seed=4)
    try:
        for tag in ("<lyco:locon:0.6>", "<lora:locon:0.6>"):
            out = tmp_path / "b.png"
            code, err = _run(["txt2img", f"a pear {tag}", "--model", str(model), *FAST, "--out", str(out)], capsys)
            assert code == 0, err
            assert "locon:" in parse_parameters(read_parameters(out))["Lora hashes"]
    finally:
        for p in lycoris.iterdir():
            p.unlink()
        lycoris.rmdir()


def test_from_png_finds_the_pictures_loras_in_a_models_dirs_lora_folder(tmp_path, capsys, monkeypatch):
    """`--from-png pic.png --models-dir ~/webui/models`: the picture's model is found in models/Stable-diffusion
    and its `<lora:NAME:W>` in models/Lora (or ComfyUI's models/loras), as `sdlab serve --models-dir` finds them.
    Before, the LoRA folders searched were the shipped model's, the picture's folder and the current one: 'no
    style.safetensors ... in the LoRA folder'."""
    models = tmp_path / "webui" / "models"
    checkpoint = models / "Stable-diffusion" / "tiny.safetensors"
    checkpoint.parent.mkdir(parents=True)
    write_original(tiny_bundle("sd1"), checkpoint, junk=False)
    _write_lora(models / "loras" / "style.safetensors", seed=6)
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    prompt = "a red apple <lora:style:0.7>"
    code, err = _run(["txt2img", prompt, "--model", str(checkpoint), "--lora-dir", str(models / "loras"), *FAST,
                      "--out", str(drawn / "a.png")], capsys)
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = _run(["txt2img", "--from-png", str(drawn / "a.png"), "--models-dir", str(models), "--no-progress",
                      "--out", "again.png"], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(_open(elsewhere / "again.png")), np.asarray(_open(drawn / "a.png")))
    assert parse_parameters(read_parameters(elsewhere / "again.png"))["Prompt"] == prompt


def test_a_models_dirs_lora_comes_after_the_folders_searched_without_it(tmp_path, capsys, monkeypatch):
    """--models-dir's Lora folders are searched after the current folder and the --from-png picture's folder (as
    the picture's model and an upscaler are): adding --models-dir never changes the LoRA a tag finds. Before, a
    models/Lora/style.safetensors beat ./style.safetensors (another hash recorded, no warning) and the picture's
    own file beside it (a redraw of other pixels)."""
    models = tmp_path / "webui" / "models"
    checkpoint = tmp_path / "checkpoints" / "tiny.safetensors"
    checkpoint.parent.mkdir(parents=True)
    write_original(tiny_bundle("sd1"), checkpoint, junk=False)
    _write_lora(models / "Lora" / "style.safetensors", seed=9)        # another file of the same name
    here = tmp_path / "here"
    _write_lora(here / "style.safetensors", seed=1)
    monkeypatch.chdir(here)
    prompt = "a red apple <lora:style:0.7>"
    for out, extra in (("plain.png", []), ("with-models-dir.png", ["--models-dir", str(models)])):
        code, err = _run(["txt2img", prompt, "--model", str(checkpoint), *extra, *FAST, "--out", out], capsys)
        assert code == 0, err
    hashes = [parse_parameters(read_parameters(here / out))["Lora hashes"] for out in ("plain.png", "with-models-dir.png")]
    assert hashes[0] == hashes[1] == f"style: {lora_hash(here / 'style.safetensors')}"

    drawn = tmp_path / "drawn"
    _write_lora(drawn / "style.safetensors", seed=1)
    code, err = _run(["txt2img", prompt, "--model", str(checkpoint), "--lora-dir", str(drawn), *FAST,
                      "--out", str(drawn / "a.png")], capsys)
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = _run(["txt2img", "--from-png", str(drawn / "a.png"), "--model", str(checkpoint), "--models-dir",
                      str(models), "--no-progress", "--out", "again.png"], capsys)
    assert code == 0, err
    assert "hash" not in err
    assert np.array_equal(np.asarray(_open(elsewhere / "again.png")), np.asarray(_open(drawn / "a.png")))


def test_cli_lora_option_takes_a_name_found_in_the_lora_folders(model, tmp_path, capsys):
    """``--lora NAME[:WEIGHT]`` with no such file: the LoRA of that name in the LoRA folders, as a tag finds
    it; it draws what ``--lora FILE:WEIGHT`` draws. An unknown name is one error line."""
    folder = tmp_path / "loras"
    file = _write_lora(folder / "sub" / "style.safetensors", seed=5)
    pixels = {}
    for name, spec in (("by-name", "style:0.7"), ("by-file", f"{file}:0.7")):
        out = tmp_path / f"{name}.png"
        code, err = _run(["txt2img", "a pear", "--model", str(model), "--lora-dir", str(folder), "--lora", spec,
                          *FAST, "--out", str(out)], capsys)
        assert code == 0, err
        with Image.open(out) as image:
            pixels[name] = np.asarray(image.convert("RGB"))
        assert "style:" in parse_parameters(read_parameters(out))["Lora hashes"]
    assert np.array_equal(pixels["by-name"], pixels["by-file"])
    out = tmp_path / "none.png"
    code, err = _run(["txt2img", "a pear", "--model", str(model), "--lora-dir", str(folder), "--lora", "nothere",
                      *FAST, "--out", str(out)], capsys)
    assert code == 2 and err.count("sdlab: error:") == 1 and "nothere" in err and not out.exists(), err


@pytest.mark.parametrize("tag, message", [("<lora:nothere:1>", "nothere"), ("<lora:full:1>", "not a LoRA"),
                                          ("<lora:style:x>", "weight")])
def test_cli_bad_tags_are_one_error_and_nothing_written(model, tmp_path, capsys, tag, message):
    folder = tmp_path / "loras"
    _write_lora(folder / "style.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(folder / "full.safetensors"))
    out = tmp_path / "c.png"
    code, err = _run(["txt2img", f"a cat {tag}", "--model", str(model), "--lora-dir", str(folder), *FAST,
                      "--out", str(out)], capsys)
    assert code == 2 and err.startswith("sdlab: error:") and err.count("sdlab: error:") == 1, err
    assert message in err and "Traceback" not in err and not out.exists()


def test_grid_prompt_sr_over_a_lora_weight(model, tmp_path, capsys):
    """`sdlab grid` with prompt S/R on a tag's weight draws each cell with its own LoRA weight (A1111's X/Y/Z
    plot habit): weight 0 is the plain model, 0.9 what `txt2img` draws with the same tag."""
    folder = tmp_path / "loras"
    _write_lora(folder / "style.safetensors", seed=5)
    cells = tmp_path / "cells"
    code, err = _run(["grid", "a cat <lora:style:0.0>", "--x", "prompt_sr=0.0,0.9", "--model", str(model),
                      "--lora-dir", str(folder), *FAST, "--keep-cells", str(cells), "--out", str(tmp_path / "g.png")],
                     capsys)
    assert code == 0, err
    drawn = sorted(cells.glob("*.png"))
    assert len(drawn) == 2
    plain, tagged = tmp_path / "plain.png", tmp_path / "tagged.png"
    assert _run(["txt2img", "a cat <lora:style:0.0>", "--model", str(model), "--lora-dir", str(folder), *FAST,
                 "--out", str(plain)], capsys)[0] == 0
    assert _run(["txt2img", "a cat <lora:style:0.9>", "--model", str(model), "--lora-dir", str(folder), *FAST,
                 "--out", str(tagged)], capsys)[0] == 0
    assert np.array_equal(np.asarray(_open(drawn[0])), np.asarray(_open(plain)))
    assert np.array_equal(np.asarray(_open(drawn[1])), np.asarray(_open(tagged)))
    assert not np.array_equal(np.asarray(_open(plain)), np.asarray(_open(tagged)))
    assert parse_parameters(read_parameters(drawn[1]))["Prompt"] == "a cat <lora:style:0.9>"


def _service(model: Path, tmp_path: Path):
    """An in-process server (`Service`, not started) with `model` and a LoRA `style` in its --models-dir."""
    import shutil

    from sdlab.server.config import ServerConfig
    from sdlab.server.service import Service

    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(model, models / "Stable-diffusion" / "tiny.safetensors")
    style = _write_lora(models / "Lora" / "style.safetensors", seed=6)
    config = ServerConfig(tmp_path / "served", model=models / "Stable-diffusion" / "tiny.safetensors", models_dir=models)
    return Service(config), style


def test_a_name_tagged_twice_is_named_once_by_the_cli_and_the_server(model, tmp_path, capsys):
    """A1111 keeps `Lora hashes` in a dict, one entry per name: a name tagged twice (merged twice, at its last
    tag's weight) is named once. `sdlab txt2img` and the server resolve a prompt's tags with one helper
    (`infotext.tag_loras`), the server when the job is submitted, with the hash of the LoRA it found."""
    from sdlab.pipeline.infotext import LoraRef
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import JobSpec

    prompt = "a cat <lora:style:0.5> on a mat <lora:style:0.3>"
    folder = tmp_path / "loras"
    style = _write_lora(folder / "style.safetensors", seed=6)
    out = tmp_path / "cli.png"
    code, err = _run(["txt2img", prompt, "--model", str(model), "--lora-dir", str(folder), *FAST, "--out", str(out)],
                     capsys)
    assert code == 0, err
    assert parse_parameters(read_parameters(out))["Lora hashes"] == f"style: {lora_hash(style)}"
    service, served = _service(model, tmp_path)
    try:
        job, _ = service.submit(JobSpec(GenerationRequest(prompt, sampler="Euler", **OPTIONS)), "txt2img", None)
        assert job.spec.tag_loras == (LoraRef("style", 0.3, lora_hash(served)),)
    finally:
        service.store.close()


def test_a_lora_gone_from_the_server_during_its_run_fails_no_job(model, tmp_path):
    """The pictures name the tag LoRAs found when the job was submitted: a `refresh-loras` that no longer finds
    the file once it is merged (moved away mid-run here) leaves the finished job and its parameters alone."""
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import JobSpec

    service, style = _service(model, tmp_path)
    try:
        job, _ = service.submit(JobSpec(GenerationRequest("a cat <lora:style:0.5>", sampler="Euler", **OPTIONS)),
                                "txt2img", None)
        expected = f'Lora hashes: "style: {lora_hash(style)}"'

        def move_it_away(name: str, data: dict) -> None:
            if name == "step" and style.exists():
                style.rename(style.with_suffix(".moved"))
                service.registry.refresh()

        job.publish = move_it_away
        service.runner.run(job)
        assert service.registry.lora("style") is None and len(job.images) == 1
        assert expected in job.infotexts[0]
    finally:
        service.store.close()


def test_the_server_holds_no_merged_tensors_or_lora_files_between_jobs(model, tmp_path):
    """Between jobs the server holds its models alone (the worker's docstring): a job's prompt-tag LoRAs leave
    neither the patcher's merged tensors (a second copy of every layer they change) nor the files read."""
    from sdlab.pipeline.prompt_loras import patcher_for
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import JobSpec

    service, style = _service(model, tmp_path)
    try:
        job, _ = service.submit(JobSpec(GenerationRequest("a cat <lora:style:0.5>", sampler="Euler", **OPTIONS)),
                                "txt2img", None)
        during = []
        publish = job.publish

        def watch(name: str, data: dict) -> None:
            if name == "step":
                during.append((patcher_for(service.host.pipe.bundle)._cached is not None,
                               len(prompt_loras._FILE_CACHE)))
            publish(name, data)

        job.publish = watch
    except BaseException:
        service.store.close()
        raise
    service.start()
    try:
        assert job.finished_event.wait(120) and job.status == "done", job.error
        assert during[0][0] and during[0][1] >= 1 and job.images                # merged and read for the run
        patcher = patcher_for(service.host.pipe.bundle)
        assert patcher._cached is None and not patcher.applied and not prompt_loras._FILE_CACHE
    finally:
        service.stop()


def test_a_queued_jobs_tag_lora_is_read_once(model, tmp_path, monkeypatch):
    """The server reads a tag's LoRA file when the job is submitted (a file that is not a LoRA is a 400 at
    once) and the run finds it read: a job queued behind another reads its file once too, the job before it
    ending keeps the files a waiting job was submitted with; once nothing waits they are let go, and so they
    are when the one job waiting is cancelled."""
    import time

    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import JobSpec

    service, style = _service(model, tmp_path)
    reads = []
    real = prompt_loras.load_lora_file
    monkeypatch.setattr(prompt_loras, "load_lora_file", lambda path: (reads.append(Path(path)), real(path))[1])
    try:
        alone, _ = service.submit(JobSpec(GenerationRequest("a cat <lora:style:0.5>", **OPTIONS)), "txt2img", None)
        assert reads == [style] and prompt_loras._FILE_CACHE
        service.queue.cancel(alone)
        assert not prompt_loras._FILE_CACHE
        reads.clear()
        jobs = [service.submit(JobSpec(GenerationRequest(f"a {animal} <lora:style:{w}>", sampler="Euler", **OPTIONS)),
                               "txt2img", None)[0] for animal, w in (("cat", 0.5), ("dog", 0.7))]
    except BaseException:
        service.store.close()
        raise
    service.start()                                     # the dog waits while the cat is drawn
    try:
        deadline = time.monotonic() + 120
        while any(job.status not in ("done", "failed") for job in jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [job.status for job in jobs] == ["done", "done"], [job.error for job in jobs]
        assert reads == [style]
        assert not prompt_loras._FILE_CACHE
    finally:
        service.stop()


def test_a_refused_submission_lets_the_tag_loras_it_read_go(model, tmp_path):
    """A submission refused after its prompt's tags were read (a 422 from the request checks, a bad tag after a
    good one, a full queue) holds no LoRA file with nothing queued or running; with a job queued, its files stay."""
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import JobSpec
    from sdlab.server.jobs import QueueFull
    from sdlab.server.service import BadRequest

    service, style = _service(model, tmp_path)
    refused = [GenerationRequest("a cat <lora:style:0.5>", **{**OPTIONS, "width": 99992, "height": 99992}),
               GenerationRequest("a cat <lora:style:0.5>", **OPTIONS, hr_scale=2.0, hr_upscaler="nope"),
               GenerationRequest("a cat <lora:style:0.5> <lora:style:x>", **OPTIONS)]
    try:
        for request in refused:
            prompt_loras.forget_read_loras()
            with pytest.raises(BadRequest):
                service.submit(JobSpec(request), "txt2img", None)
            assert service.queue.counts() == (0, 0) and not prompt_loras._FILE_CACHE, request
        _write_lora(style.with_name("dog.safetensors"), seed=8)    # a file not checked yet: read at submit
        service.registry.refresh()
        queued, _ = service.submit(JobSpec(GenerationRequest("a dog <lora:dog:0.7>", **OPTIONS)), "txt2img", None)
        service.queue.max_queue = 1
        with pytest.raises(QueueFull):
            service.submit(JobSpec(GenerationRequest("a cat <lora:style:0.5>", **OPTIONS)), "txt2img", None)
        assert prompt_loras._FILE_CACHE                             # the queued dog's file
        service.queue.cancel(queued)
        assert not prompt_loras._FILE_CACHE
        service.queue.max_queue = 0
        with pytest.raises(QueueFull):
            service.submit(JobSpec(GenerationRequest("a cat <lora:style:0.5>", **OPTIONS)), "txt2img", None)
        assert not prompt_loras._FILE_CACHE
    finally:
        service.store.close()


def test_cancelling_the_one_waiting_job_as_the_running_one_ends_lets_the_files_go(model, tmp_path):
    """A client cancelling the only queued job while the running one is ending (its run over, the worker not yet
    free) leaves no LoRA file held once the worker is idle."""
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import JobSpec

    service, style = _service(model, tmp_path)
    try:
        running, waiting = (service.submit(JobSpec(GenerationRequest(f"a {animal} <lora:style:{w}>", **OPTIONS)),
                                           "txt2img", None)[0] for animal, w in (("cat", 0.5), ("dog", 0.7)))
    except BaseException:
        service.store.close()
        raise
    run = service.queue._run

    def run_then_cancel_the_waiting_one(job) -> None:
        run(job)
        if job is running:
            assert service.queue.cancel(waiting) == "cancelled"

    service.queue._run = run_then_cancel_the_waiting_one
    service.start()
    try:
        assert running.finished_event.wait(120) and running.status == "done", running.error
        assert service.queue.counts() == (0, 0) and not prompt_loras._FILE_CACHE
    finally:
        service.stop()


def test_the_hires_prompts_loras_and_embeddings_are_in_the_hashes(model, tmp_path, capsys):
    """A1111 activates the hires prompt's extra networks for the second pass and keeps one `lora_hashes` dict
    over both passes (`extra_networks_lora.activate`: reset only outside the hires pass), and its text encoder
    adds the embeddings of every prompt it encodes, the hires prompts' too, to `TI hashes`. A LoRA or an
    embedding only the hires prompt or hires negative prompt names is recorded after the prompt's."""
    from sdlab.pipeline.png_info import embedding_hash

    folder = tmp_path / "loras"
    base = _write_lora(folder / "base.safetensors", seed=1)
    late = _write_lora(folder / "late.safetensors", seed=2)
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    width = sdlab.load(model).bundle.text_encoders[0].config.width
    ink = embeddings / "zqink.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(1, width) * 0.1},
                "name": "zqink"}, ink)
    out = tmp_path / "hires.png"
    code, err = _run(["txt2img", "a cat <lora:base:0.5>", "--model", str(model), "--lora-dir", str(folder),
                      "--embeddings-dir", str(embeddings), *FAST, "--hr-scale", "1.5", "--hr-steps", "1",
                      "--hr-prompt", "a dog <lora:late:0.4> <lora:base:0.5>", "--hr-negative-prompt", "zqink",
                      "--out", str(out)], capsys)
    assert code == 0, err
    params = parse_parameters(read_parameters(out))
    assert params["Lora hashes"] == f"base: {lora_hash(base)}, late: {lora_hash(late)}"
    assert params["TI hashes"] == f"zqink: {embedding_hash(ink)}"
    assert params["Prompt"] == "a cat <lora:base:0.5>"


def test_the_server_names_the_hires_prompts_loras_when_the_job_is_submitted(model, tmp_path):
    """As `sdlab txt2img`: the hires prompt's tags are found and hashed with the prompt's, for `Lora hashes`."""
    from sdlab.pipeline.infotext import LoraRef
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import JobSpec

    service, served = _service(model, tmp_path)
    try:
        request = GenerationRequest("a cat", sampler="Euler", hr_scale=1.5, hr_prompt="a dog <lora:style:0.4>",
                                    **OPTIONS)
        job, _ = service.submit(JobSpec(request), "txt2img", None)
        assert job.spec.tag_loras == () and job.spec.hires_tag_loras == (LoraRef("style", 0.4, lora_hash(served)),)
    finally:
        service.store.close()


def test_a_lora_merged_at_load_is_tagged_in_the_hires_prompt_and_from_png_redraws(model, tmp_path, capsys):
    """A `--lora` file (the native API's and the web UI's `loras`) is merged at load and draws both passes; A1111
    draws a hires prompt's own tags in the second pass (`hr_extra_network_data`) and writes the hires prompt as
    typed, so the Hires prompt carries its tag as the prompt does, and the picture read back draws again. A
    LoRA only the prompt tags draws the first pass alone: the Hires prompt does not name it."""
    folder = tmp_path / "loras"
    style = _write_lora(folder / "style.safetensors", seed=1)
    _write_lora(folder / "late.safetensors", seed=2)
    hires = [*FAST, "--hr-scale", "1.5", "--hr-steps", "1", "--hr-prompt", "a dog"]
    out, again, tagged = tmp_path / "box.png", tmp_path / "again.png", tmp_path / "tagged.png"
    code, err = _run(["txt2img", "a cat", "--model", str(model), "--lora", f"{style}:0.6", *hires, "--out", str(out)],
                     capsys)
    assert code == 0, err
    params = parse_parameters(read_parameters(out))
    assert (params["Prompt"], params["Hires prompt"]) == ("a cat <lora:style:0.6>", "a dog <lora:style:0.6>")
    code, err = _run(["txt2img", "--from-png", str(out), "--model", str(model), "--lora-dir", str(folder),
                      "--no-progress", "--out", str(again)], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(_open(again)), np.asarray(_open(out)))

    code, err = _run(["txt2img", "a cat <lora:late:0.4>", "--model", str(model), "--lora-dir", str(folder),
                      "--lora", f"{style}:0.6", *hires, "--out", str(tagged)], capsys)
    assert code == 0, err
    assert parse_parameters(read_parameters(tagged))["Hires prompt"] == "a dog <lora:style:0.6>"


@pytest.mark.parametrize("tag", ["<lora:style:0.3>", "<lora:style:0.6:0.2>"])
def test_a_lora_merged_at_load_and_tagged_in_the_hires_prompt_draws_at_the_load_weight_in_both_passes(
        model, tmp_path, capsys, tag):
    """The first pass's rule holds in the second: a hires prompt's tag of a `--lora` file is left out (the load's
    weight wins, the LoRA is not merged twice), so the picture is the one drawn with the bare hires prompt, the
    Hires prompt records the load's weight and the picture read back draws again."""
    folder = tmp_path / "loras"
    style = _write_lora(folder / "style.safetensors", seed=1)
    hires = [*FAST, "--hr-scale", "1.5", "--hr-steps", "1", "--lora", f"{style}:0.6", "--model", str(model),
             "--lora-dir", str(folder)]
    bare, tagged, again = tmp_path / "bare.png", tmp_path / "tagged.png", tmp_path / "again.png"
    for prompt, out in (("a dog", bare), (f"a dog {tag}", tagged)):
        code, err = _run(["txt2img", "a cat", *hires, "--hr-prompt", prompt, "--out", str(out)], capsys)
        assert code == 0, err
    assert parse_parameters(read_parameters(tagged))["Hires prompt"].split() == ["a", "dog", "<lora:style:0.6>"]
    code, err = _run(["txt2img", "--from-png", str(tagged), "--model", str(model), "--lora-dir", str(folder),
                      "--no-progress", "--out", str(again)], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(_open(tagged)), np.asarray(_open(bare)))
    assert np.array_equal(np.asarray(_open(again)), np.asarray(_open(tagged)))


@pytest.mark.parametrize("write, says", [
    (lambda p: save_file({"unet.to_q.oft_R.weight": torch.zeros(4, 36)}, str(p.with_suffix(".safetensors"))),
     "a peft OFT file"),
    (lambda p: torch.save({"string_to_param": {"*": torch.zeros(2, 32)}, "name": "x"}, p.with_suffix(".pt")),
     "an A1111 textual-inversion embedding"),
    (lambda p: save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(p.with_suffix(".safetensors"))),
     "not a LoRA file"),
])
def test_a_native_loras_entry_that_is_no_lora_is_refused_at_submission(model, tmp_path, write, says):
    """A native job's `loras` entry naming a file of the LoRA folder that sdlab cannot merge is a 400 when the job
    is submitted, saying what the file is (as its prompt tag is), not a queued job that fails when the model
    loads; the file is named as clients know it, not by its path."""
    from sdlab.server.inputs import BadRequest

    service, _ = _service(model, tmp_path)
    folder = tmp_path / "models" / "Lora"
    write(folder / "other")
    service.registry.refresh()
    try:
        with pytest.raises(BadRequest) as err:
            service.submit(_entry_job("other"), "txt2img", None)
        assert err.value.status == 400 and says in err.value.message and "LoRA 'other'" in err.value.message
        assert str(folder) not in err.value.message
    finally:
        service.store.close()


def _write_nan_lora(path: Path) -> Path:
    """A LoRA file whose U-Net module's up weights hold a NaN."""
    up = torch.zeros(32, 4)
    up[0, 0] = float("nan")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{TO_Q}.lora_down.weight": torch.zeros(4, 32), f"{TO_Q}.lora_up.weight": up}, str(path))
    return path


def test_a_lora_with_nan_weights_is_refused_at_submission_as_a_loras_entry_and_as_a_tag(model, tmp_path):
    """A LoRA file with NaN weights is a 400 when the job is submitted, the same refusal whether the job names it
    in `loras` or tags it in the prompt (one check, `prompt_loras.lora_file_problem`), not a queued job that fails
    when the model loads."""
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import BadRequest, JobSpec

    service, _ = _service(model, tmp_path)
    folder = tmp_path / "models" / "Lora"
    _write_nan_lora(folder / "poisoned.safetensors")
    service.registry.refresh()
    try:
        with pytest.raises(BadRequest) as entry:
            service.submit(_entry_job("poisoned"), "txt2img", None)
        with pytest.raises(BadRequest) as tag:
            service.submit(JobSpec(GenerationRequest("a cat <lora:poisoned:0.8>", sampler="Euler", **OPTIONS)),
                           "txt2img", None)
        for err in (entry, tag):
            assert err.value.status == 400 and "NaN or infinite weights" in err.value.message
            assert str(folder) not in err.value.message
        assert entry.value.message.startswith("LoRA 'poisoned': ")
        assert entry.value.message.removeprefix("LoRA 'poisoned': ") == tag.value.message.removeprefix(
            "<lora:poisoned:0.8>: ")
    finally:
        service.store.close()


def _entry_job(name: str):
    """A server job (`JobSpec`) of "a cat" with the LoRA `name` of the server's folder as its `loras` entry at 0.8."""
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import JobSpec, LoraChoice

    return JobSpec(GenerationRequest("a cat", sampler="Euler", **OPTIONS), loras=(LoraChoice(name, 0.8),))


def _counted_reads(monkeypatch) -> list[Path]:
    """The files LoRA reads open from now on, resolved: where every LoRA file is opened (`read_checkpoint` in
    checkpoints/lora.py)."""
    import sdlab.checkpoints.lora as lora_module

    reads: list[Path] = []
    read_checkpoint = lora_module.read_checkpoint

    def counted(path, *args, **kwargs):
        reads.append(Path(path).resolve())
        return read_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr(lora_module, "read_checkpoint", counted)
    return reads


def test_the_submit_check_reads_a_lora_file_once_per_version(model, tmp_path, monkeypatch):
    """The submit check of a `loras` entry and of a prompt tag reads the LoRA file the first time only: checked
    again unchanged, after the queue let go of what it read (`forget_read_loras`) too, it is not read again; a new
    version of the file is read again. Reads are counted where every LoRA file is opened (`read_checkpoint`)."""
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.inputs import JobSpec

    service, style = _service(model, tmp_path)
    reads = _counted_reads(monkeypatch)
    entry = _entry_job("style")
    tagged = JobSpec(GenerationRequest("a cat <lora:style:0.5>", sampler="Euler", **OPTIONS))
    try:
        for spec in (entry, entry, tagged, entry, tagged):
            service.check(spec, "txt2img", None)
            prompt_loras.forget_read_loras()
        assert reads.count(style.resolve()) == 1
        _write_lora(style, seed=7)                          # a new version of the file
        service.check(entry, "txt2img", None)
        service.check(tagged, "txt2img", None)
        assert reads.count(style.resolve()) == 2
    finally:
        service.store.close()


def test_a_loras_entry_is_read_once_by_its_check_and_its_load(model, tmp_path, monkeypatch):
    """A server job's `loras` entry: the submit check reads the file (`lora_file_problem`) and the job's load merges
    that read (`api.load`, `lora_to_merge`), so a pickled LoRA (a full unpickle) is read once, not twice, and the
    read is let go once nothing waits; `sdlab.load(loras=...)` without a check reads it once and keeps nothing.
    Reads are counted where every LoRA file is opened (`read_checkpoint`; a .ckpt has no metadata for
    `lora_preset` to read)."""
    import time

    from safetensors.torch import load_file

    service, style = _service(model, tmp_path)
    old = style.with_name("old.ckpt")
    torch.save(load_file(str(style)), old)
    service.registry.refresh()                          # A1111's refresh-loras: old.ckpt is listed
    reads = _counted_reads(monkeypatch)
    try:
        sdlab.load(model, loras=[(old, 0.8)])
        assert reads.count(old.resolve()) == 1
        assert str(old.resolve()) not in {key[0] for key in prompt_loras._FILE_CACHE}      # nothing of it kept
        reads.clear()
        job, _ = service.submit(_entry_job("old"), "txt2img", None)
    except BaseException:
        service.store.close()
        raise
    service.start()
    try:
        deadline = time.monotonic() + 120
        while job.status not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.status == "done", job.error
        assert reads.count(old.resolve()) == 1
        assert not prompt_loras._FILE_CACHE
    finally:
        service.stop()


def test_a_missing_lora_of_the_hires_prompt_is_named_as_the_hires_prompts(model, tmp_path, capsys):
    """The README's `--hr-prompt "a castle, intricate <lora:detail:0.6>"` without the file: one line naming the
    hires prompt and the folders searched, as a prompt's tag is named, nothing written. Before: 'the prompt asks
    for the LoRA <lora:detail:0.6> but there is no detail.safetensors/.pt/.ckpt in the LoRA folder' (the prompt
    had no tag; no folder named)."""
    folder = tmp_path / "loras"
    folder.mkdir()
    out = tmp_path / "h.png"
    code, err = _run(["txt2img", "a castle", "--model", str(model), "--lora-dir", str(folder), *FAST,
                      "--sampler", "Euler", "--hr-scale", "1.5", "--hr-prompt", "a castle <lora:detail:0.6>",
                      "--out", str(out)], capsys)
    assert code == 2 and err.count("sdlab: error:") == 1 and not out.exists(), err
    assert "the hires prompt asks for the LoRA <lora:detail:0.6>" in err and f"searched {folder}" in err, err
    pipe = sdlab.load(model, lora_dirs=[folder])
    with pytest.raises(RequestError, match="the hires prompt asks for the LoRA <lora:detail:0.6>"):
        pipe.txt2img("a castle", sampler="Euler", hr_scale=1.5, hr_prompt="a castle <lora:detail:0.6>", **OPTIONS)
