"""LoRAs asked for in the prompt (`sdlab.pipeline.prompt_loras`): A1111's tag syntax, finding files by name
in LoRA folders, and merging a set into a bundle for one request with the weights restored bit for bit.

- ``<lora:NAME>``, ``<lora:NAME:W>``, ``<lora:NAME:TE:UNET>``, ``te=`` / ``unet=``, ``<lyco:...>``; bad weights and
  names are errors naming the tag.
- Names are file stems in a folder or its subfolders, or a kohya ``ss_output_name``; a missing name or a
  file that is not a LoRA is one `RequestError` before any merging.
- `LoraPatcher`: the text encoders change by the TE weight and the U-Net by the U-Net weight, exactly as
  `apply_lora` with those multipliers; restoring gives back the very tensors; the same set again computes
  nothing, until the model's own weights change; another set replaces the first; an error inside `using`
  still restores.
- One `Pipeline` shared by threads: runs take turns, so a LoRA merged for one run never reaches another.
- A pipeline dropped after a run is freed: the patcher of its bundle does not keep it alive.
"""

from __future__ import annotations

import gc
import re
import threading
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bundle_fixtures import tiny_bundle
from sdlab.api import Pipeline
from sdlab.checkpoints.lora import apply_lora
from sdlab.pipeline import prompt_loras
from sdlab.pipeline.prompt_loras import (
    LoraPatcher,
    LoraTag,
    LoraUse,
    find_lora,
    patcher_for,
    resolve_prompt_loras,
    split_prompt_loras,
    without_merged_tags,
)
from sdlab.pipeline.request import GenerationRequest, RequestError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.mark.parametrize("prompt, bare, tags", [
    ("a castle <lora:ink:0.8>", "a castle ", [LoraTag("ink", 0.8, 0.8, "<lora:ink:0.8>")]),
    ("<lora:ink>, a castle", ", a castle", [LoraTag("ink", 1.0, 1.0, "<lora:ink>")]),
    ("x <lora:ink:0.5:1.5> y", "x  y", [LoraTag("ink", 0.5, 1.5, "<lora:ink:0.5:1.5>")]),
    ("<lora:ink:te=0.25:unet=-1>", "", [LoraTag("ink", 0.25, -1.0, "<lora:ink:te=0.25:unet=-1>")]),
    ("<lyco:my style:0.3> z", " z", [LoraTag("my style", 0.3, 0.3, "<lyco:my style:0.3>")]),
    ("(a:1.2) <hypernet:h:1> [b]", "(a:1.2)  [b]", []),
])
def test_tags_follow_a1111_syntax(prompt, bare, tags):
    assert split_prompt_loras(prompt) == (bare, tags)


