"""`sdlab merge` against A1111's Checkpoint Merger, transcribed below (`a1111_run_modelmerger`), on tiny random
checkpoints: the same keys, dtypes and bit-identical tensors for every interpolation, fp16, VAE baking,
discarding, inpainting / instruct-pix2pix A, keys missing in B or C; the metadata A1111 writes; the merged
file loads and draws; a diffusers folder merges as its single file does; errors are one line and write
nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bundle_fixtures import tiny_bundle, write_diffusers_folder, write_original
from cli_helpers import run
from sdlab.checkpoints.io import read_checkpoint, write_safetensors_atomic
from sdlab.checkpoints.merge import (
    ADD_DIFFERENCE, NO_INTERPOLATION, WEIGHTED_SUM, MergeOptions, merge_checkpoints,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


# ----------------------------------------------------------------------------------------------------------
# The reference: AUTOMATIC1111/stable-diffusion-webui 1.10, modules/extras.py `run_modelmerger` (its tensor
# work, without the UI state and file naming), `to_half` and `checkpoint_dict_skip_on_merge`; the state dicts
# as its `sd_models.read_state_dict` returns them (`get_state_dict_from_checkpoint`'s SD1 renames) and
# `sd_vae.load_vae_dict`.

checkpoint_dict_skip_on_merge = ["cond_stage_model.transformer.text_model.embeddings.position_ids"]

checkpoint_dict_replacements_sd1 = {
    'cond_stage_model.transformer.embeddings.': 'cond_stage_model.transformer.text_model.embeddings.',
    'cond_stage_model.transformer.encoder.': 'cond_stage_model.transformer.text_model.encoder.',
    'cond_stage_model.transformer.final_layer_norm.': 'cond_stage_model.transformer.text_model.final_layer_norm.',
}


def transform_checkpoint_dict_key(k, replacements):
    for text, replacement in replacements.items():
        if k.startswith(text):
            k = replacement + k[len(text):]
    return k


def read_state_dict(path):
    return {transform_checkpoint_dict_key(k, checkpoint_dict_replacements_sd1): v for k, v in load_file(str(path)).items()}


def load_vae_dict(path):
    vae_ckpt = read_state_dict(path)
    return {k: v for k, v in vae_ckpt.items() if k[0:4] != "loss" and k not in {"model_ema.decay", "model_ema.num_updates"}}


def to_half(tensor, enable):
    if enable and tensor.dtype == torch.float:
        return tensor.half()
    return tensor


def a1111_run_modelmerger(theta_0, theta_1, theta_2, interp_method, multiplier, save_as_half, vae_dict,
                          discard_weights):
    def weighted_sum(theta0, theta1, alpha):
        return ((1 - alpha) * theta0) + (alpha * theta1)

    def get_difference(theta1, theta2):
        return theta1 - theta2

    def add_difference(theta0, theta1_2_diff, alpha):
        return theta0 + (alpha * theta1_2_diff)

    theta_funcs = {
        "Weighted sum": (None, weighted_sum),
        "Add difference": (get_difference, add_difference),
        "No interpolation": (None, None),
    }
    theta_func1, theta_func2 = theta_funcs[interp_method]
    result_is_inpainting_model = False
    result_is_instruct_pix2pix_model = False
    if not theta_func2:
        theta_1 = None
    if theta_func1:
        for key in theta_1.keys():
            if key in checkpoint_dict_skip_on_merge:
                continue
            if 'model' in key:
                if key in theta_2:
                    t2 = theta_2.get(key, torch.zeros_like(theta_1[key]))
                    theta_1[key] = theta_func1(theta_1[key], t2)
                else:
                    theta_1[key] = torch.zeros_like(theta_1[key])
    for key in theta_0.keys():
        if theta_1 and 'model' in key and key in theta_1:
            if key in checkpoint_dict_skip_on_merge:
                continue
            a = theta_0[key]
            b = theta_1[key]
            if a.shape != b.shape and a.shape[0:1] + a.shape[2:] == b.shape[0:1] + b.shape[2:]:
                if a.shape[1] == 4 and b.shape[1] == 9:
                    raise RuntimeError("When merging inpainting model with a normal one, A must be the inpainting model.")
                if a.shape[1] == 4 and b.shape[1] == 8:
                    raise RuntimeError("When merging instruct-pix2pix model with a normal one, A must be the instruct-pix2pix model.")
                if a.shape[1] == 8 and b.shape[1] == 4:
                    theta_0[key][:, 0:4, :, :] = theta_func2(a[:, 0:4, :, :], b, multiplier)
                    result_is_instruct_pix2pix_model = True
                else:
                    assert a.shape[1] == 9 and b.shape[1] == 4, f"Bad dimensions for merged layer {key}: A={a.shape}, B={b.shape}"
                    theta_0[key][:, 0:4, :, :] = theta_func2(a[:, 0:4, :, :], b, multiplier)
                    result_is_inpainting_model = True
            else:
                theta_0[key] = theta_func2(a, b, multiplier)
            theta_0[key] = to_half(theta_0[key], save_as_half)
    if vae_dict is not None:
        for key in vae_dict.keys():
            theta_0_key = 'first_stage_model.' + key
            if theta_0_key in theta_0:
                theta_0[theta_0_key] = to_half(vae_dict[key], save_as_half)
    if save_as_half and not theta_func2:
        for key in theta_0.keys():
            theta_0[key] = to_half(theta_0[key], save_as_half)
    if discard_weights:
        regex = re.compile(discard_weights)
        for key in list(theta_0):
            if re.search(regex, key):
                theta_0.pop(key, None)
    return theta_0, result_is_inpainting_model, result_is_instruct_pix2pix_model


# ----------------------------------------------------------------------------------------------------------
# Fixtures and helpers


def _write(state: dict, path: Path, metadata: dict | None = None) -> Path:
    return write_safetensors_atomic(path, state, metadata)


def _original(family: str, seed: int, path: Path, *, dtype: torch.dtype | None = None, drop: tuple[str, ...] = (),
              metadata: dict | None = None, junk: bool = True) -> Path:
    """A tiny single file as released ones are (`junk`: EMA scalars, schedule, CLIP position ids)."""
    path = write_original(tiny_bundle(family, seed), path, drop=drop, metadata=metadata, junk=junk)
    if dtype is not None:
        state = load_file(str(path))
        _write({k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in state.items()}, path, metadata)
    return path


def _reference(paths, method, m, *, half=False, vae=None, discard=""):
    states = [read_state_dict(p) for p in paths] + [None] * (3 - len(paths))
    return a1111_run_modelmerger(*states, method, m, half, load_vae_dict(vae) if vae else None, discard)


def _assert_same(merged: Path, expected: dict):
    got = load_file(str(merged))
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd1")
    return [_original("sd1", seed, d / f"{name}.safetensors") for seed, name in ((1, "a"), (2, "b"), (3, "c"))]


# ----------------------------------------------------------------------------------------------------------
# Tensors: bit-identical to A1111's


@pytest.mark.parametrize("method, m", [(WEIGHTED_SUM, 0.3), (WEIGHTED_SUM, 0.77), (ADD_DIFFERENCE, 0.5),
                                       (NO_INTERPOLATION, 0.3)])
def test_the_merge_is_a1111s_on_sd1(sd1, tmp_path, method, m):
    paths = sd1[:{NO_INTERPOLATION: 1, WEIGHTED_SUM: 2, ADD_DIFFERENCE: 3}[method]]
    result = merge_checkpoints(paths, tmp_path / "m.safetensors", MergeOptions(method=method, multiplier=m))
    expected, _, _ = _reference(paths, method, m)
    _assert_same(result.path, expected)
    assert "model_ema.decay" in expected and "betas" in expected                 # A's own keys travel


def test_fp16_inputs_half_output_vae_and_discard_are_a1111s_on_sdxl(tmp_path):
    """fp16 A with fp32 B and C (merged in the promoted dtype, then halved), an fp32 VAE baked in and halved,
    a discard regex; the SDXL layouts."""
    a = _original("sdxl", 1, tmp_path / "a.safetensors", dtype=torch.float16)
    b = _original("sdxl", 2, tmp_path / "b.safetensors")
    c = _original("sdxl", 3, tmp_path / "c.safetensors", dtype=torch.float16)
    vae = _write({k: v.contiguous() for k, v in tiny_bundle("sdxl", 9).vae.state_dict().items()},
                 tmp_path / "vae.safetensors")
    options = MergeOptions(method=ADD_DIFFERENCE, multiplier=0.6, save_as_half=True, vae=vae,
                           discard=r"^model_ema|\.logit_scale$")
    result = merge_checkpoints([a, b, c], tmp_path / "m.safetensors", options)
    expected, _, _ = _reference([a, b, c], ADD_DIFFERENCE, 0.6, half=True, vae=vae, discard=options.discard)
    _assert_same(result.path, expected)
    baked = load_file(str(vae))
    merged = load_file(str(result.path))
    assert torch.equal(merged["first_stage_model.decoder.conv_out.weight"], baked["decoder.conv_out.weight"].half())
    assert not any(k.startswith("model_ema") for k in merged)


def test_no_interpolation_halves_every_fp32_tensor(sd1, tmp_path):
    result = merge_checkpoints(sd1[:1], tmp_path / "m.safetensors", MergeOptions(method=NO_INTERPOLATION,
                                                                                  save_as_half=True))
    expected, _, _ = _reference(sd1[:1], NO_INTERPOLATION, 0.3, half=True)
    _assert_same(result.path, expected)
    assert {v.dtype for v in expected.values()} == {torch.float16, torch.int32}


def test_keys_missing_in_b_or_c_and_old_clip_names_follow_a1111(tmp_path, caplog):
    """B without its VAE, C without a text tower, B with the pre-`text_model.` CLIP names of old SD1 files."""
    a = _original("sd1", 1, tmp_path / "a.safetensors")
    b_state = load_file(str(_original("sd1", 2, tmp_path / "b0.safetensors", drop=("first_stage_model.",))))
    b = _write({k.replace("transformer.text_model.", "transformer."): v for k, v in b_state.items()},
               tmp_path / "b.safetensors")
    c = _original("sd1", 3, tmp_path / "c.safetensors", drop=("cond_stage_model.",))
    for method, paths in ((WEIGHTED_SUM, [a, b]), (ADD_DIFFERENCE, [a, b, c])):
        result = merge_checkpoints(paths, tmp_path / "m.safetensors", MergeOptions(method=method, multiplier=0.4))
        expected, _, _ = _reference(paths, method, 0.4)
        _assert_same(result.path, expected)
        assert all(k.startswith("first_stage_model.") for k in result.unmatched) and result.unmatched
    assert "are not in B and stay A's" in caplog.text


def test_keys_discarded_are_not_counted_as_kept_from_a(sd1, tmp_path, caplog):
    """A's EMA weights, discarded, are not "not in B and stay A's" when a pruned B lacks them."""
    pruned = _original("sd1", 2, tmp_path / "pruned.safetensors", drop=("model_ema.",))
    result = merge_checkpoints([sd1[0], pruned], tmp_path / "m.safetensors", MergeOptions(discard="^model_ema"))
    assert result.unmatched == () and "stay A's" not in caplog.text
    assert not any(k.startswith("model_ema") for k in load_file(str(result.path)))
    kept = merge_checkpoints([sd1[0], pruned], tmp_path / "k.safetensors")
    assert kept.unmatched and all(k.startswith("model_ema.") for k in kept.unmatched) and "stay A's" in caplog.text


