"""Data parallelism of `python -m sdlab.train.cli` on a reduced-width SD1 checkpoint (CPU, gloo):
torchrun with 2 processes == 1 process with the same global batch == 1 process with 2 accumulation
micro-steps (the 1-process runs in-process; U-Net outputs of the trained weights within 1e-4 absolute and 2 % of what training changed;
the VAE task's reconstructions likewise). The loop's own gradient all-reduce on a 2-process gloo group. One
message for a failure, whichever process meets it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sdlab.checkpoints.load import load_bundle
from sdlab.train.distributed import all_reduce_grads, resolve_device
from sdlab.train.errors import TrainError
from sdlab.train.data import load_training_image
from sdlab.train.run_checkpoint import list_checkpoints
from sdlab.train.vae_task import load_trained_vae
from train_fixtures import (
    CLI_RES,
    cli_args,
    cli_env,
    max_weight_diff,
    run_cli,
    run_in_process,
    write_caption_folder,
    write_tiny_model,
)


def test_torchrun_two_gloo_processes_match_one_process(tmp_path, one_thread):
    data = write_caption_folder(tmp_path / "data", n=4, size=24)
    model = write_tiny_model(tmp_path / "tiny-sd1.safetensors")
    args = ("--max-steps", "4", "--checkpoint-every", "100", "--learning-rate", "1e-3", "--ema-decay", "0.9",
            "--random-flip", "--caption-dropout", "0.3")
    one = tmp_path / "one"
    run_in_process(one, model, data, "--batch-size", "4", *args)
    two = tmp_path / "two"
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29517",
             *cli_args(two, model, data, "--batch-size", "2", *args)], timeout=180)
    # one process with 2 micro-steps of 2 (gradient accumulation) is the same global batch again
    accum = tmp_path / "accum"
    run_in_process(accum, model, data, "--batch-size", "2", "--grad-accum", "2", *args)
    # Compared as functions: biases that feed a GroupNorm have a zero gradient in exact arithmetic, so their
    # float-noise gradients (~1e-9) differ with the summation order and Adam scales that noise up to
    # lr-sized steps in parameters that cannot change the output. Every other difference is float noise.
    # Adam also turns the float noise of any small gradient into a step of ~lr, so the tolerance is stated
    # against the change training made: within 1e-4 absolute (outputs are O(1)) and 2 % of that change.
    g = torch.Generator().manual_seed(5)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 30.0]), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        untrained = load_bundle(model).unet(x, t, ctx)
        for name in ("final.safetensors", "final-ema.safetensors"):
            ref = load_bundle(one / name).unet(x, t, ctx)
            change = float((ref - untrained).abs().max())
            assert change > 1e-3
            for other in (two, accum):
                diff = float((load_bundle(other / name).unet(x, t, ctx) - ref).abs().max())
                assert diff < 1e-4 and diff < 0.02 * change, (name, other.name, diff, change)
    assert max_weight_diff(one / "final.safetensors", model) > 1e-4  # it did train


def test_torchrun_ends_cleanly_when_max_steps_is_a_multiple_of_checkpoint_every(tmp_path):
    """Every rank takes the same end-of-run decision (no extra checkpoint barrier on rank 1 only: gloo's
    "Connection closed by peer"), and only rank 0 reports."""
    data = write_caption_folder(tmp_path / "data", n=4, size=16)
    model = write_tiny_model(tmp_path / "tiny-sd1.safetensors")
    out = tmp_path / "run"
    proc = run_cli(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29519",
                    *cli_args(out, model, data, "--batch-size", "1", "--max-steps", "2", "--checkpoint-every", "1")],
                   timeout=180)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1, 2]
    assert (out / "final.safetensors").is_file()
    assert proc.stdout.count("sdlab: trained unet to step 2") == 1, proc.stdout


def test_torchrun_vae_task_matches_one_process_and_accumulation(tmp_path, one_thread):
    """The VAE task's posterior sample z ~ q(z|x) is drawn from each image's seed, so the trained VAE does not
    depend on how the global batch is split over processes or accumulation micro-steps. Compared as functions:
    the decoded posterior mean of the training images, against what training changed."""
    data = write_caption_folder(tmp_path / "data", n=4, size=24)
    model = write_tiny_model(tmp_path / "tiny-sd1.safetensors")
    args = ("--task", "vae", "--max-steps", "3", "--checkpoint-every", "100", "--learning-rate", "1e-3",
            "--lr-schedule", "constant")
    one = tmp_path / "one"
    run_in_process(one, model, data, "--batch-size", "4", *args)
    accum = tmp_path / "accum"
    run_in_process(accum, model, data, "--batch-size", "2", "--grad-accum", "2", *args)
    two = tmp_path / "two"
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29523",
             *cli_args(two, model, data, "--batch-size", "2", *args)], timeout=180)
    x = torch.stack([load_training_image(p, CLI_RES, center_crop=True, random_flip=False,
                                         generator=torch.Generator()).pixels for p in sorted(data.glob("*.png"))])

    def reconstruction(vae):
        with torch.no_grad():
            return vae.eval().decode(vae.encode(x).mode())  # (4, 3, H, W)

    ref = reconstruction(load_trained_vae(one / "final.safetensors")[0])
    change = float((ref - reconstruction(load_bundle(model).vae)).abs().max())
    assert change > 1e-2
    for other in (accum, two):
        diff = float((reconstruction(load_trained_vae(other / "final.safetensors")[0]) - ref).abs().max())
        assert diff < 1e-3 * change, (other.name, diff, change)


def _all_reduce_then_step(rank: int, store: str, out: str) -> None:
    """One rank: a loss that reaches ``used`` on both ranks, ``rank1_only`` on rank 1 and ``unused`` on none;
    `all_reduce_grads`, then an AdamW step with weight decay. Saves the gradients and weights."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        m = nn.ModuleDict({"used": nn.Linear(2, 2), "rank1_only": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})
        x = torch.full((1, 2), float(rank + 1))
        loss = m["used"](x).sum() + (m["rank1_only"](x).sum() if rank == 1 else 0)
        loss.backward()
        all_reduce_grads([m], 2)
        grads = {k: p.grad.clone() if p.grad is not None else None for k, p in m.named_parameters()}
        torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.5).step()
        torch.save({"grads": grads, "weights": m.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_keeps_no_gradient_where_no_rank_has_one(tmp_path):
    """As in one process: a parameter the loss reaches on no rank keeps ``grad`` None, so AdamW's weight decay
    leaves it unchanged; one reached on some ranks gets the mean over all ranks (zero from the others)."""
    torch.multiprocessing.spawn(_all_reduce_then_step, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    initial = nn.ModuleDict({"used": nn.Linear(2, 2), "rank1_only": nn.Linear(2, 2), "unused": nn.Linear(2, 2)})
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        grads, weights = saved["grads"], saved["weights"]
        assert grads["unused.weight"] is None and grads["unused.bias"] is None
        torch.testing.assert_close(weights["unused.weight"], initial["unused"].weight.detach(), rtol=0, atol=0)
        torch.testing.assert_close(grads["rank1_only.weight"], torch.full((2, 2), 2.0 / 2))  # rank 1's x = 2
        torch.testing.assert_close(grads["used.weight"], torch.full((2, 2), (1.0 + 2.0) / 2))


RANK0_FAILS = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import sdlab.train.loop as loop
    from sdlab.train.cli import main
    from sdlab.train.errors import TrainError

    def failing(*args, **kwargs):
        raise TrainError("cannot write the run checkpoint: simulated")

    rank = os.environ["RANK"]
    if rank == "0":  # only rank 0 writes, so only rank 0 meets this; rank 1 waits for it in a barrier
        loop.save_run_checkpoint = failing
    status = main(sys.argv[1:])
    Path(os.environ["STATUS_DIR"], f"rank{rank}").write_text(str(status))
    if rank == "0":
        time.sleep(20)  # until rank 1 has recorded its status too (torchrun then stops this one)
    sys.exit(status)
""")


def _torchrun(script: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(port), *script], env=cli_env() | (env or {}), capture_output=True, text=True,
                          timeout=180)


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("sdlab: error:")]


def test_torchrun_failure_of_one_rank_is_one_message_and_the_other_exits_quietly_with_its_status(tmp_path):
    """Rank 0 fails alone (its checkpoint write): its one line; rank 1, whose barrier then loses its peer, says
    nothing (no "internal error: ... Connection closed by peer") and exits with the same status 2. The set-up
    logs every rank makes appear once."""
    data = write_caption_folder(tmp_path / "data", n=4, size=16)
    model = write_tiny_model(tmp_path / "tiny-sd1.safetensors")
    (tmp_path / "rank0_fails.py").write_text(RANK0_FAILS)
    args = cli_args(tmp_path / "run", model, data, "--batch-size", "1", "--max-steps", "2", "--checkpoint-every", "1")
    proc = _torchrun([str(tmp_path / "rank0_fails.py"), *args[2:]], 29527, {"STATUS_DIR": str(tmp_path)})
    assert _error_lines(proc) == ["sdlab: error: cannot write the run checkpoint: simulated"], proc.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["2", "2"]
    assert proc.stderr.count("samples, skipped") == 1 and proc.stderr.count("loaded ") == 1, proc.stderr[-3000:]


RANKS_RECORD_WHAT_THEY_READ = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import sdlab.train.cli as cli

    rank = os.environ["RANK"]
    for name in ("_scan", "load_bundle"):          # the first read of the data, the first load onto the device
        def recorded(*args, _name=name, _real=getattr(cli, name), **kwargs):
            Path(os.environ["STATUS_DIR"], f"rank{rank}-{_name}").touch()
            return _real(*args, **kwargs)
        setattr(cli, name, recorded)
    status = cli.main(sys.argv[1:])
    Path(os.environ["STATUS_DIR"], f"rank{rank}").write_text(str(status))
    sys.exit(status)
""")


def test_torchrun_into_a_run_folder_in_use_stops_every_rank_before_it_reads_anything(tmp_path):
    """Only rank 0 takes the run folder's lock. Before: refused, it alone stopped; rank 1 went on to read the data
    and load the model onto its device (the one the running run's rank uses) until torchrun stopped it. Now
    every rank learns rank 0's refusal first: one error line, every rank's status 2, nothing read."""
    from sdlab.train.run_lock import RunLock

    data = write_caption_folder(tmp_path / "data", n=4, size=16)
    model = write_tiny_model(tmp_path / "tiny-sd1.safetensors")
    (tmp_path / "ranks.py").write_text(RANKS_RECORD_WHAT_THEY_READ)
    running = RunLock(tmp_path / "run", "--output-dir run")          # the run already training there
    running.acquire()
    try:
        args = cli_args(tmp_path / "run", model, data, "--batch-size", "1", "--max-steps", "1")
        proc = _torchrun([str(tmp_path / "ranks.py"), *args[2:]], 29533, {"STATUS_DIR": str(tmp_path)})
    finally:
        running.release()
    lines = _error_lines(proc)
    assert len(lines) == 1 and f"is in use by another run (process {os.getpid()})" in lines[0], proc.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["2", "2"]
    assert not list(tmp_path.glob("rank*-*")), sorted(p.name for p in tmp_path.glob("rank*-*"))


@pytest.mark.parametrize("mistake", [("--embedding-word", "foo"), ("--device", "cuda:99"),
                                     ("--model", "nothere.safetensors")], ids=["setting", "device", "model"])
def test_torchrun_mistake_every_rank_meets_is_one_error_line(tmp_path, mistake):
    """A mistake found by every process (a setting refused before the process group forms, a device no
    machine has while joining it, a model file not found after it) gives one `sdlab: error:` line, not one
    per process."""
    data = write_caption_folder(tmp_path / "data", n=4, size=16)
    args = cli_args(tmp_path / "run", tmp_path / "tiny.safetensors", data, "--max-steps", "1", *mistake)
    proc = _torchrun(args, 29529)
    assert proc.returncode != 0
    lines = _error_lines(proc)
    assert len(lines) == 1 and mistake[1] in lines[0], proc.stderr[-3000:]


@pytest.mark.parametrize("local_rank, reports", [("0", True), ("1", False)])
def test_a_set_up_mistake_before_the_group_is_reported_by_each_machines_first_process(tmp_path, capsys, monkeypatch,
                                                                                       local_rank, reports):
    """Before the process group forms, rank 1 cannot learn whether rank 0 failed too. A mistake there (a
    --config file missing) comes from the command line and the machine's files, so every process of a machine
    meets it: rank 1 as the first process of a second machine (local rank 0) says why, rank 1 beside rank 0
    (local rank 1) exits with the same status quietly."""
    from sdlab.train.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    data = write_caption_folder(tmp_path / "data", n=1, size=16)
    args = cli_args(tmp_path / "run", tmp_path / "tiny.safetensors", data, "--config", str(tmp_path / "node.toml"))
    assert main(args[2:]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdlab: error:")]
    assert lines == ([f"sdlab: error: --config {tmp_path / 'node.toml'}: no such file"] if reports else [])


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_a_failure_that_is_no_mistake_before_the_group_is_reported_by_its_process(capsys, monkeypatch, local_rank):
    """A failure that may be this process's alone (not a mistake in the settings, files or device) is reported
    by the process that meets it, whatever its rank."""
    from sdlab.train import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", local_rank)

    def lost(*args):
        raise RuntimeError("simulated: this process lost its network")

    monkeypatch.setattr(cli, "init_distributed", lost)
    assert cli.main(["--model", "m.safetensors", "--data-dir", ".", "--device", "cpu"]) == 1
    assert "simulated: this process lost its network" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_a_cuda_index_from_the_local_rank_is_refused_alike_by_every_process_of_the_machine(monkeypatch, name):
    """4 processes on a machine with 2 CUDA devices: local ranks 0 and 1 would get one, 2 and 3 not. The
    machine's first process refuses it too, so that it reports the mistake for all of them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(name, 1, 2) == torch.device("cuda:1")
    for local_rank in range(4):
        with pytest.raises(TrainError, match="the 4 processes on this machine need a CUDA device each"):
            resolve_device(name, local_rank, 4)
    assert resolve_device("cuda:1", 3, 4) == torch.device("cuda:1")


def test_torchrun_with_an_output_path_it_cannot_write_stops_every_rank_before_the_model_loads(tmp_path):
    """Rank 0 alone checks the paths the run writes (`_check_output_paths`: the ranks share the folder); every
    rank learns its verdict: a `checkpoints` file in --output-dir is one error line, every rank's status 2, no
    rank loads the model (rank 1 does not wait at a later barrier for a peer that left)."""
    data = write_caption_folder(tmp_path / "data", n=4, size=16)
    model = write_tiny_model(tmp_path / "tiny-sd1.safetensors")
    (tmp_path / "ranks.py").write_text(RANKS_RECORD_WHAT_THEY_READ)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    args = cli_args(tmp_path / "run", model, data, "--batch-size", "1", "--max-steps", "1")
    proc = _torchrun([str(tmp_path / "ranks.py"), *args[2:]], 29537, {"STATUS_DIR": str(tmp_path)})
    assert _error_lines(proc) == [f"sdlab: error: the run checkpoints' folder {tmp_path / 'run' / 'checkpoints'} "
                                  "exists and is not a folder"], proc.stderr[-3000:]
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["2", "2"]
    assert not list(tmp_path.glob("rank*-load_bundle")), sorted(p.name for p in tmp_path.glob("rank*-*"))
