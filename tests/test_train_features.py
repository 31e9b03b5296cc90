"""Training features beyond the plain loop, each run in-process on reduced-width checkpoints (CPU):

- gradient checkpointing: the flag wraps every input / middle / output block of the U-Net, and the
  gradients equal those without it (max abs difference 0.0 measured; bound 1e-6);
- bf16 autocast: the U-Net's linear layers run in bf16, a few steps give finite losses, and the master
  weights (and the delivered file) stay fp32; what does not train runs in bf16 (a LoRA or embedding run's
  frozen model, a full fine-tune's VAE and text encoders);
- latent caching: the first run encodes each image once and trains without the VAE encoder; a second
  run with the same cache never calls it; the first-step loss of a cached run equals the uncached one
  (they draw the same posterior sample; relative difference 0 measured at the logged 6 digits, bound 1e-5);
- previews: ``sample_every=1`` writes one PNG per prompt and step through `sdlab.pipeline.generate`;
- fine-tuning an SDXL checkpoint feeds the size / crop vector (original size and random-crop offsets of
  each image) and trains the vector embedding; an SD2 checkpoint with ``prediction="v"`` trains on the
  v target and delivers a file that says v.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

from bundle_fixtures import tiny_bundle, write_original
from sdlab.checkpoints.components import ComponentSource
from sdlab.checkpoints.load import load_bundle
from sdlab.diffusion.denoiser import Prediction
from sdlab.diffusion.model_sampling import DiscreteModelSampling
from sdlab.models.vae import AutoencoderKL
from sdlab.train import unet_task
from sdlab.train.cli import TASK_MODULES, run_from_config
from sdlab.train.config import TrainConfig
from sdlab.train.data import TrainData, scan_dataset
from sdlab.train.distributed import DistContext
from sdlab.train.loop import train
from sdlab.train.run_log import read_log
from sdlab.train.task import Batch
from sdlab.train.unet_task import UNetTask, UNetTaskOptions
from train_fixtures import CAPTIONS, pattern_image, write_caption_folder, write_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 16  # pixels; the tiny VAE halves it, so the U-Net sees 8x8 latents
CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    return write_tiny_model(root / "tiny-sd1.safetensors"), write_caption_folder(root / "data", n=4, size=24)


def _config(out: Path, model: Path, data: Path, **overrides) -> TrainConfig:
    base = {"model": str(model), "data_dir": str(data), "output_dir": str(out), "resolution": RES, "max_steps": 2,
            "batch_size": 2, "learning_rate": 1e-3, "progress": False, "num_workers": 1, "device": "cpu",
            "checkpoint_every": 1000}
    return TrainConfig(**(base | overrides))


def _first_loss(out: Path) -> float:
    return float(read_log(out / "log.csv")[0]["loss"])


# --- gradient checkpointing -------------------------------------------------------------------------------


def test_gradient_checkpointing_wraps_blocks_and_keeps_gradients(monkeypatch):
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    g = torch.Generator().manual_seed(0)
    batch = Batch(images=torch.rand(2, 3, RES, RES, generator=g) * 2 - 1, captions=list(CAPTIONS[:2]), seeds=[11, 12])
    grads = {}
    for flag in (False, True):
        bundle = tiny_bundle("sd1", seed=0)
        task = UNetTask(bundle, UNetTaskOptions(caption_dropout=0.0, gradient_checkpointing=flag))
        calls.clear()
        loss, _ = task.loss(batch, torch.Generator().manual_seed(1))
        loss.backward()
        unet = bundle.unet
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
        if flag:
            # one checkpointed call per block in the forward (recomputation in backward calls the original)
            assert len(calls) == len(blocks) == 9
            assert {getattr(fn, "__self__", None) for fn in calls} == set(blocks)
        else:
            assert calls == []
        grads[flag] = {k: p.grad.clone() for k, p in unet.named_parameters()}
        grads[f"loss-{flag}"] = float(loss.detach())
    assert grads["loss-False"] == grads["loss-True"]
    diff = max(float((grads[False][k] - grads[True][k]).abs().max()) for k in grads[False])
    print("gradient checkpointing: max abs gradient difference", diff)
    assert diff <= 1e-6, diff
    assert max(float(v.abs().max()) for v in grads[False].values()) > 1e-3  # the gradients are not trivial


# --- bf16 autocast ---------------------------------------------------------------------------------------


def test_bf16_autocast_runs_in_bf16_and_keeps_fp32_weights(sd1, tmp_path):
    model, data_dir = sd1
    cfg = _config(tmp_path / "run", model, data_dir, mixed_precision="bf16", max_steps=3)
    bundle = load_bundle(model)
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    task = UNetTask(bundle, UNetTaskOptions.from_config(cfg))
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
             for m in bundle.unet.modules() if isinstance(m, torch.nn.Linear)]
    data = TrainData(scan_dataset(data_dir), resolution=RES, center_crop=True, random_flip=False, seed=0,
                     batch_size=2, grad_accum=1, num_workers=1)
    result = train(task, data, cfg, CPU)
    for h in hooks:
        h.remove()
    assert seen == {torch.bfloat16}  # autocast was on for the U-Net's matrix products
    assert result.step == 3 and math.isfinite(result.last_loss)
    assert all(math.isfinite(float(r["loss"])) for r in read_log(tmp_path / "run" / "log.csv"))
    assert all(p.dtype == torch.float32 for p in bundle.unet.parameters())
    change = max(float((bundle.unet.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert change > 1e-4  # it trained
    saved = load_file(str(result.weights))
    assert {v.dtype for k, v in saved.items() if k.startswith("model.diffusion_model.")} == {torch.float32}


@pytest.mark.parametrize("task, extra, frozen_parts", [
    ("unet", {"lora_rank": 4, "lora_text_encoder": True}, ("unet", "vae", "text_encoders")),
    ("embedding", {"embedding_word": "sks"}, ("unet", "vae", "text_encoders")),
    ("unet", {}, ("vae", "text_encoders")),                # a full fine-tune: the U-Net's master weights stay fp32
    ("unet", {"train_text_encoder": True}, ("vae",)),      # ... and the text encoder's when it trains
])
def test_bf16_training_keeps_the_frozen_parts_in_bf16(sd1, tmp_path, monkeypatch, task, extra, frozen_parts):
    """Under --mixed-precision bf16 what does not train runs in bf16, as diffusers' train_text_to_image.py and
    train_text_to_image_lora.py cast the frozen U-Net, VAE and text encoder to weight_dtype: fp32 frozen weights
    cost their autocast bf16 copies besides (SD1.5-size LoRA, 256 px: peak RSS 6.8 GB, now 3.0; fp32 5.5 GB) or
    just twice their memory (SD1.5-size full fine-tune: 18.56 GB, now 18.14). The trained parameters stay fp32;
    the first-step loss is the fp32 run's to bf16 rounding (relative 7.3e-4, 6.4e-4, 6.4e-4, 1.7e-3 measured; bound
    1e-2)."""
    model, data_dir = sd1
    module = importlib.import_module(TASK_MODULES[task])
    built = []
    real_build = module.build_task
    monkeypatch.setattr(module, "build_task", lambda cfg, bundle: built.append(real_build(cfg, bundle)) or built[-1])
    settings = {"task": task, "max_steps": 1, **extra}
    run_from_config(_config(tmp_path / "bf16", model, data_dir, mixed_precision="bf16", **settings))
    run_from_config(_config(tmp_path / "fp32", model, data_dir, **settings))
    parts = {"unet": lambda b: [b.unet], "vae": lambda b: [b.vae],
             "text_encoders": lambda b: [te.model for te in b.text_encoders]}
    bf16_run, fp32_run = ({name: {p.dtype for m in modules(run.bundle) for p in m.parameters()}
                           for name, modules in parts.items()} for run in built)
    assert bf16_run == {name: {torch.bfloat16 if name in frozen_parts else torch.float32} for name in parts}
    assert fp32_run == {name: {torch.float32} for name in parts}
    trained = [p for m in built[0].trainable_modules().values() for p in m.parameters() if p.requires_grad]
    assert trained and {p.dtype for p in trained} == {torch.float32}
    bf16, fp32 = _first_loss(tmp_path / "bf16"), _first_loss(tmp_path / "fp32")
    print(f"{task} {extra}: first-step loss bf16 {bf16}, fp32 {fp32}, relative difference {abs(bf16 / fp32 - 1):.2g}")
    assert abs(bf16 - fp32) <= 1e-2 * abs(fp32), (bf16, fp32)


@pytest.mark.parametrize("task", ["unet", "lcd"])
def test_bf16_fine_tune_delivers_the_frozen_parts_as_loaded(sd1, tmp_path, task):
    """A bf16 full fine-tune runs its VAE and text encoder in bf16 but delivers them exactly as loaded: with the
    default --save-dtype fp32 every VAE / text-encoder tensor of the file (and of final-ema.safetensors) equals the
    input file's bit for bit, as before the frozen parts ran in bf16 (they were rounded to bf16: 160 of 160 tensors
    changed, max 0.0039); --save-dtype fp16 casts those weights, not their bf16 run copies."""
    model, data_dir = sd1
    source = load_file(str(model))
    for save_dtype, as_saved in (("fp32", lambda v: v), ("fp16", lambda v: v.to(torch.float16))):
        out = tmp_path / save_dtype
        result = run_from_config(_config(out, model, data_dir, task=task, mixed_precision="bf16", max_steps=1,
                                         ema_decay=0.9, save_dtype=save_dtype))
        for weights in (result.weights, result.ema_weights):
            saved = load_file(str(weights))
            frozen = [k for k in saved if k.startswith(("first_stage_model.", "cond_stage_model."))]
            assert len(frozen) > 100
            changed = [k for k in frozen if not torch.equal(saved[k], as_saved(source[k]))]
            assert changed == [], (save_dtype, weights.name, len(changed), len(frozen))


def test_only_the_process_that_writes_the_model_keeps_the_frozen_parts_as_loaded(sd1, tmp_path, monkeypatch):
    """The fp32 copies a bf16 full fine-tune keeps of its VAE and text encoder for the delivered file are made by the
    process that writes it (torchrun's rank 0) alone; another rank keeps none (they cost the host the parts in fp32:
    3.3 GB for SDXL's text encoders in every process before)."""
    model, data_dir = sd1
    built = []
    real_build = unet_task.build_task
    monkeypatch.setattr(unet_task, "build_task", lambda cfg, bundle: built.append(real_build(cfg, bundle)) or built[-1])
    for rank in (0, 1):
        ctx = DistContext(rank=rank, local_rank=rank, world_size=1, device=torch.device("cpu"))
        run_from_config(_config(tmp_path / f"rank{rank}", model, data_dir, mixed_precision="bf16", max_steps=1), ctx)
    main, other = built
    assert set(main._as_loaded) == {main.bundle.vae, main.bundle.text_encoders[0].model}
    assert other._as_loaded == {}


@pytest.mark.parametrize("task", ["unet", "lcd"])
def test_bf16_sdxl_fine_tune_keeps_the_vae_fp32(tmp_path, monkeypatch, task):
    """An SDXL fine-tune or distillation under bf16 runs its text encoders in bf16 but keeps the VAE fp32, as
    diffusers' train_text_to_image_sdxl.py (vae.to(dtype=torch.float32), "to avoid NaN losses") and
    train_lcm_distill_sdxl_wds.py do; an SD1 model's VAE runs in bf16 as train_text_to_image.py and
    train_lcm_distill_sd_wds.py cast it (test_bf16_training_keeps_the_frozen_parts_in_bf16)."""
    model = write_original(tiny_bundle("sdxl", seed=0), tmp_path / "tiny-sdxl.safetensors")
    data_dir = write_caption_folder(tmp_path / "data", n=2, size=RES)
    module = importlib.import_module(TASK_MODULES[task])
    built = []
    real_build = module.build_task
    monkeypatch.setattr(module, "build_task", lambda cfg, bundle: built.append(real_build(cfg, bundle)) or built[-1])
    run_from_config(_config(tmp_path / "run", model, data_dir, task=task, mixed_precision="bf16", max_steps=1))
    bundle = built[0].bundle
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.float32}
    assert {p.dtype for te in bundle.text_encoders for p in te.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bundle.unet.parameters()} == {torch.float32}


