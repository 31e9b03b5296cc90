"""The allocator that reuses large CPU blocks inside a scope (`sdlab.models.cpu_memory`,
`kernels/cpu_memory.cpp`): blocks come back, kept ranges are split and joined, what is held never exceeds the
most in use at once, and a model gives the same numbers with it."""

from __future__ import annotations

import contextlib
import random
import threading

import pytest
import torch

from sdlab.models import cpu_kernels, cpu_memory

pytestmark = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="the CPU has no AVX512-BF16")

MIB = 2**20
LARGE = 32 * MIB   # blocks from this size on are the allocator's
HUNG_AFTER_S = 60  # a forked child not gone by then waits forever


@pytest.fixture(autouse=True)
def _kernels():
    if cpu_kernels.extension() is None:
        pytest.skip("sdlab's CPU kernels could not be built here")
    assert cpu_memory.stats()["depth"] == 0


def _block(mib: int) -> torch.Tensor:
    return torch.empty(mib * MIB, dtype=torch.uint8)


def _holds(block: torch.Tensor, value: int) -> bool:
    """The first and last byte of every page equal `value` (checked without a large temporary)."""
    return bool((block.view(-1, 4096)[:, [0, -1]] == value).all())


def test_a_freed_block_is_served_again_inside_a_scope_and_unmapped_outside() -> None:
    before = cpu_memory.stats()
    with cpu_memory.reusing_large_blocks(torch.device("cpu")):
        pinned = _block(33)            # a large block in use: what is freed meanwhile is kept
        a = _block(40)
        first = a.data_ptr()
        del a
        assert cpu_memory.stats()["kept_bytes"] == 40 * MIB
        b = _block(40)
        assert b.data_ptr() == first
        assert cpu_memory.stats()["fresh_bytes"] - before["fresh_bytes"] == 73 * MIB
        del b, pinned
        assert cpu_memory.stats()["kept_bytes"] == 0   # nothing large in use: nothing kept
    after = cpu_memory.stats()
    assert after["depth"] == 0 and after["kept_bytes"] == 0 and after["live_bytes"] == before["live_bytes"]
    c = _block(40)   # outside a scope: fresh, and unmapped when freed
    del c
    assert cpu_memory.stats()["kept_bytes"] == 0
    assert cpu_memory.stats()["fresh_bytes"] - after["fresh_bytes"] == 40 * MIB


def test_kept_ranges_are_split_and_joined_without_fresh_memory() -> None:
    with cpu_memory.reusing_large_blocks(torch.device("cpu")):
        pinned = _block(33)
        before = cpu_memory.stats()["fresh_bytes"]
        a, b = _block(40), _block(48)
        a.fill_(1)
        b.fill_(2)
        del a, b
        joined = _block(80)            # no kept range is large enough: both moved into one mapping
        assert cpu_memory.stats()["fresh_bytes"] - before == 88 * MIB
        assert cpu_memory.stats()["kept_bytes"] == 8 * MIB
        joined.fill_(7)                # every page of the joined block is writable and its own
        assert _holds(joined, 7)
        del joined
        head = _block(36)              # the head of the kept 80 MiB range; its tail stays kept
        assert cpu_memory.stats()["kept_bytes"] == (8 + 80 - 36) * MIB
        head.fill_(3)
        assert _holds(head, 3)
        grown = _block(60)             # 8 + 44 kept MiB moved, 8 fresh
        grown.fill_(5)
        assert _holds(grown, 5)
        assert cpu_memory.stats()["fresh_bytes"] - before == 96 * MIB
        assert _holds(head, 3)         # untouched by the moves
        del head, grown, pinned


def test_a_heads_tail_is_kept_only_from_1_mib() -> None:
    with cpu_memory.reusing_large_blocks(torch.device("cpu")):
        pinned = _block(33)
        a = _block(40)
        del a
        near = torch.empty(40 * MIB - 3 * 4096, dtype=torch.uint8)   # its 12 KiB tail is unmapped, not kept
        assert cpu_memory.stats()["kept_bytes"] == 0 and cpu_memory.stats()["kept_segments"] == 0
        del near
        smaller = _block(38)                                          # its tail of 2 MiB - 12 KiB stays kept
        assert cpu_memory.stats()["kept_bytes"] == 2 * MIB - 3 * 4096 and cpu_memory.stats()["kept_segments"] == 1
        del smaller, pinned
    assert cpu_memory.stats()["kept_bytes"] == 0


