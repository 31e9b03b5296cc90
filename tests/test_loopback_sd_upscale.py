"""A1111 1.10's img2img scripts Loopback and SD upscale, their drawing plans against transcriptions of A1111's code
(AUTOMATIC1111/stable-diffusion-webui, scripts/loopback.py and scripts/sd_upscale.py `Script.run`,
modules/images.py `image_grid`, `split_grid`, `combine_grid`) run with a stand-in `process_images` that records
what each call is asked to draw."""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline.loopback import kept_pictures, last_strength, loop_grid, loop_plan, loop_strength
from sdlab.pipeline.sd_upscale import tile_batches
from sdlab.pipeline.tile_grid import combine_grid, split_grid, with_images
from test_tile_grid import a1111_combine_grid, a1111_split_grid


# ---- A1111 scripts/loopback.py `Script.run`, transcribed: `process_images` and `state` are stand-ins --------------

def a1111_loopback(seed, n_iter, denoising_strength, loops, final_denoising_strength, denoising_curve,
                   interrupt_at=None):
    """Returns (calls: [(seed, strength, inpainting_fill, init)], returned images, initial_seed, p.denoising_strength)."""
    class P:
        pass
    p = P()
    p.seed, p.n_iter, p.denoising_strength, p.inpainting_fill = seed, n_iter, denoising_strength, 0
    p.init_images = ["request"]
    calls, interrupted = [], [False]

    def process_images(p):
        calls.append((p.seed, p.denoising_strength, p.inpainting_fill, p.init_images[0]))
        if interrupt_at is not None and len(calls) - 1 == interrupt_at:
            interrupted[0] = True
        return namedtuple("Processed", "seed images")(p.seed, [f"picture {len(calls) - 1}"])

    batch_count = p.n_iter
    p.batch_size = 1
    p.n_iter = 1
    initial_seed = None
    initial_denoising_strength = p.denoising_strength
    grids, all_images = [], []
    original_init_image = p.init_images
    original_inpainting_fill = p.inpainting_fill

    def calculate_denoising_strength(loop):
        strength = initial_denoising_strength
        if loops == 1:
            return strength
        progress = loop / (loops - 1)
        if denoising_curve == "Aggressive":
            strength = math.sin((progress) * math.pi * 0.5)
        elif denoising_curve == "Lazy":
            strength = 1 - math.cos((progress) * math.pi * 0.5)
        else:
            strength = progress
        change = (final_denoising_strength - initial_denoising_strength) * strength
        return initial_denoising_strength + change

    history = []
    for n in range(batch_count):
        p.init_images = original_init_image
        p.denoising_strength = initial_denoising_strength
        last_image = None
        for i in range(loops):
            processed = process_images(p)
            if interrupted[0]:
                break
            if initial_seed is None:
                initial_seed = processed.seed
            p.seed = processed.seed + 1
            p.denoising_strength = calculate_denoising_strength(i + 1)
            last_image = processed.images[0]
            p.init_images = [last_image]
            p.inpainting_fill = 1
            if batch_count == 1:
                history.append(last_image)
                all_images.append(last_image)
        if batch_count > 1 and not interrupted[0]:
            history.append(last_image)
            all_images.append(last_image)
        p.inpainting_fill = original_inpainting_fill
        if interrupted[0]:
            break
    if len(history) > 1:
        grids.append("grid")
    return calls, grids + all_images, initial_seed, p.denoising_strength


@pytest.mark.parametrize("curve", ["Aggressive", "Linear", "Lazy"])
@pytest.mark.parametrize("loops, n_iter", [(1, 1), (4, 1), (3, 2), (5, 3)])
def test_each_loopback_pass_is_a1111s(curve: str, loops: int, n_iter: int) -> None:
    """Seed, strength, Masked content and init picture of every pass; the pictures returned; the strength left."""
    calls, returned, initial_seed, strength = a1111_loopback(1000, n_iter, 0.3, loops, 0.9, curve)
    plan = loop_plan(loops, n_iter, 1000, 0.3, 0.9, curve)
    assert [(p.seed, p.from_request) for p in plan] == [(seed, fill == 0) for seed, _, fill, _ in calls]
    assert [p.strength for p in plan] == pytest.approx([s for _, s, _, _ in calls], abs=1e-15)
    assert [p.from_request for p in plan] == [init == "request" for *_, init in calls]
    kept = kept_pictures(plan, [True] * len(plan))
    assert ["grid"] * (len(kept) > 1) + [f"picture {i}" for i in kept] == returned
    assert initial_seed == plan[0].seed
    assert last_strength(loops, loops, 0.3, 0.9, curve) == pytest.approx(strength, abs=1e-15)


