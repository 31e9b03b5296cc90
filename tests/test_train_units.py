"""Unit tests of the training pieces: diffusion loss math against diffusers, data scanning / order /
sharding, config layering, LoRA naming and merging, atomic run checkpoints under SIGTERM and SIGKILL,
the CSV log and the loss-curve PNG."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
from PIL import Image

from sdlab.diffusion.denoiser import Prediction
from sdlab.diffusion.loss import min_snr_weights, prediction_target, q_sample, snr
from sdlab.diffusion.schedules import NoiseSchedule
from sdlab.models.unet import UNet, UNetConfig
from sdlab.tiny.datasets.build import build_dataset
from sdlab.train import combine
from sdlab.train.config import TrainConfig, add_config_arguments, config_from_args
from sdlab.train.data import TrainData, scan_dataset
from sdlab.train.loop import StopFlag, flush_denormals, lr_multiplier
from sdlab.checkpoints.lora import apply_lora, load_lora_file, merge_lora_
from sdlab.families import get_family
from sdlab.train.lora import LoRANetwork, unet_lora_targets
from sdlab.train.run_checkpoint import latest_checkpoint, list_checkpoints, load_run_checkpoint
from sdlab.train.run_log import CSVLog, draw_loss_curve, read_log
from train_fixtures import write_caption_folder, write_jsonl_folder


# --- diffusion loss math ------------------------------------------------------------------------------


def test_forward_process_and_targets_match_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    ac = NoiseSchedule.make().alphas_cumprod.float()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    assert float((q_sample(x0, t, noise, ac) - ref.add_noise(x0, noise, t)).abs().max()) < 1e-5
    v = prediction_target(Prediction.V, x0, noise, t, ac)
    assert float((v - ref.get_velocity(x0, noise, t)).abs().max()) < 1e-5
    assert prediction_target(Prediction.EPS, x0, noise, t, ac) is noise
    # Min-SNR-gamma as diffusers' train_text_to_image.py computes it
    s = snr(t, ac)
    ref_snr = (ref.alphas_cumprod[t] / (1 - ref.alphas_cumprod[t])).float()
    assert torch.allclose(s, ref_snr, rtol=1e-5)
    eps_w = torch.stack([s, 5 * torch.ones_like(s)], dim=1).min(dim=1)[0] / s
    assert torch.allclose(min_snr_weights(t, ac, 5.0, Prediction.EPS), eps_w)
    assert torch.allclose(min_snr_weights(t, ac, 5.0, Prediction.V), eps_w * s / (s + 1))


# --- data -----------------------------------------------------------------------------------------------


def test_scan_counts_broken_and_uncaptioned(tmp_path):
    folder = write_caption_folder(tmp_path / "d", n=3, size=20)
    (folder / "bad.jpg").write_bytes(b"not a jpeg at all")
    (folder / "bad.txt").write_text("caption")
    (folder / "img01.txt").write_text("")
    Image.new("RGB", (20, 20)).save(folder / "nocaption.png")
    scan = scan_dataset(folder)
    assert [s.path.name for s in scan.samples] == ["img00.png", "img02.png"]
    assert scan.skipped == {"broken_image": 1, "empty_caption": 2}
    jsonl = scan_dataset(write_jsonl_folder(tmp_path / "j", n=3))
    assert [s.caption for s in jsonl.samples] == ["a red square", "a blue circle", "a green stripe"]


def test_combine_lists_every_source_without_copying(tmp_path, capsys, caplog) -> None:
    built = build_dataset(tmp_path / "built", 6, seed=1, kind="emoji")         # metadata.jsonl layout
    loose = tmp_path / "loose" / "nested"                                      # image + .txt layout
    loose.mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(loose / "red.png")
    (loose / "red.txt").write_text("a red square", encoding="utf-8")
    Image.new("RGB", (8, 8)).save(loose / "uncaptioned.png")                   # skipped, as training skips it
    out = tmp_path / "elsewhere" / "mix"
    combine.main([str(out), str(tmp_path / "built"), str(tmp_path / "loose")])
    assert capsys.readouterr().out == f"wrote {out / 'metadata.jsonl'}: 7 images\n"
    samples = scan_dataset(out).samples
    expected = {(tmp_path / "built" / r["file"]).resolve(): r["caption"] for r in built}
    expected[(loose / "red.png").resolve()] = "a red square"
    assert {s.path.resolve(): s.caption for s in samples} == expected
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert all(row["file_name"].startswith("../../") for row in rows)               # relative to the mix
    assert sorted(p.name for p in out.iterdir()) == ["metadata.jsonl"]

    # kohya's repeat folders: each image listed once per repeat, so an epoch of the mix draws it as often (before,
    # once: a 10_ folder's repeats were lost); one training on the empty caption is left out with a warning
    kohya = tmp_path / "kohya"
    for folder, caption in (("3_sks dog", None), ("2_", None), ("1_cat", "a tabby")):
        (kohya / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(kohya / folder / "p.png")
        if caption:
            (kohya / folder / "p.txt").write_text(caption)
    mixed = tmp_path / "kmix"
    combine.main([str(mixed), str(kohya)])
    assert capsys.readouterr().out == f"wrote {mixed / 'metadata.jsonl'}: 2 images, 4 lines with repeats\n"  # was "4 images"
    assert Counter(s.caption for s in scan_dataset(mixed).samples) == {"sks dog": 3, "a tabby": 1}
    assert f"{kohya}: 1 image(s) train on the empty caption ({kohya / '2_' / 'p.png'}, ...), which a metadata.jsonl " \
           "does not list: left out" in caplog.text

    with pytest.raises(SystemExit) as exit_info:
        combine.main([str(tmp_path / "none"), str(tmp_path / "loose" / "missing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlab: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()


def test_sharding_and_accumulation_cover_the_same_global_batch(tmp_path):
    scan = scan_dataset(write_caption_folder(tmp_path / "d", n=5, size=20))
    common = dict(resolution=16, center_crop=False, random_flip=True, seed=3, num_workers=1)
    whole = TrainData(scan, batch_size=4, grad_accum=1, **common)
    ranks = [TrainData(scan, batch_size=1, grad_accum=2, rank=r, world_size=2, **common) for r in range(2)]
    for step in range(3):  # crosses an epoch boundary (5 samples, 4 per step)
        ref = whole._assemble(step, 0)
        parts = [ranks[r]._assemble(step, m) for m in range(2) for r in range(2)]
        assert sum((p.seeds for p in parts), []) == ref.seeds
        assert sum((p.paths for p in parts), []) == ref.paths
        assert torch.equal(torch.cat([p.images for p in parts]), ref.images)
        assert ref.images.shape == (4, 3, 16, 16) and float(ref.images.abs().max()) <= 1.0
    epoch0 = [whole.stream[i] for i in range(5)]
    assert sorted(epoch0) == list(range(5))



def test_an_interrupt_while_loading_stops_leaves_the_loading_threads_alive(tmp_path, monkeypatch):
    """A KeyboardInterrupt while the data loading stops (a second Ctrl-C under the Python API) must not land in
    a Thread.join: on Python 3.11 that marks the still-running thread as ended (cpython#90882), and the
    interpreter's exit then finalized under it and aborted ("terminate called without an active exception")."""
    import threading
    import sdlab.train.data as data_module
    scan = scan_dataset(write_caption_folder(tmp_path / "d", n=4, size=20))
    data = TrainData(scan, batch_size=1, grad_accum=1, resolution=16, center_crop=False, random_flip=False, seed=0,
                     num_workers=1)
    release, calls, load = threading.Event(), [], data_module.load_training_image

    def held_second_image(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:         # the look-ahead's batch: held until the test lets it go
            release.wait(60)
        return load(*args, **kwargs)

    monkeypatch.setattr(data_module, "load_training_image", held_second_image)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        batches = data.iterate(0, 3)
        next(batches)                                       # batch 0; batch 1 is now loading, held
        main = threading.main_thread().ident                # a Ctrl-C, delivered to the waiting main thread
        threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            batches.close()                                 # waits for the held batch: the interrupt lands there
        data.close()
        loading = [t for t in threading.enumerate() if t.name.startswith(("sdlab-prefetch", "sdlab-data"))]
        assert loading and all(t.is_alive() for t in loading), [(t.name, t.is_alive()) for t in loading]
    finally:
        signal.signal(signal.SIGINT, before)
        release.set()
    for thread in loading:
        thread.join(30)
        assert not thread.is_alive()


# --- config -----------------------------------------------------------------------------------------------


def test_config_file_and_cli_layering(tmp_path):
    (tmp_path / "c.toml").write_text('[train]\nmax_steps = 50\nlearning_rate = 2e-4\nsample_every = 5\nsample_prompts = ["a", "b"]\n')
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.toml"), "--max-steps", "7", "--random-flip",
                                              "--ema-decay", "0.999", "--max-grad-norm", "none"]))
    assert (cfg.max_steps, cfg.learning_rate, cfg.random_flip, cfg.ema_decay, cfg.max_grad_norm) == (7, 2e-4, True, 0.999, None)
    assert cfg.sample_prompts == ("a", "b")
    with pytest.raises(ValueError):
        TrainConfig(cache_latents=True, center_crop=False)
    warm = TrainConfig(max_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert [round(lr_multiplier(s, warm), 4) for s in (0, 1, 2, 10)] == [0.0, 0.5, 1.0, 0.1]   # diffusers' warm-up


# --- LoRA -------------------------------------------------------------------------------------------------


def _tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1), context_dim=32))