def _with_conv_in(path: Path, channels: int, seed: int, out: Path) -> Path:
    state = load_file(str(path))
    weight = state[CONV_IN]
    g = torch.Generator().manual_seed(seed)
    state[CONV_IN] = torch.cat([weight, torch.randn(weight.shape[0], channels - 4, *weight.shape[2:], generator=g)], 1)
    return _write(state, out)


@pytest.mark.parametrize("channels, flag", [(9, "is_inpainting"), (8, "is_instruct_pix2pix")])
def test_an_inpainting_or_pix2pix_a_merges_its_latent_channels(sd1, tmp_path, channels, flag):
    a = _with_conv_in(sd1[0], channels, 5, tmp_path / "a.safetensors")
    result = merge_checkpoints([a, sd1[1], sd1[2]], tmp_path, MergeOptions(method=ADD_DIFFERENCE, multiplier=1.0))
    expected, inpainting, pix2pix = _reference([a, sd1[1], sd1[2]], ADD_DIFFERENCE, 1.0)
    _assert_same(result.path, expected)
    assert (result.is_inpainting, result.is_instruct_pix2pix) == (inpainting, pix2pix)
    assert getattr(result, flag)
    assert result.path.name == f"a + 1.0(b - c).{'inpainting' if channels == 9 else 'instruct-pix2pix'}.safetensors"
    merged = load_file(str(result.path))
    assert torch.equal(merged[CONV_IN][:, 4:], load_file(str(a))[CONV_IN][:, 4:])   # A's extra channels kept
    assert json.loads(read_checkpoint(result.path)[1]["sd_merge_recipe"])[flag] is True