@pytest.mark.parametrize("loops, n_iter, at", [(4, 1, 0), (4, 1, 2), (3, 2, 1), (3, 2, 4), (2, 3, 3)])
def test_an_interrupted_pass_ends_the_loopback_as_a1111s(loops: int, n_iter: int, at: int) -> None:
    """The pass interrupted (and any after it) is not kept; A1111's strength left is that of the last pass run."""
    calls, returned, initial_seed, strength = a1111_loopback(5, n_iter, 0.5, loops, 0.2, "Linear", interrupt_at=at)
    plan = loop_plan(loops, n_iter, 5, 0.5, 0.2, "Linear")
    assert len(calls) == at + 1
    done = [i < at for i in range(len(plan))]
    kept = kept_pictures(plan, done)
    assert ["grid"] * (len(kept) > 1) + [f"picture {i}" for i in kept] == returned
    batch_done = sum(done[i] for i, p in enumerate(plan) if p.batch == plan[at].batch)
    assert last_strength(loops, batch_done, 0.5, 0.2, "Linear") == pytest.approx(strength, abs=1e-15)
    assert initial_seed == (plan[0].seed if at > 0 else None)


def test_loop_strength_runs_from_the_requests_to_the_final() -> None:
    assert loop_strength(0, 5, 0.2, 0.7, "Lazy") == 0.2
    assert loop_strength(4, 5, 0.2, 0.7, "Aggressive") == pytest.approx(0.7)
    assert loop_strength(2, 5, 0.2, 0.7, "Linear") == pytest.approx(0.45)
    assert loop_strength(3, 1, 0.2, 0.7, "Linear") == 0.2


# ---- A1111 modules/images.py `image_grid` (1.10: background opts.grid_background_color "#ffffff") ---------------