@pytest.mark.parametrize("task", ["unet", "lcd"])
def test_bf16_sdxl_lora_keeps_the_models_own_vae_fp32(tmp_path, monkeypatch, task):
    """An SDXL LoRA or LCM-LoRA run under bf16 holds its frozen U-Net and text encoders in bf16 but the model's own
    VAE in fp32, as diffusers' train_text_to_image_lora_sdxl.py (vae.to(dtype=torch.float32) without
    --pretrained_vae_model_name_or_path) and train_lcm_distill_lora_sdxl.py keep it; a separate VAE (--vae) runs in
    bf16, as those scripts cast a --pretrained_vae_model_name_or_path one to weight_dtype. Each is the VAE its file
    holds, bit for bit in its dtype, with the file's latent scaling, read once in that dtype (the own one was read in
    bf16, then again in fp32). Its previews draw. The model's own VAE was bf16 before."""
    model = write_original(tiny_bundle("sdxl", seed=0), tmp_path / "tiny-sdxl.safetensors")
    separate_vae = tmp_path / "separate-vae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_bundle("sdxl", seed=1).vae.state_dict().items()}, str(separate_vae))
    data_dir = write_caption_folder(tmp_path / "data", n=2, size=RES)
    module = importlib.import_module(TASK_MODULES[task])
    built = []
    real_build = module.build_task
    monkeypatch.setattr(module, "build_task", lambda cfg, bundle: built.append(real_build(cfg, bundle)) or built[-1])
    vae_reads = []
    real_materialize = ComponentSource.materialize

    def recording_materialize(self, dtype, device):
        if self.name == "vae":
            vae_reads.append(dtype)
        return real_materialize(self, dtype, device)

    monkeypatch.setattr(ComponentSource, "materialize", recording_materialize)
    previews = {"sample_every": 1, "sample_prompts": ("a cat",), "sample_steps": 2}
    for name, vae in (("own", None), ("separate", str(separate_vae))):
        out = tmp_path / name
        result = run_from_config(_config(out, model, data_dir, task=task, mixed_precision="bf16", max_steps=1,
                                         lora_rank=4, vae=vae, **previews))
        assert math.isfinite(result.last_loss) and (out / "samples" / "step-00000001-00.png").is_file()
    assert vae_reads == [torch.float32, torch.bfloat16]
    dtypes = [{part: {p.dtype for m in modules for p in m.parameters() if not p.requires_grad}
               for part, modules in (("unet", [run.bundle.unet]), ("vae", [run.bundle.vae]),
                                     ("text", [te.model for te in run.bundle.text_encoders]))} for run in built]
    bf16, fp32 = {torch.bfloat16}, {torch.float32}
    assert dtypes == [{"unet": bf16, "vae": fp32, "text": bf16}, {"unet": bf16, "vae": bf16, "text": bf16}]
    for run, vae, dtype in zip(built, (None, separate_vae), (torch.float32, torch.bfloat16)):
        as_loaded = load_bundle(model, vae=vae, dtype=dtype)
        held, read = run.bundle.vae.state_dict(), as_loaded.vae.state_dict()
        assert held.keys() == read.keys() and all(torch.equal(held[k], read[k]) for k in read), vae
        assert (run.bundle.scaling_factor, run.bundle.latent_stats) == (as_loaded.scaling_factor,
                                                                         as_loaded.latent_stats), vae