def test_a_normal_a_with_an_inpainting_b_is_refused_as_a1111_refuses_it(sd1, tmp_path, capsys):
    b = _with_conv_in(sd1[1], 9, 5, tmp_path / "b.safetensors")
    with pytest.raises(RuntimeError, match="A must be the inpainting model"):
        _reference([sd1[0], b], WEIGHTED_SUM, 0.5)
    code, out, err = run(["merge", str(sd1[0]), str(b), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert code == 2 and "A must be the inpainting model" in err and len(err.splitlines()) == 1
    assert list(tmp_path.glob("m*")) == [] and list(tmp_path.glob(".*tmp")) == []


def _linear_vae_attention(path: Path, out: Path) -> Path:
    """The file with its VAE attention projections stored as linear [C, C], as some converted files are."""
    state = load_file(str(path))
    attention = re.compile(r"^first_stage_model\..*\.attn_1\.(q|k|v|proj_out)\.weight$")
    return _write({k: v[:, :, 0, 0] if attention.match(k) else v for k, v in state.items()}, out)


def test_vae_attention_stored_as_linear_merges_in_the_layout_of_a(sd1, tmp_path):
    """sdlab loads a VAE's attention projections as linear [C, C] or 1x1 convs [C, C, 1, 1]: B and C in the other
    layout take A's, and the merge is the one of the files in A's layout."""
    from sdlab.checkpoints.load import load_bundle

    linear = [_linear_vae_attention(p, tmp_path / f"{p.stem}_linear.safetensors") for p in sd1]
    load_bundle(linear[1], dtype=torch.float32)                                        # sdlab loads it
    key = "first_stage_model.decoder.mid.attn_1.k.weight"
    for method, paths in ((WEIGHTED_SUM, [sd1[0], linear[1]]), (ADD_DIFFERENCE, [sd1[0], linear[1], linear[2]]),
                          (ADD_DIFFERENCE, [linear[0], sd1[1], linear[2]])):
        options = MergeOptions(method=method, multiplier=0.6)
        result = merge_checkpoints(paths, tmp_path / "m.safetensors", options)
        a_layout = [sd1[i] if paths[0] == sd1[0] else linear[i] for i in range(len(paths))]
        _assert_same(result.path, _reference(a_layout, method, 0.6)[0])
        assert load_file(str(result.path))[key].shape == load_file(str(paths[0]))[key].shape


# ----------------------------------------------------------------------------------------------------------
# The output: loads, draws, other formats and inputs


def test_a_ckpt_merge_is_written_tensor_by_tensor_as_torch_save_writes_it(sd1, tmp_path, monkeypatch):
    """A `.ckpt` merge holds one merged tensor at a time (it held them all before torch.save), and its pickle is
    byte for byte the one torch.save writes for the same tensors (A1111's `torch.save(theta_0, output)`)."""
    import weakref
    import zipfile

    from sdlab.checkpoints.merge import MergedState

    made = MergedState.__getitem__
    alive: list[weakref.ref] = []
    most = []

    def tracked(self, key):
        tensor = made(self, key)
        alive[:] = [ref for ref in alive if ref() is not None] + [weakref.ref(tensor)]
        most.append(len(alive))
        return tensor

    merged = merge_checkpoints(sd1[:2], tmp_path / "m.safetensors").path
    monkeypatch.setattr(MergedState, "__getitem__", tracked)
    ckpt = merge_checkpoints(sd1[:2], tmp_path / "m.ckpt").path
    assert max(most) == 1 and len(most) == len(load_file(str(merged)))
    torch.save(load_file(str(merged)), tmp_path / "reference.ckpt")
    pickles = []
    for path in (ckpt, tmp_path / "reference.ckpt"):
        with zipfile.ZipFile(path) as archive:
            pickles.append(archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl"))))
    assert pickles[0] == pickles[1]


def test_the_merged_file_loads_and_draws_and_a_ckpt_holds_the_same(sd1, tmp_path):
    from sdlab.api import Pipeline
    from sdlab.checkpoints.load import load_bundle

    merged = merge_checkpoints(sd1[:2], tmp_path / "m.safetensors").path
    ckpt = merge_checkpoints(sd1[:2], tmp_path / "m.ckpt").path
    tensors, _ = read_checkpoint(ckpt)                                               # weights-only unpickling
    assert {k: v for k, v in tensors.items()}.keys() == load_file(str(merged)).keys()
    assert all(torch.equal(tensors[k], v) for k, v in load_file(str(merged)).items())
    pictures = []
    for path in (sd1[0], merged, ckpt):
        bundle = load_bundle(path, dtype=torch.float32)
        image = Pipeline(bundle).txt2img("a red house", steps=2, seed=3, width=64, height=64).images[0]
        pictures.append(np.asarray(image, dtype=np.int16))
    a = tiny_bundle("sd1", 1).unet.state_dict()["out.2.weight"]
    b = tiny_bundle("sd1", 2).unet.state_dict()["out.2.weight"]
    assert torch.equal(load_bundle(merged, dtype=torch.float32).unet.state_dict()["out.2.weight"], 0.7 * a + 0.3 * b)
    assert np.abs(pictures[0] - pictures[1]).max() > 0 and np.array_equal(pictures[1], pictures[2])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_diffusers_folder_merges_as_its_single_file(tmp_path, family):
    """B as a diffusers folder (SDXL: its OpenCLIP tower converted whole) or as the single file of the same
    weights: the same merge; a folder A writes sdlab's single-file layout."""
    a = _original(family, 1, tmp_path / "a.safetensors", junk=False)
    b_file = _original(family, 2, tmp_path / "b.safetensors")
    b_folder = write_diffusers_folder(tiny_bundle(family, 2), tmp_path / "b_folder")
    from_file = merge_checkpoints([a, b_file], tmp_path / "f.safetensors", MergeOptions(multiplier=0.25)).path
    from_folder = merge_checkpoints([a, b_folder], tmp_path / "d.safetensors", MergeOptions(multiplier=0.25)).path
    _assert_same(from_folder, load_file(str(from_file)))
    folder_a = merge_checkpoints([b_folder, a], tmp_path / "r.safetensors", MergeOptions(multiplier=0.75)).path
    expected = load_file(str(from_file))
    got = load_file(str(folder_a))
    assert set(got) <= set(expected)
    assert all(torch.allclose(got[k], expected[k], atol=1e-7) for k in got)       # (1-M)b + Ma vs (1-M)a + Mb


def test_sd2s_openclip_layout_merges_as_a1111(tmp_path):
    paths = [_original("sd2", seed, tmp_path / f"{seed}.safetensors") for seed in (1, 2)]
    result = merge_checkpoints(paths, tmp_path / "m.safetensors", MergeOptions(multiplier=0.5))
    _assert_same(result.path, _reference(paths, WEIGHTED_SUM, 0.5)[0])


def test_families_do_not_mix(sd1, tmp_path, capsys):
    sdxl = _original("sdxl", 1, tmp_path / "x.safetensors")
    code, _, err = run(["merge", str(sd1[0]), str(sdxl), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert code == 2 and "different families" in err and "sdxl" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------
# Metadata, names, config


def test_metadata_is_a1111s(tmp_path):
    from sdlab.checkpoints.controlnet import legacy_hash
    from sdlab.pipeline.png_info import file_sha256

    a = _original("sd1", 1, tmp_path / "a.safetensors", metadata={"sdlab.family": "sd1", "from": "a", "both": "a"})
    b = _original("sd1", 2, tmp_path / "b.safetensors", metadata={"sdlab.prediction": "v", "both": "b"})
    first = merge_checkpoints([a, b], tmp_path / "ab.safetensors",
                              MergeOptions(multiplier=0.4, metadata_json={"title": "mine", "n": 3}))
    meta = read_checkpoint(first.path)[1]
    assert meta["format"] == "pt" and meta["from"] == "a" and meta["both"] == "b" and meta["title"] == "mine"
    assert meta["n"] == "3"
    assert meta["sdlab.family"] == "sd1" and "sdlab.prediction" not in meta       # sdlab's own keys: A's
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe == {"type": "webui", "primary_model_hash": file_sha256(a), "secondary_model_hash": file_sha256(b),
                      "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.4,
                      "save_as_half": False, "custom_name": "", "config_source": 0, "bake_in_vae": "None",
                      "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    models = json.loads(meta["sd_merge_models"])
    assert models == {file_sha256(a): {"name": "a.safetensors", "legacy_hash": legacy_hash(a), "sd_merge_recipe": None},
                      file_sha256(b): {"name": "b.safetensors", "legacy_hash": legacy_hash(b), "sd_merge_recipe": None}}
    again = merge_checkpoints([first.path, a], tmp_path / "again.safetensors")        # a merge of a merge
    models = json.loads(read_checkpoint(again.path)[1]["sd_merge_models"])
    assert models[file_sha256(first.path)]["sd_merge_recipe"] == recipe and file_sha256(b) in models
    bare = merge_checkpoints([a, b], tmp_path / "bare.safetensors", MergeOptions(save_metadata=False))
    assert read_checkpoint(bare.path)[1] == {}


def test_the_metadata_sdlab_loads_by_comes_from_a_and_the_merge_is_named_by_its_file(tmp_path):
    """B's prediction type, native size and title do not describe the merge, which A1111 draws as A (its model
    name: the file's); A's `v_pred` marker key is not outranked by B's metadata saying epsilon."""
    from sdlab.checkpoints.load import plan_checkpoint
    from sdlab.checkpoints.tolerated import COMFY_V_PRED_KEY
    from sdlab.pipeline.png_info import model_name

    b_says = {"modelspec.prediction_type": "v", "modelspec.predict_key": "v", "modelspec.resolution": "768x768",
              "modelspec.title": "Model B", "modelspec.architecture": "b-arch"}
    a = _original("sdxl", 1, tmp_path / "a.safetensors", metadata={"modelspec.title": "Model A", "keep": "a"})
    b = _original("sdxl", 2, tmp_path / "b.safetensors", metadata=b_says)
    assert plan_checkpoint(b).report.prediction.value == "v" and model_name(b) == "Model B"
    merged = merge_checkpoints([a, b], tmp_path / "m.safetensors").path
    report = plan_checkpoint(merged).report
    assert (report.prediction, report.native_size) == (plan_checkpoint(a).report.prediction, None)
    assert model_name(merged) == "m"
    meta = read_checkpoint(merged)[1]
    assert meta["keep"] == "a" and not any(k.startswith("modelspec.") for k in meta)
    a_v = _write({**load_file(str(a)), COMFY_V_PRED_KEY: torch.tensor([])}, tmp_path / "av.safetensors",
                 {"modelspec.architecture": "a-arch"})
    b_eps = _original("sdxl", 2, tmp_path / "be.safetensors", metadata={"modelspec.prediction_type": "epsilon"})
    merged = merge_checkpoints([a_v, b_eps], tmp_path / "mv.safetensors").path
    assert plan_checkpoint(merged).report.prediction.value == "v"
    assert read_checkpoint(merged)[1]["modelspec.architecture"] == "a-arch"
    a_says = _original("sdxl", 1, tmp_path / "as.safetensors", metadata=b_says)
    merged = merge_checkpoints([a_says, b_eps], tmp_path / "ms.safetensors").path
    report = plan_checkpoint(merged).report
    assert (report.prediction.value, report.native_size, model_name(merged)) == ("v", 768, "ms")


def test_a_ckpts_top_level_entries_are_not_copied_as_metadata(sd1, tmp_path):
    """A1111's `CheckpointInfo.metadata` is read from a `.safetensors` header alone: a Lightning `.ckpt`'s
    `epoch` / `global_step` / version entries are no metadata to copy."""
    entries = {"epoch": 6, "global_step": 840000, "pytorch-lightning_version": "1.4.2"}
    ckpts = []
    for path in sd1[:2]:
        ckpts.append(tmp_path / f"{path.stem}.ckpt")
        torch.save({"state_dict": load_file(str(path)), **entries}, ckpts[-1])
    assert read_checkpoint(ckpts[0])[1]["global_step"] == "840000"
    for paths in (ckpts, [sd1[0], ckpts[1]]):
        meta = read_checkpoint(merge_checkpoints(paths, tmp_path / "m.safetensors").path)[1]
        assert set(meta) == {"format", "sd_merge_recipe", "sd_merge_models"}


def test_the_merge_is_hashed_as_it_is_saved_and_listed_with_its_hash(sd1, tmp_path, monkeypatch):
    """A1111's `run_modelmerger` ends with `created_model.calculate_shorthash()`: the new model's title carries
    its hash at once (the inputs' hashes are not needed: no recipe)."""
    import hashlib

    from sdlab.server.registry import ModelRegistry
    from sdlab.utils.file_hashes import known_file_sha256

    monkeypatch.setenv("SDLAB_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "Stable-diffusion"
    folder.mkdir()
    options = MergeOptions(add_recipe=False)
    made = [merge_checkpoints(sd1[:2], folder, options).path,
            merge_checkpoints(sd1[:2], folder, options, checkpoint_format="ckpt").path]
    for path in made:
        assert known_file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert known_file_sha256(sd1[0]) is None
    titles = {c.as_a1111()["title"] for c in ModelRegistry(made[0], tmp_path).checkpoints}
    assert titles == {f"{p.name} [{hashlib.sha256(p.read_bytes()).hexdigest()[:10]}]" for p in made}


def test_an_out_ending_in_a_slash_is_a_folder_made_when_the_merge_is_written(sd1, tmp_path, capsys, monkeypatch):
    """The README's `--out models/`, with no `models` yet: the folder is made, the merge gets A1111's name; a
    merge that fails makes no folder."""
    monkeypatch.chdir(tmp_path)
    inpaint = _with_conv_in(sd1[0], 9, 5, tmp_path / "inpaint.safetensors")
    code, printed, err = run(["merge", str(inpaint), *map(str, sd1[1:]), "--method", "add-difference", "-M", "1",
                              "--out", "models/"], capsys)
    assert code == 0, err
    assert Path(printed.strip()) == Path("models") / "inpaint + 1.0(b - c).inpainting.safetensors"
    assert (tmp_path / printed.strip()).is_file()
    made = merge_checkpoints(sd1[:2], f"{tmp_path / 'a' / 'b'}/", checkpoint_format="ckpt").path
    assert made == tmp_path / "a" / "b" / "0.7(a) + 0.3(b).ckpt" and made.is_file()
    code, _, err = run(["merge", str(sd1[0]), "--out", "new/"], capsys)
    assert code == 2 and "merges 2 models" in err and not (tmp_path / "new").exists()
    code, _, err = run(["merge", *map(str, sd1[:2]), "--out", "new"], capsys)
    assert code == 2 and "ending in '/'" in err and not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    code, _, err = run(["merge", *map(str, sd1[:2]), "--out", "file/"], capsys)
    assert code == 2 and "not a folder" in err and len(err.splitlines()) == 1


def test_the_recipes_hashes_are_the_registrys(sd1, tmp_path, monkeypatch):
    """The inputs' sha256 comes from the one cached helper the model list and the infotexts use
    (`file_hashes.file_sha256`): each file read once, whoever asks first."""
    from sdlab.utils import file_hashes

    monkeypatch.setenv("SDLAB_CACHE_DIR", str(tmp_path / "cache"))
    read, real = [], file_hashes._file_sha256
    monkeypatch.setattr(file_hashes, "_file_sha256", lambda path: read.append(path.name) or real(path))
    file_hashes.file_sha256(sd1[0])
    merged = merge_checkpoints(sd1[:2], tmp_path / "m.safetensors").path
    assert sorted(read) == ["a.safetensors", "b.safetensors", "m.safetensors"]
    recipe = json.loads(read_checkpoint(merged)[1]["sd_merge_recipe"])
    assert recipe["secondary_model_hash"] == file_hashes.known_file_sha256(sd1[1]) == real(sd1[1])


def test_the_users_json_names_sdlab_and_modelspec_keys_too(sd1, tmp_path, capsys):
    """`--metadata-json` marking a merge's prediction (`sdlab.prediction`) or naming it (`modelspec.title`) is
    written, over A's own keys; `format` stays A1111's "pt"."""
    from sdlab.checkpoints.load import plan_checkpoint
    from sdlab.pipeline.png_info import model_name

    a = _original("sd1", 1, tmp_path / "a.safetensors", metadata={"sdlab.prediction": "eps"})
    out = tmp_path / "m.safetensors"
    asked = {"sdlab.prediction": "v", "modelspec.title": "Mine", "format": "st"}
    code, _, err = run(["merge", str(a), str(sd1[1]), "--out", str(out), "--metadata-json", json.dumps(asked)], capsys)
    assert code == 0, err
    meta = read_checkpoint(out)[1]
    assert (meta["sdlab.prediction"], meta["modelspec.title"], meta["format"]) == ("v", "Mine", "pt")
    assert plan_checkpoint(out).report.prediction.value == "v" and model_name(out) == "Mine"


def test_the_cli_names_copies_the_config_and_refuses_bad_requests(sd1, tmp_path, capsys):
    out = tmp_path / "models"
    out.mkdir()
    (sd1[1].with_suffix(".yaml")).write_text("model:\n  params:\n    parameterization: eps\n")
    try:
        code, printed, err = run(["merge", *map(str, sd1[:2]), "--out", str(out), "-M", "0.25", "--format", "ckpt"],
                                 capsys)
        assert code == 0, err
        made = out / "0.75(a) + 0.25(b).ckpt"
        assert printed.strip() == str(made) and made.is_file()
        assert made.with_suffix(".yaml").read_text() == sd1[1].with_suffix(".yaml").read_text()
        code, _, err = run(["merge", *map(str, sd1[:2]), "--out", str(tmp_path / "n.safetensors"),
                            "--config-from", "none"], capsys)
        assert code == 0 and not (tmp_path / "n.yaml").exists()
    finally:
        sd1[1].with_suffix(".yaml").unlink()
    vae = _write({k: v.contiguous() for k, v in tiny_bundle("sd1", 9).vae.state_dict().items()}, tmp_path / "v.safetensors")
    bad = [
        (["merge", str(sd1[0]), "--out", str(tmp_path / "x.safetensors")], "Weighted sum merges 2 models"),
        (["merge", *map(str, sd1[:2]), "--method", "add-difference", "--out", str(tmp_path / "x.safetensors")],
         "Add difference merges 3 models"),
        (["merge", *map(str, sd1[:2]), "--discard", "(", "--out", str(tmp_path / "x.safetensors")],
         "not a regular expression"),
        (["merge", *map(str, sd1[:2]), "--out", str(tmp_path / "x.bin")], "name a .safetensors or .ckpt file"),
        (["merge", *map(str, sd1[:2]), "--method", "mean", "--out", str(tmp_path / "x.safetensors")], "--method"),
        (["merge", *map(str, sd1[:2]), "-M", "nan", "--out", str(tmp_path / "x.safetensors")], "finite"),
        (["merge", str(sd1[0]), str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x.safetensors")],
         "nope.safetensors"),
        (["merge", *map(str, sd1[:2]), "--vae", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")],
         "nope"),
        (["merge", str(sd1[0]), str(vae), "--out", str(tmp_path / "sub" / "x.safetensors")], "nothing to merge"),
    ]
    for args, message in bad:
        code, _, err = run(args, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (args, err)
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob(".*tmp")) and not (tmp_path / "sub").exists()