def test_conv_lora_gradients_are_laid_out_as_their_weights():
    """DDP buckets a gradient by its weight's strides: a channels-last U-Net gives its conv LoRA branches
    channels-last gradients, so their weights must be channels-last too (else DDP warns and copies)."""
    unet = _tiny_unet().to(memory_format=torch.channels_last)
    net = LoRANetwork.for_unet(unet, rank=4, alpha=8, convs=True).attach()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05, generator=g)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 32, generator=g)
    unet(x, t, ctx).square().mean().backward()
    convs = [p for p in net.parameters() if p.dim() == 4]
    assert any(p.shape[-1] == 3 for p in convs) and any(p.shape[-1] == 1 and p.shape[1] > 1 for p in convs)
    for p in convs:
        assert p.grad is not None and p.grad.stride() == p.stride(), (p.shape, p.stride(), p.grad.stride())


def test_lora_hooks_merge_and_file_roundtrip(tmp_path):
    unet = _tiny_unet()
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        base = unet(x, t, ctx)
    net = LoRANetwork.for_unet(unet, rank=4, alpha=8).attach()
    # kohya's set: 7 transformers (2 in, 1 middle, 4 out) x (proj_in, proj_out, 2 x 4 attention, 2 ff)
    assert len(net.loras) == 7 * 12
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05, generator=g)
        live = unet(x, t, ctx)
    assert float((live - base).abs().max()) > 1e-3
    path = net.save(tmp_path / "l.safetensors", get_family("sd1"))
    net.detach_hooks()
    entries = load_lora_file(path)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in entries  # kohya's SD1 names
    assert entries["lora_unet_down_blocks_0_attentions_0_proj_in"]["down"].shape == (4, 32, 1, 1)  # a 1x1 conv
    layers = dict(unet_lora_targets(unet))
    assert merge_lora_(layers, entries, 1.0) == []
    with torch.no_grad():
        merged = unet(x, t, ctx)
    assert float((merged - live).abs().max()) < 1e-5