@pytest.mark.parametrize("extra", [{}, {"lora_rank": 4}, {"task": "lcd"}])
def test_bf16_sdxl_run_encodes_in_fp32_as_its_latent_cache(tmp_path, monkeypatch, extra):
    """An SDXL run under bf16 (fine-tune, LoRA, distillation) encodes its images with the fp32 VAE in fp32, outside
    the loop's autocast, as diffusers' SDXL trainers encode (train_text_to_image_sdxl.py before training, the LoRA
    scripts' vae.encode outside the U-Net's autocast): the first-step loss of an uncached run equals a cached one's
    (same posterior draw), as for SD1 (test_latent_cache_is_reused_and_matches_uncached_loss). Autocast ran the
    uncached encode in bf16 before: relative difference 1.3e-3. Each encode (the cache's and the step's) gives the
    posterior mean an fp32 encode of the file's VAE gives its images (difference 0 measured); cached == uncached
    alone also holds where both encode with a bf16 VAE, whose means differ from it by 1.4e-2 of their range."""
    model = write_original(tiny_bundle("sdxl", seed=0), tmp_path / "tiny-sdxl.safetensors")
    data_dir = write_caption_folder(tmp_path / "data", n=2, size=RES)
    encodes = []
    real_encode = AutoencoderKL.encode

    def recording_encode(self, x, *args, **kwargs):
        posterior = real_encode(self, x, *args, **kwargs)
        encodes.append((x.detach().clone(), posterior.mean.detach().clone()))
        return posterior

    monkeypatch.setattr(AutoencoderKL, "encode", recording_encode)
    common = {"mixed_precision": "bf16", "max_steps": 1, "caption_dropout": 0.0, **extra}
    run_from_config(_config(tmp_path / "cached", model, data_dir, cache_latents=True, **common))
    run_from_config(_config(tmp_path / "uncached", model, data_dir, **common))
    cached, uncached = _first_loss(tmp_path / "cached"), _first_loss(tmp_path / "uncached")
    print(f"SDXL bf16 {extra}: first-step loss cached {cached}, uncached {uncached}")
    assert abs(cached - uncached) <= 1e-5 * abs(uncached), (cached, uncached)
    reference = load_bundle(model, dtype=torch.float32).vae
    assert len(encodes) == 2
    for pixels, mean in encodes:
        with torch.no_grad():
            expected = real_encode(reference, pixels.float()).mean  # (B, C, h, w)
        worst = ((mean.float() - expected).abs().max() / expected.abs().max()).item()
        print(f"SDXL bf16 {extra}: encode {mean.dtype}, max difference to an fp32 encode {worst:.2e} of its range")
        assert mean.dtype == torch.float32 and worst <= 1e-5, worst