def a1111_image_grid(imgs, rows):
    cols = math.ceil(len(imgs) / rows)
    w, h = map(max, zip(*(img.size for img in imgs)))
    grid = Image.new("RGB", size=(cols * w, rows * h), color="#ffffff")
    for i, img in enumerate(imgs):
        img_w, img_h = img.size
        w_offset, h_offset = 0 if img_w == w else (w - img_w) // 2, 0 if img_h == h else (h - img_h) // 2
        grid.paste(img, box=(i % cols * w + w_offset, i // cols * h + h_offset))
    return grid


def random_picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_the_loopback_grid_is_a1111s_image_grid_in_one_row() -> None:
    rng = np.random.default_rng(0)
    pictures = [random_picture(rng, 24, 16) for _ in range(3)]
    assert np.array_equal(np.asarray(loop_grid(pictures)), np.asarray(a1111_image_grid(pictures, rows=1)))


# ---- A1111 scripts/sd_upscale.py `Script.run` (`split_grid` / `combine_grid`: test_tile_grid's transcription) --

def a1111_sd_upscale(img, width, height, overlap, seed, batch_size, n_iter, interrupt_after=None):
    """The run after the upscale: (calls: [(init tiles, seed, batch size)], combined pictures). Each call returns
    one picture per picture of its batch (A1111's img2img repeats a lone init picture to the batch size)."""
    class P:
        pass
    p = P()
    p.width, p.height, p.seed, p.batch_size, p.n_iter = width, height, seed, batch_size, n_iter
    calls = []

    def process_images(p):
        count = len(p.init_images)
        if count > 1:
            p.batch_size = count                        # A1111's img2img `init`: `self.batch_size = len(imgs)`
        calls.append((list(p.init_images), p.seed, p.batch_size))
        if interrupt_after is not None and len(calls) > interrupt_after + 1:
            return namedtuple("Processed", "seed images")(p.seed, [])
        drawn = [Image.fromarray(255 - np.asarray(p.init_images[min(i, count - 1)])) for i in range(p.batch_size)]
        return namedtuple("Processed", "seed images")(p.seed, drawn)

    grid = a1111_split_grid(img, tile_w=p.width, tile_h=p.height, overlap=overlap)
    batch_size = p.batch_size
    upscale_count = p.n_iter
    p.n_iter = 1
    work = []
    for y, h, row in grid.tiles:
        for tiledata in row:
            work.append(tiledata[2])
    batch_count = math.ceil(len(work) / batch_size)
    result_images = []
    for n in range(upscale_count):
        start_seed = seed + n
        p.seed = start_seed
        work_results = []
        for i in range(batch_count):
            p.batch_size = batch_size
            p.init_images = work[i * batch_size:(i + 1) * batch_size]
            processed = process_images(p)
            p.seed = processed.seed + 1
            work_results += processed.images
        image_index = 0
        for y, h, row in grid.tiles:
            for tiledata in row:
                tiledata[2] = work_results[image_index] if image_index < len(work_results) else Image.new("RGB", (p.width, p.height))
                image_index += 1
        result_images.append(a1111_combine_grid(grid))
    return calls, result_images


@pytest.mark.parametrize("size, tile, overlap, batch_size, n_iter", [
    ((200, 136), (64, 48), 16, 1, 1), ((200, 136), (64, 48), 16, 3, 2), ((128, 128), (64, 64), 0, 2, 1),
    ((96, 80), (64, 64), 32, 4, 1), ((64, 64), (64, 64), 8, 3, 1), ((40, 56), (64, 64), 8, 1, 1),
])
def test_sd_upscale_draws_and_combines_the_tiles_as_a1111(size, tile, overlap, batch_size, n_iter) -> None:
    """Each batch's init tiles, seed and batch size, and every combined picture (each tile 'drawn' as its
    negative) are A1111's; a picture smaller than a tile too (its tiles black past it)."""
    upscaled = random_picture(np.random.default_rng(1), *size)
    calls, expected = a1111_sd_upscale(upscaled, *tile, overlap, 777, batch_size, n_iter)
    grid = split_grid(upscaled, *tile, overlap)
    tiles = [t.image for _, t in grid.tiles()]
    batches = tile_batches(len(tiles), batch_size, n_iter, 777)
    assert len(batches) == len(calls)
    results = {n: [] for n in range(n_iter)}
    for batch, (inits, seed, drawn_size) in zip(batches, calls):
        assert (batch.seed, batch.batch_size) == (seed, drawn_size)
        assert [np.asarray(tiles[i]).tobytes() for i in batch.tiles] == [np.asarray(t).tobytes() for t in inits]
        pictures = [tiles[i] for i in batch.tiles]
        results[batch.upscale] += [Image.fromarray(255 - np.asarray(pictures[min(i, len(pictures) - 1)]))
                                   for i in range(batch.batch_size)]
    for n, picture in enumerate(expected):
        assert np.array_equal(np.asarray(combine_grid(with_images(grid, results[n]))), np.asarray(picture))


def test_tiles_not_drawn_after_an_interrupt_are_black_as_a1111s() -> None:
    upscaled = random_picture(np.random.default_rng(2), 160, 96)
    calls, expected = a1111_sd_upscale(upscaled, 64, 64, 16, 3, 2, 1, interrupt_after=1)
    grid = split_grid(upscaled, 64, 64, 16)
    tiles = [t.image for _, t in grid.tiles()]
    results = [Image.fromarray(255 - np.asarray(tiles[i])) for b in tile_batches(len(tiles), 2, 1, 3)[:2]
               for i in b.tiles]
    assert np.array_equal(np.asarray(combine_grid(with_images(grid, results))), np.asarray(expected[0]))