def test_apply_lora_understands_diffusers_style_names(tmp_path):
    from bundle_fixtures import tiny_bundle
    from safetensors.torch import save_file

    bundle = tiny_bundle("sd1")
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    # kohya's SD1 naming (diffusers module paths) for input_blocks.1.1...attn1.to_q
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 64),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(64, 2)},
              str(tmp_path / "k.safetensors"))
    layer = bundle.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    before = layer.weight.detach().clone()
    te_before = bundle.text_encoders[0].model.encoder.layers[0].self_attn.q_proj.weight.detach().clone()
    assert apply_lora(bundle, tmp_path / "k.safetensors", 0.5) == 2
    assert torch.allclose(layer.weight, before + 0.5 * 0.5 * up @ down, atol=1e-5)
    assert not torch.equal(bundle.text_encoders[0].model.encoder.layers[0].self_attn.q_proj.weight, te_before)


# --- run checkpoints under signals ----------------------------------------------------------------------

_KILL_DURING_WRITE = textwrap.dedent("""
    import collections, os, signal, sys, torch
    from sdlab.train.run_checkpoint import save_run_checkpoint
    from sdlab.train.loop import StopFlag

    class Bomb:
        # pickled in the middle of the state: the signal arrives while the file is being written
        def __init__(self, sig): self.sig = sig
        def __reduce__(self):
            os.kill(os.getpid(), self.sig)
            return (collections.OrderedDict, ())

    folder, mode = sys.argv[1], sys.argv[2]
    save_run_checkpoint({"w": torch.arange(1000.0)}, folder, 1)
    big = {"a": torch.ones(200000), "bomb": None, "b": torch.zeros(200000)}
    if mode == "sigkill":
        big["bomb"] = Bomb(signal.SIGKILL)
        save_run_checkpoint(big, folder, 2)
    else:
        big["bomb"] = Bomb(signal.SIGTERM)
        with StopFlag() as stop:
            save_run_checkpoint(big, folder, 2)
        print("stop requested:", stop.requested == signal.SIGTERM)
""")