# --- latent caching --------------------------------------------------------------------------------------


def test_latent_cache_is_reused_and_matches_uncached_loss(sd1, tmp_path, monkeypatch):
    model, data_dir = sd1
    encoded: list[int] = []
    real_encode = AutoencoderKL.encode

    def counting_encode(self, x, *args, **kwargs):
        encoded.append(x.shape[0])
        return real_encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    cache = tmp_path / "cache"
    common = {"max_steps": 2, "caption_dropout": 0.0}

    run_from_config(_config(tmp_path / "cached", model, data_dir, cache_latents=True, cache_dir=str(cache), **common))
    assert encoded == [4]  # the 4 images in one batched encode, before training; none during the 2 steps
    assert len(list(cache.rglob("*.safetensors"))) == 4

    encoded.clear()
    run_from_config(_config(tmp_path / "again", model, data_dir, cache_latents=True, cache_dir=str(cache), **common))
    assert encoded == []  # the second run reads the cache only

    run_from_config(_config(tmp_path / "uncached", model, data_dir, **common))
    assert encoded == [2, 2]  # one encode of the micro-batch per step
    cached, again, uncached = (_first_loss(tmp_path / name) for name in ("cached", "again", "uncached"))
    print("first-step loss cached / uncached:", cached, uncached)
    assert cached == again
    assert abs(cached - uncached) <= 1e-5 * abs(uncached), (cached, uncached)