def test_memory_held_never_exceeds_the_most_in_use_at_once() -> None:
    """Random requests (sizes in pages, not MiB) and frees: at every point the blocks in use plus the kept
    ones are at most the most that was ever in use at once, and at most 16 ranges are kept however long the
    scope runs."""
    rng = random.Random(0)
    before = cpu_memory.stats()
    held: list[torch.Tensor] = []
    with cpu_memory.reusing_large_blocks(torch.device("cpu")):
        for _ in range(400):
            if held and (len(held) > 5 or rng.random() < 0.45):
                held.pop(rng.randrange(len(held)))
            else:
                block = torch.empty(LARGE + rng.randrange(0, 48 * MIB // 4096) * 4096, dtype=torch.uint8)
                block[:: 4096 * 64] = 1     # touch some pages
                held.append(block)
            s = cpu_memory.stats()
            assert s["live_bytes"] + s["kept_bytes"] - before["live_bytes"] <= s["peak_bytes"] - before["live_bytes"]
            assert s["kept_segments"] <= 16
        held.clear()
    assert cpu_memory.stats()["kept_bytes"] == 0


def test_small_blocks_and_other_devices_are_left_alone() -> None:
    before = cpu_memory.stats()
    with cpu_memory.reusing_large_blocks(torch.device("meta")):
        assert cpu_memory.stats()["depth"] == 0
    with cpu_memory.reusing_large_blocks(torch.device("cpu")):
        small = torch.empty(LARGE - 1, dtype=torch.uint8)
        del small
        assert cpu_memory.stats()["kept_bytes"] == 0
        assert cpu_memory.stats()["fresh_bytes"] == before["fresh_bytes"]


def test_scopes_nest_and_threads_share_them() -> None:
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            rng = random.Random(seed)
            for _ in range(20):
                block = torch.full((LARGE + rng.randrange(4) * 4096,), seed, dtype=torch.uint8)
                assert _holds(block[: LARGE], seed)
        except BaseException as err:   # reported below
            errors.append(err)

    with cpu_memory.reusing_large_blocks(torch.device("cpu")):
        with cpu_memory.reusing_large_blocks(torch.device("cpu")):
            assert cpu_memory.stats()["depth"] == 2
        assert cpu_memory.stats()["depth"] == 1
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    assert cpu_memory.stats()["depth"] == 0 and cpu_memory.stats()["kept_bytes"] == 0


def test_a_decode_with_large_activations_reuses_and_releases_its_blocks() -> None:
    """A VAE whose top levels hold 32-64 MiB activations (bf16, 512 x 512 output): the decode's fresh bytes
    are its peak (give or take the sub-MiB tails given back), below those of a decode without the scope; releasing consumed inputs lowers that peak; the
    numbers are the same every way."""
    from sdlab.models import vae as vae_module
    from sdlab.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    cfg = VAEConfig(base_channels=64, channel_mult=(1, 2), num_res_blocks=1, norm_groups=32)
    vae = AutoencoderKL(cfg).to(torch.bfloat16).eval().to(memory_format=torch.channels_last)
    z = torch.randn(1, cfg.latent_channels, 256, 256).bfloat16()

    def decode() -> tuple[torch.Tensor, int, int]:
        before = cpu_memory.stats()["fresh_bytes"]
        out = vae.decode(z)
        return out, cpu_memory.stats()["fresh_bytes"] - before, cpu_memory.stats()["peak_bytes"]

    plain_scope, release = cpu_memory.reusing_large_blocks, vae_module._release
    with torch.inference_mode():
        reused, fresh, peak = decode()
        try:
            cpu_memory.reusing_large_blocks = lambda device: contextlib.nullcontext()
            unscoped, fresh_unscoped, _ = decode()
            cpu_memory.reusing_large_blocks = plain_scope
            vae_module._release = lambda x: None
            kept_inputs, _, peak_kept_inputs = decode()
        finally:
            cpu_memory.reusing_large_blocks, vae_module._release = plain_scope, release
    assert torch.equal(reused, unscoped) and torch.equal(reused, kept_inputs)
    assert peak <= fresh < peak + (2 << 20) and fresh < fresh_unscoped   # tails under 1 MiB are given back
    assert peak < peak_kept_inputs


def test_a_process_forked_while_another_thread_allocates_does_not_hang() -> None:
    """The allocator's lock is taken around fork: a child forked while another thread maps and unmaps large
    blocks under it can still allocate (without the fork handlers some children waited forever)."""
    import os
    import time

    stop = threading.Event()

    def churn() -> None:   # outside a scope: every block mapped and unmapped under the allocator's lock
        while not stop.is_set():
            block = torch.empty(200 * MIB, dtype=torch.uint8)
            block[::4096] = 1
            del block

    with cpu_memory.reusing_large_blocks(torch.device("cpu")):   # the allocator in place
        pass
    thread = threading.Thread(target=churn)
    thread.start()
    hung = 0
    try:
        for _ in range(40):
            pid = os.fork()
            if pid == 0:   # the child: one large block (written serially: OpenMP's pool does not survive
                _block(40)[::4096] = 1   # a fork), then out without cleanup
                os._exit(0)
            # A child that hangs waits on the lock forever: the deadline only has to be far beyond a slow child's
            # exit (up to 1.8 s measured under load 14, where 3 s was too close), and the first hang ends the test.
            deadline = time.monotonic() + HUNG_AFTER_S
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.01)
            if hung:
                break
    finally:
        stop.set()
        thread.join()
    assert hung == 0


def test_a_decorated_forward_takes_its_input_by_keyword() -> None:
    from sdlab.models.vae import AutoencoderKL, VAEConfig

    vae = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        assert torch.equal(vae.decoder(z=z), vae.decoder(z))