@pytest.mark.parametrize("mode", ["sigkill", "sigterm"])
def test_signal_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, mode):
    script = tmp_path / "kill.py"
    script.write_text(_KILL_DURING_WRITE)
    folder = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(script), str(folder), mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = load_run_checkpoint(folder / "step-00000001.pt")
    assert torch.equal(first["w"], torch.arange(1000.0))
    if mode == "sigkill":
        assert proc.returncode == -signal.SIGKILL
        assert [s for s, _ in list_checkpoints(folder)] == [1]           # the interrupted one never appears
        assert latest_checkpoint(folder) == folder / "step-00000001.pt"
    else:  # the handler only sets a flag: the write completes, atomically, and the run can then stop
        assert proc.returncode == 0 and "stop requested: True" in proc.stdout
        assert [s for s, _ in list_checkpoints(folder)] == [1, 2]
        assert load_run_checkpoint(folder / "step-00000002.pt")["a"].shape == (200000,)
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_stop_flag_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_second_signal_waits_for_the_checkpoint_being_written():
    """Training called from Python: a second signal during a checkpoint write raises KeyboardInterrupt once the
    write is done, and at once elsewhere."""
    written = []
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            with stop.holding():
                os.kill(os.getpid(), signal.SIGTERM)
                written.append("checkpoint")
        assert written == ["checkpoint"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            written.append("never")
    assert written == ["checkpoint"]


def test_flush_denormals_only_inside_the_block():
    tiny = torch.tensor([1e-39, 3e-38, -1e-40])  # subnormal in fp32 (normal floats start at 1.18e-38)
    with flush_denormals(torch.device("cpu")):
        assert (tiny * 1.0).tolist() == [0.0, pytest.approx(3e-38), 0.0]
    assert float((tiny * 1.0)[0]) != 0.0


# --- logs -------------------------------------------------------------------------------------------------


def test_csv_log_truncates_on_resume_and_curve_png(tmp_path):
    log = CSVLog(tmp_path / "log.csv", ["loss"])
    for s in range(1, 6):
        log.append({"step": s, "loss": 1.0 / s})
    CSVLog(tmp_path / "log.csv", ["loss"], resume_step=3).append({"step": 4, "loss": 0.3})
    assert [r["step"] for r in read_log(tmp_path / "log.csv")] == ["1", "2", "3", "4"]
    path = draw_loss_curve([1, 2, 3, 4], [1.0, 0.5, 0.33, 0.3], tmp_path / "loss.png")
    with Image.open(path) as im:
        assert im.size == (800, 450)
        assert len(im.getcolors(maxcolors=1 << 24)) > 3  # axes and the curve were drawn