# --- previews -------------------------------------------------------------------------------------------


def test_sample_every_writes_preview_pngs_through_generate(sd1, tmp_path, monkeypatch):
    model, data_dir = sd1
    from sdlab.pipeline import generate as generate_module

    requests = []
    real_generate = generate_module.generate

    def spying_generate(bundle, request, *args, **kwargs):
        requests.append(request)
        return real_generate(bundle, request, *args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", spying_generate)
    renamed = []                                             # atomic writes: a temporary file renamed into place
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(Path(dst).name) or real_replace(src, dst))
    out = tmp_path / "run"
    run_from_config(_config(out, model, data_dir, sample_every=1, sample_prompts=("a red square", "a blue circle"),
                            sample_steps=2, sample_cfg=3.0, sample_seed=7))
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == [f"step-{s:08d}-{i:02d}.png" for s in (1, 2) for i in (0, 1)]
    assert set(names) | {"summary.json"} <= set(renamed)
    for name in names:
        with Image.open(out / "samples" / name) as im:
            assert im.format == "PNG" and im.size == (RES, RES)
    assert [(r.prompt, r.steps, r.cfg_scale, r.seed) for r in requests] == [
        ("a red square", 2, 3.0, 7), ("a blue circle", 2, 3.0, 8)] * 2


# --- other families --------------------------------------------------------------------------------------