def _a1111_extra_networks(prompt: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """A1111 `extra_networks.parse_prompt` (its `re_extra_net` and `found`) and the kinds `activate` applies:
    `extra_network_registry.get(name)`, which holds the Lora extension's `lora` and its alias `lyco`."""
    re_extra_net = re.compile(r"<(\w+):([^>]+)>")
    found = []

    def keep(m):
        found.append((m.group(1), m.group(2).split(":")))
        return ""

    text = re.sub(re_extra_net, keep, prompt)
    registry = {"lora", "lyco"}
    return text, [(args[0], args[1:]) for name, args in found if name in registry]


EXTRA_NETWORK_PROMPTS = [
    "a castle <lora:ink:0.8>", "<lyco:ink:0.7>", "<LORA:ink:1> castle", "<Lora:ink:1>", "<LyCo:ink:1>",
    "<hypernet:anime:1> castle", "<embedding:foo>", "<lora: ink :0.5>", "<lora:ink:0.5", "<lora:ink:1>>",
    "<lora:ink:1><lora:ink:0.5>", "<lora:my-style.v2:1>", "<x-y:z>", "<lora:ink:1:0.5>", "[<lora:a:1>:<lora:b:1>:0.5]",
    "a <hypernet:h:1> b <lora:ink:0.3> c <lyco:x:te=1:unet=0.5>", "<_:x> <a1:b> <é:x>", "<lora:a\nb:1>",
]


@pytest.mark.parametrize("prompt", EXTRA_NETWORK_PROMPTS)
def test_every_extra_network_tag_leaves_the_prompt_and_only_lora_lyco_apply(prompt):
    bare, tags = split_prompt_loras(prompt)
    text, applied = _a1111_extra_networks(prompt)
    assert bare == text
    assert [tag.name for tag in tags] == [name.strip() for name, _ in applied]


def test_unapplied_kinds_are_warned_of_once(caplog, monkeypatch):
    monkeypatch.setattr(prompt_loras, "_warned_kinds", set())
    with caplog.at_level("WARNING", logger="sdlab.pipeline.prompt_loras"):
        for _ in range(3):
            split_prompt_loras("<hypernet:a:1> <hypernet:b:0.5> <LORA:ink:1> <lora:ink:1>")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "'hypernet'" in messages[0] and "'LORA'" in messages[1], messages


@pytest.mark.parametrize("prompt", ["<lora:ink:abc>", "<lora:ink:nan>", "<lora::1>", "<lora:ink:te=x>"])
def test_bad_tags_are_errors_naming_the_tag(prompt):
    with pytest.raises(ValueError, match="LoRA tag"):
        split_prompt_loras(prompt)


def _lora_file(path, modules: dict[str, dict[str, torch.Tensor]], metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{n}.{f}": t.contiguous() for n, m in modules.items() for f, t in m.items()}, str(path), metadata)
    return path


def _small_lora(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn
    return {TO_Q: {"lora_down.weight": r(2, 32, generator=g), "lora_up.weight": r(32, 2, generator=g),
                   "alpha": torch.tensor(1.0)},
            TE_Q: {"hada_w1_a": r(64, 2, generator=g), "hada_w1_b": r(2, 64, generator=g),
                   "hada_w2_a": r(64, 2, generator=g), "hada_w2_b": r(2, 64, generator=g)},
            CONV: {"diff": r(32, 32, 3, 3, generator=g) * 0.1, "diff_b": r(32, generator=g)}}


def test_files_are_found_by_stem_subfolder_and_output_name(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    top = _lora_file(a / "ink.safetensors", _small_lora(0))
    nested = _lora_file(b / "styles" / "deep" / "watercolor.safetensors", _small_lora(1))
    aliased = _lora_file(b / "misc" / "lora-v3-final.safetensors", _small_lora(2), {"ss_output_name": "paper"})
    assert find_lora("ink", [a, b]) == top
    assert find_lora("watercolor", [a, b]) == nested
    assert find_lora("watercolor", [a, b], recursive=False) is None       # flat folders: no subfolder walk
    assert find_lora("paper", [a, b]) == aliased
    assert find_lora("missing", [a, b]) is None
    with pytest.raises(ValueError, match="plain file name"):
        find_lora("../ink", [b])


def test_a_path_under_a_folder_finds_that_file_not_the_stems_first(tmp_path):
    """ComfyUI's lora_name, a file's path under a LoRA folder with its suffix ("b/ink.safetensors", which `sdlab
    serve` records where an earlier file has the stem), finds that file, not the stem's first (a/ink); a path that
    leaves the folder, is absolute, has a backslash or no LoRA suffix is a ValueError, a link out of the folder is
    not followed, a flat search (`recursive=False`) takes no path. Before, every path was a ValueError: `sdlab
    txt2img --from-png` of such a server picture stopped on 'not a plain file name'."""
    folder = tmp_path / "Lora"
    first = _lora_file(folder / "a" / "ink.safetensors", _small_lora(0))
    shadowed = _lora_file(folder / "b" / "ink.safetensors", _small_lora(1))
    outside = _lora_file(tmp_path / "elsewhere" / "out.safetensors", _small_lora(2))
    (folder / "c").mkdir()
    (folder / "c" / "out.safetensors").symlink_to(outside)
    assert find_lora("ink", [folder]) == first
    assert find_lora("b/ink.safetensors", [tmp_path / "none", folder]) == shadowed
    assert find_lora("b/ink.safetensors", [folder], recursive=False) is None
    assert find_lora("b/gone.safetensors", [folder]) is None
    assert find_lora("c/out.safetensors", [folder]) is None
    for name in ("../elsewhere/out.safetensors", "/abs/ink.safetensors", "b\\ink.safetensors", "b/ink",
                 "b//ink.safetensors", "b/./ink.safetensors"):
        with pytest.raises(ValueError, match="plain file name"):
            find_lora(name, [folder])


def test_missing_or_non_lora_files_are_one_error_before_merging(tmp_path):
    folder = tmp_path / "loras"
    _lora_file(folder / "ink.safetensors", _small_lora(0))
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
    bare, uses = resolve_prompt_loras("a <lora:ink:0.5> b", [folder])
    assert bare == "a  b" and uses == [LoraUse(folder / "ink.safetensors", 0.5, 0.5, "ink")]
    with pytest.raises(RequestError, match=r"<lora:nothere:1>.*no nothere\.safetensors.*loras"):
        resolve_prompt_loras("x <lora:nothere:1>", [folder])
    with pytest.raises(RequestError, match="model.safetensors.*not a LoRA"):
        resolve_prompt_loras("x <lora:model:1>", [folder])
    assert resolve_prompt_loras("no tags here", [folder]) == ("no tags here", [])


A1111_HYPERNETWORK = {320: [{"linear.0.weight": torch.zeros(640, 320), "linear.0.bias": torch.zeros(640)}] * 2,
                      "step": 5, "name": "hn", "layer_structure": [1, 2, 1], "activation_func": "linear"}


@pytest.mark.parametrize("stem, write, says", [
    ("emb", lambda p: save_file({"emb_params": torch.zeros(2, 32)}, str(p.with_suffix(".safetensors"))),
     "a textual-inversion embedding (emb_params), not a LoRA"),
    ("sdxl-emb", lambda p: save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 64)},
                                     str(p.with_suffix(".safetensors"))), "a textual-inversion embedding"),
    ("a1111-emb", lambda p: torch.save({"string_to_param": {"*": torch.zeros(2, 32)}, "name": "x", "step": 3},
                                       p.with_suffix(".pt")), "an A1111 textual-inversion embedding, not a model"),
    ("hn", lambda p: torch.save(A1111_HYPERNETWORK, p.with_suffix(".pt")),
     "an A1111 hypernetwork, which sdlab does not apply"),
])
def test_an_embedding_or_hypernetwork_named_as_a_lora_is_one_error_saying_what_it_is(tmp_path, stem, write, says):
    """A file of another kind in a LoRA folder (an A1111 / kohya / SDXL embedding, an A1111 hypernetwork), tagged
    ``<lora:...>``, is one RequestError naming the file and saying what it is (`load_lora_file`, which `--lora`
    reads too), not 'not a LoRA file ... a full model is passed with --model' or 'no tensors at the top level'."""
    folder = tmp_path / "loras"
    folder.mkdir()
    write(folder / stem)
    with pytest.raises(RequestError) as err:
        resolve_prompt_loras(f"x <lora:{stem}:1>", [folder])
    assert says in str(err.value) and str(folder / stem) in str(err.value), err.value
    assert "--model" not in str(err.value)


def _state(bundle) -> dict[str, torch.Tensor]:
    tensors = {f"unet.{k}": v for k, v in bundle.unet.state_dict().items()}
    for i, te in enumerate(bundle.text_encoders):
        tensors |= {f"te{i}.{k}": v for k, v in te.model.state_dict().items()}
    return {k: v.detach().clone() for k, v in tensors.items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def test_patcher_splits_te_and_unet_weights_and_restores_exactly(tmp_path):
    path = _lora_file(tmp_path / "ink.safetensors", _small_lora(3))
    bundle = tiny_bundle("sd1")
    original = _state(bundle)
    patcher = LoraPatcher(bundle)
    with patcher.using([LoraUse(path, 0.25, 1.5, "ink")]):
        patched = _state(bundle)
    _assert_same(_state(bundle), original)

    reference = tiny_bundle("sd1")
    apply_lora(reference, path, 0.25, unet_multiplier=1.5)
    expected = _state(reference)
    for key in patched:
        torch.testing.assert_close(patched[key], expected[key], atol=1e-6, rtol=1e-6)
    changed = [k for k in patched if not torch.equal(patched[k], original[k])]
    assert {k.split(".")[0] for k in changed} == {"unet", "te0"} and len(changed) == 4   # to_q, conv w + b, te q


def test_same_set_twice_computes_nothing_and_another_set_replaces_it(tmp_path, monkeypatch):
    ink = _lora_file(tmp_path / "ink.safetensors", _small_lora(4))
    paper = _lora_file(tmp_path / "paper.safetensors", _small_lora(5))
    bundle = tiny_bundle("sd1")
    original = _state(bundle)
    calls = []
    real = prompt_loras.bundle_lora_weights
    monkeypatch.setattr(prompt_loras, "bundle_lora_weights", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    patcher = patcher_for(bundle)
    assert patcher_for(bundle) is patcher
    with patcher.using([LoraUse(ink, 1.0, 1.0, "ink")]):
        first = _state(bundle)
    with patcher.using([LoraUse(ink, 1.0, 1.0, "ink")]):
        _assert_same(_state(bundle), first)
    assert calls == [ink]                                   # merged once, reused
    patcher.apply([LoraUse(ink, 1.0, 1.0, "ink"), LoraUse(paper, 0.5, 0.5, "paper")])
    stacked = _state(bundle)
    patcher.apply([LoraUse(ink, 1.0, 1.0, "ink"), LoraUse(paper, 0.5, 0.5, "paper")])   # already there
    assert calls == [ink, ink, paper]
    reference = tiny_bundle("sd1")
    apply_lora(reference, ink, 1.0)
    apply_lora(reference, paper, 0.5)
    for key, value in _state(reference).items():
        torch.testing.assert_close(stacked[key], value, atol=1e-5, rtol=1e-5)
    patcher.apply([])
    _assert_same(_state(bundle), original)


def _merge_for_good(bundle, path) -> None:
    apply_lora(bundle, path, 1.0)


def _load_merged_state(bundle, path) -> None:
    merged = tiny_bundle("sd1")
    apply_lora(merged, path, 1.0)
    bundle.unet.load_state_dict(merged.unet.state_dict())
    for te, merged_te in zip(bundle.text_encoders, merged.text_encoders):
        te.model.load_state_dict(merged_te.model.state_dict())


def _replace_tensors(bundle, path) -> None:
    merged = tiny_bundle("sd1")
    apply_lora(merged, path, 1.0)
    for mine, theirs in zip(bundle.unet.parameters(), merged.unet.parameters()):
        mine.data = theirs.data.clone()
    for te, merged_te in zip(bundle.text_encoders, merged.text_encoders):
        for mine, theirs in zip(te.model.parameters(), merged_te.model.parameters()):
            mine.data = theirs.data.clone()


@pytest.mark.parametrize("change", [_merge_for_good, _load_merged_state, _replace_tensors],
                         ids=["apply_lora", "load_state_dict", "new-tensors"])
def test_a_tag_after_the_weights_change_merges_into_the_new_weights(tmp_path, change):
    """The merged tensors kept from a tagged run were computed from the weights of that time: after the
    model's weights change (a LoRA merged for good, a state loaded into the layers, tensors replaced), the
    same tag draws what a fresh model with the new weights draws, not the old merge (before: up to 239 of
    255 off on a 64 px picture, the permanent LoRA gone from every layer the tag touches)."""
    folder = tmp_path / "loras"
    _lora_file(folder / "ink.safetensors", _small_lora(8))
    full = _lora_file(tmp_path / "full.safetensors", _small_lora(9))
    options = dict(steps=2, seed=1, width=32, height=32, sampler="Euler", preset=None)
    tagged = "a red apple <lora:ink:1>"
    pipe = Pipeline(tiny_bundle("sd1"))
    pipe.lora_dirs = [folder]
    pipe.txt2img(tagged, **options)
    change(pipe.bundle, full)
    again = np.asarray(pipe.txt2img(tagged, **options).images[0])

    fresh = Pipeline(tiny_bundle("sd1"))
    fresh.lora_dirs = [folder]
    apply_lora(fresh.bundle, full, 1.0)
    np.testing.assert_array_equal(again, np.asarray(fresh.txt2img(tagged, **options).images[0]))


def test_error_inside_the_block_still_restores(tmp_path):
    path = _lora_file(tmp_path / "ink.safetensors", _small_lora(6))
    bundle = tiny_bundle("sd1")
    original = _state(bundle)
    with pytest.raises(RuntimeError, match="boom"):
        with LoraPatcher(bundle).using([LoraUse(path, 1.0, 1.0, "ink")]):
            raise RuntimeError("boom")
    _assert_same(_state(bundle), original)


def test_lora_for_another_family_is_a_request_error_and_changes_nothing(tmp_path):
    path = _lora_file(tmp_path / "xl.safetensors", {
        "lora_unet_input_blocks_99_1_proj_in": {"lora_down.weight": torch.ones(2, 8), "lora_up.weight": torch.ones(8, 2)}})
    bundle = tiny_bundle("sd1")
    original = _state(bundle)
    with pytest.raises(RequestError, match="xl.safetensors.*matches a layer"):
        LoraPatcher(bundle).apply([LoraUse(path, 1.0, 1.0, "xl")])
    _assert_same(_state(bundle), original)


def test_a_name_tagged_twice_is_merged_twice_at_its_last_weights(tmp_path):
    """A1111 (`networks.load_networks`): one `Network` object per name, its multipliers set by each tag in
    turn, appended to `loaded_networks` once per tag; every entry is merged. ``<lora:ink:0.5> <lora:ink:0.3>``
    is the file twice at 0.3: for kinds linear in the multiplier (LoRA, LoHa, full diff here), the file
    once at 0.6 (within 1e-5; fp32)."""
    folder = tmp_path / "loras"
    path = _lora_file(folder / "ink.safetensors", _small_lora(4))
    bare, uses = resolve_prompt_loras("a <lora:ink:0.5> b <lora:ink:0.2:0.3>", [folder])
    assert bare == "a  b " and uses == [LoraUse(path, 0.2, 0.3, "ink")] * 2
    bare, uses = resolve_prompt_loras("a <lora:ink:0.5> b <lora:ink:0.3>", [folder])
    assert uses == [LoraUse(path, 0.3, 0.3, "ink")] * 2
    bundle = tiny_bundle("sd1")
    with LoraPatcher(bundle).using(uses):
        patched = _state(bundle)
    reference = tiny_bundle("sd1")
    apply_lora(reference, path, 0.6)
    expected = _state(reference)
    original = _state(tiny_bundle("sd1"))
    changed = [k for k in patched if not torch.equal(patched[k], original[k])]
    assert len(changed) == 4
    for key in patched:
        torch.testing.assert_close(patched[key], expected[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora-run-first", "plain-run-first"])
def test_runs_from_two_threads_take_turns_and_draw_with_their_own_weights(tmp_path, lora_first):
    """One `Pipeline` shared by two threads: the first run waits inside its first step for the second run to
    take a step. The second must not (it waits for the first to end), and each picture equals its run alone:
    a LoRA merged for one run never reaches the other."""
    folder = tmp_path / "loras"
    _lora_file(folder / "ink.safetensors", _small_lora(7))
    pipe = Pipeline(tiny_bundle("sd1"))
    pipe.lora_dirs = [folder]
    options = dict(steps=2, seed=3, width=32, height=32, sampler="Euler", preset=None)
    plain, tagged = "a red apple", "a red apple <lora:ink:1>"
    alone = {prompt: np.asarray(pipe.txt2img(prompt, **options).images[0]) for prompt in (plain, tagged)}
    assert not np.array_equal(alone[plain], alone[tagged])
    first, second = (tagged, plain) if lora_first else (plain, tagged)

    first_inside, second_stepped, overlapped = threading.Event(), threading.Event(), []

    def hold_first_step(info) -> None:
        if not first_inside.is_set():
            first_inside.set()
            overlapped.append(second_stepped.wait(timeout=2.0))

    pictures = {}

    def draw_first() -> None:
        pictures[first] = np.asarray(pipe.txt2img(first, progress=hold_first_step, **options).images[0])

    thread = threading.Thread(target=draw_first)
    thread.start()
    assert first_inside.wait(timeout=60)
    pictures[second] = np.asarray(pipe.txt2img(second, progress=lambda info: second_stepped.set(), **options).images[0])
    thread.join()
    assert overlapped == [False]
    for prompt in (plain, tagged):
        np.testing.assert_array_equal(pictures[prompt], alone[prompt])


def test_a_pipeline_dropped_after_a_run_frees_its_model():
    """Every run takes the bundle's patcher (`patcher_for`), whose table keys on the U-Net weakly: the patcher
    must not hold the model alive, or each model a server switches away from stays in memory."""
    pipe = Pipeline(tiny_bundle("sd1"))
    pipe.txt2img("a red apple", steps=1, seed=3, width=32, height=32, sampler="Euler", preset=None)
    unet = weakref.ref(pipe.bundle.unet)
    del pipe
    gc.collect()
    assert unet() is None


@pytest.mark.parametrize("prompt, weight, drawn, recorded", [
    ("# old: <lora:ink:1>\na castle <lora:ink:1>", 1.0, "\na castle ", "\na castle <lora:ink:1>"),
    ("# <lora:ink:1>\n<lora:ink:1> <lora:ink:1>", 1.0, "\n ", "\n<lora:ink:1> <lora:ink:1>"),
    ("# old: <lora:ink:0.5>\na castle <lora:ink:0.5>", 0.7, "\na castle ", "\na castle "),
])
def test_a_merged_loras_tag_is_left_out_where_it_applies_not_in_a_comment(prompt, weight, drawn, recorded):
    """`without_merged_tags` leaves out the tags of a LoRA merged at load (`--lora`, the native `loras`) from
    the prompt the pipeline reads, without its comments: a commented-out copy of the tag taken out instead
    would leave the live one to be merged a second time for the run."""
    assert without_merged_tags(prompt, {"ink": weight}) == (drawn, recorded)
    assert split_prompt_loras(drawn)[1] == []


def test_a_pipelines_lora_lookup_is_given_at_load_and_kept_by_with_refiner(tmp_path):
    """A lookup of tag names (a server's list of LoRAs, the CLI's search) is the pipeline's from its making,
    `load(find_lora=...)` or the constructor, never an attribute set afterwards; `with_refiner` keeps it, and
    the folders too."""
    import sdlab

    path = _lora_file(tmp_path / "kept" / "a-file-of-another-name.safetensors", _small_lora(5))
    lookup = {"ink": path}.get
    loaded = sdlab.load(find_lora=lookup, lora_dirs=[tmp_path / "none"])
    made = Pipeline(tiny_bundle("sd1"), find_lora=lookup)
    for pipe in (loaded, loaded.with_refiner(None), made, made.with_refiner(None, 0.5)):
        assert pipe.find_lora("ink") == path and pipe.find_lora("other") is None
    assert loaded.with_refiner(None).lora_dirs[0] == tmp_path / "none"
    made.resolve(GenerationRequest("a <lora:ink:1>", steps=1, width=32, height=32))     # found: no RequestError
    folders = Pipeline(tiny_bundle("sd1"), lora_dirs=[path.parent])
    assert folders.with_refiner(None).find_lora("a-file-of-another-name") == path


def test_lora_dirs_given_to_load_come_before_the_models_own_folders(tmp_path):
    """`load(lora_dirs=...)` searches the given folders first and then the model's own, as the CLI's `--lora-dir`
    adds to them: the shipped model's `<lora:sdlab-tiny-lcm:1>` tag is still found (it was a RequestError once
    a folder was given), and a file in a given folder wins over one of the same name beside the model."""
    import sdlab

    shipped = sdlab.load().lora_dirs
    assert shipped and shipped[0].joinpath("sdlab-tiny-lcm.safetensors").is_file()
    path = _lora_file(tmp_path / "mine" / "sdlab-tiny-lcm.safetensors", _small_lora(5))
    pipe = sdlab.load(lora_dirs=[tmp_path / "none", path.parent])
    assert pipe.lora_dirs == [tmp_path / "none", path.parent, *shipped]
    assert pipe.find_lora("sdlab-tiny-lcm") == path
    pipe = sdlab.load(lora_dirs=[tmp_path / "none"])
    assert pipe.find_lora("sdlab-tiny-lcm") == shipped[0] / "sdlab-tiny-lcm.safetensors"
    pipe.resolve(GenerationRequest("a cat <lora:sdlab-tiny-lcm:1>", steps=1))      # found: no RequestError