def test_sdxl_finetune_feeds_size_and_crop_vector(tmp_path, monkeypatch):
    model = write_original(tiny_bundle("sdxl", seed=0), tmp_path / "tiny-sdxl.safetensors")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    sizes = [(24, 16), (16, 32)]  # (width, height) of the files: the crop offset is non-zero along the long side
    for i, size in enumerate(sizes):
        pattern_image(i, 32).resize(size).save(data_dir / f"img{i}.png")
        (data_dir / f"img{i}.txt").write_text(CAPTIONS[i])
    rows = []
    real_vector = unet_task.sdxl_vector

    def spying_vector(pooled, conds):
        rows.extend(conds.tolist())
        return real_vector(pooled, conds)

    monkeypatch.setattr(unet_task, "sdxl_vector", spying_vector)
    out = tmp_path / "run"
    result = run_from_config(_config(out, model, data_dir, center_crop=False, max_steps=2, learning_rate=1e-2))
    assert result.step == 2 and len(rows) == 4
    # (original h, original w, crop top, crop left, target h, target w) per sample
    seen = {(int(r[0]), int(r[1])) for r in rows}
    assert seen <= {(16, 24), (32, 16)} and len(seen) == 2
    for r in rows:
        assert r[4:] == [RES, RES]
        long_side_offset = r[3] if r[1] > r[0] else r[2]  # resized to 16 x 24 / 32 x 16 then cropped to 16
        assert 0 <= long_side_offset <= 16 and (r[2] == 0 if r[1] > r[0] else r[3] == 0)
    tuned = load_bundle(out / "final.safetensors")
    base = load_bundle(model)
    assert tuned.family.name == "sdxl"
    label = "label_emb.0.0.weight"
    change = float((tuned.unet.state_dict()[label] - base.unet.state_dict()[label]).abs().max())
    assert change > 1e-4  # the vector embedding received gradients


def test_sd2_finetune_trains_v_prediction(tmp_path, monkeypatch):
    model = write_original(tiny_bundle("sd2", seed=0), tmp_path / "tiny-sd2.safetensors")
    data_dir = write_caption_folder(tmp_path / "data", n=2, size=RES)
    predictions = []
    real_target = DiscreteModelSampling.training_target

    def spying_target(sampling, *args, **kwargs):
        predictions.append(sampling.prediction)
        return real_target(sampling, *args, **kwargs)

    monkeypatch.setattr(DiscreteModelSampling, "training_target", spying_target)
    out = tmp_path / "run"
    result = run_from_config(_config(out, model, data_dir, prediction="v"))
    assert result.step == 2 and predictions == [Prediction.V, Prediction.V]
    tuned = load_bundle(out / "final.safetensors")
    assert tuned.family.name == "sd2" and tuned.prediction is Prediction.V  # the file says v now
    base = load_bundle(model)
    assert base.prediction is Prediction.EPS  # what the unlabeled original file is read as
    change = max(float((tuned.unet.state_dict()[k] - v).abs().max()) for k, v in base.unet.state_dict().items())
    assert change > 1e-4


# --- text encoder fine-tuning ----------------------------------------------------------------------------


def test_train_text_encoder_updates_the_text_tower_with_the_unet(sd1, tmp_path):
    model, data_dir = sd1
    cfg = _config(tmp_path / "run", model, data_dir, train_text_encoder=True, max_steps=2)
    bundle = load_bundle(model)
    text = bundle.text_encoders[0].model
    before = {k: v.clone() for k, v in text.state_dict().items()}
    task = UNetTask(bundle, UNetTaskOptions.from_config(cfg))
    assert set(task.trainable_modules()) == {"unet", "text_encoder0"}
    data = TrainData(scan_dataset(data_dir), resolution=RES, center_crop=True, random_flip=False, seed=0,
                     batch_size=2, grad_accum=1, num_workers=1)
    result = train(task, data, cfg, CPU)
    change = max(float((text.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert change > 1e-4  # the text tower learned with the U-Net
    saved = load_bundle(result.weights)
    for key, value in saved.text_encoders[0].model.state_dict().items():
        assert torch.equal(value, text.state_dict()[key]), key  # and is delivered in the model file


def test_train_text_encoder_with_lora_is_refused(sd1, tmp_path):
    from sdlab.train.errors import TrainError

    model, data_dir = sd1
    cfg = _config(tmp_path / "run", model, data_dir, train_text_encoder=True, lora_rank=2)
    with pytest.raises(TrainError, match="--lora-text-encoder"):
        UNetTask(load_bundle(model), UNetTaskOptions.from_config(cfg))
