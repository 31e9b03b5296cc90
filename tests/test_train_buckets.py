"""Aspect-ratio bucketing (`--enable-bucket`) against kohya-ss/sd-scripts' bucket functions, transcribed below:
``library/model_util.py`` ``make_bucket_resolutions``, ``library/train_util.py`` ``BucketManager.select_bucket``
(the path that may scale up, kohya's default) and ``trim_and_resize_if_required`` (its crop offsets; kohya
resizes with OpenCV's INTER_AREA or PIL's Lanczos, sdlab with PIL's Lanczos, so pixels are compared with
sdlab's own resize). Then: the images of a step share a bucket, every image is drawn each epoch, the SDXL size
conditioning is the real crop, and the tiny models train with it.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.train.config import TrainConfig
from sdlab.train.data import (
    ImageSample,
    LatentCache,
    TrainData,
    cover_size,
    load_training_image,
    make_bucket_resolutions,
    scan_dataset,
    select_bucket,
)
from sdlab.train.errors import TrainError
from train_fixtures import run_in_process, write_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# --- kohya's functions, transcribed -------------------------------------------------------------------------

def kohya_make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64):
    """model_util.make_bucket_resolutions."""
    max_width, max_height = max_reso
    max_area = max_width * max_height

    resos = set()

    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))

    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible

    resos = list(resos)
    resos.sort()
    return resos


def kohya_select_bucket(resos, image_width, image_height):
    """BucketManager.select_bucket with no_upscale False, after make_buckets / set_predefined_resos:
    (bucket, resized size)."""
    predefined_resos = resos.copy()
    predefined_resos_set = set(resos)
    predefined_aspect_ratios = np.array([w / h for w, h in resos])
    aspect_ratio = image_width / image_height
    reso = (image_width, image_height)
    if reso not in predefined_resos_set:
        ar_errors = predefined_aspect_ratios - aspect_ratio
        predefined_bucket_id = np.abs(ar_errors).argmin()
        reso = predefined_resos[predefined_bucket_id]
    ar_reso = reso[0] / reso[1]
    if aspect_ratio > ar_reso:
        scale = reso[1] / image_height
    else:
        scale = reso[0] / image_width
    resized_size = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
    return reso, resized_size


def kohya_trim_offsets(reso, resized_size):
    """trim_and_resize_if_required's centre crop (random_crop False): (top, left) of the kept window."""
    image_width, image_height = resized_size
    left = top = 0
    if image_width > reso[0]:
        trim_size = image_width - reso[0]
        left = trim_size // 2
    if image_height > reso[1]:
        trim_size = image_height - reso[1]
        top = trim_size // 2
    return top, left


# --- the bucket list and the per-image assignment ----------------------------------------------------------

BUCKET_SETTINGS = [((512, 512), 256, 1024, 64), ((1024, 1024), 256, 1024, 64), ((1024, 1024), 512, 2048, 64),
                   ((768, 768), 320, 1536, 32), ((64, 64), 32, 128, 8), ((16, 16), 8, 32, 8)]


@pytest.mark.parametrize("max_reso, low, high, step", BUCKET_SETTINGS)
def test_bucket_resolutions_and_assignment_are_kohya_s(max_reso, low, high, step):
    resos = make_bucket_resolutions(max_reso, low, high, step)
    assert resos == kohya_make_bucket_resolutions(max_reso, low, high, step)
    side = max_reso[0]
    sizes = [(w, h) for w in range(side // 4, side * 3, max(1, side // 13)) for h in range(side // 5, side * 3,
                                                                                           max(1, side // 11))]
    sizes += resos + [(3000, 4000), (4000, 3000), (1920, 1080), (1, 7), (7, 1)]
    for width, height in sizes:
        bucket = select_bucket(width, height, resos)
        assert (bucket, cover_size(width, height, bucket)) == kohya_select_bucket(resos, width, height), (width, height)


# --- resize and crop ---------------------------------------------------------------------------------------

def banded(width: int, height: int) -> Image.Image:
    """Red top row band, blue bottom band, green left column band, grey elsewhere: shows what a crop keeps."""
    a = np.full((height, width, 3), 128, np.uint8)
    a[:, : max(1, width // 8)] = (0, 255, 0)
    a[: max(1, height // 8)] = (255, 0, 0)
    a[-max(1, height // 8):] = (0, 0, 255)
    return Image.fromarray(a)


@pytest.mark.parametrize("width, height", [(64, 96), (96, 64), (50, 200), (300, 70), (64, 64), (33, 47)])
def test_an_image_is_resized_to_cover_its_bucket_and_cropped_in_the_middle_as_kohya(tmp_path, width, height):
    resos = make_bucket_resolutions((64, 64), 32, 128, 8)
    path = tmp_path / "p.png"
    banded(width, height).save(path)
    bucket = select_bucket(width, height, resos)
    loaded = load_training_image(path, 64, center_crop=True, random_flip=False, generator=torch.Generator(),
                                 bucket=bucket)
    resized = kohya_select_bucket(resos, width, height)[1]
    top, left = kohya_trim_offsets(bucket, resized)
    assert loaded.pixels.shape == (3, bucket[1], bucket[0])
    assert loaded.original_size == (height, width) and loaded.crop_top_left == (top, left)
    # the SDXL crop conditioning is the window the pixels come from
    window = banded(width, height).resize(resized, Image.Resampling.LANCZOS).crop(
        (left, top, left + bucket[0], top + bucket[1]))
    expected = torch.from_numpy(np.asarray(window, np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    assert torch.equal(loaded.pixels, expected)


def test_a_portrait_keeps_its_head_and_feet(tmp_path):
    """The audit's 64x96 portrait: centre-cropped to 64x64 it lost both bands; in its bucket it keeps them."""
    banded(64, 96).save(tmp_path / "p.png")
    bucket = select_bucket(64, 96, make_bucket_resolutions((64, 64), 32, 128, 8))
    assert bucket[1] > bucket[0]
    pixels = load_training_image(tmp_path / "p.png", 64, center_crop=True, random_flip=False,
                                 generator=torch.Generator(), bucket=bucket).pixels
    assert pixels[:, 0].mean((1,)).tolist() == pytest.approx([1, -1, -1], abs=0.05)      # red top row
    assert pixels[:, -1].mean((1,)).tolist() == pytest.approx([-1, -1, 1], abs=0.05)     # blue bottom row


# --- batches ------------------------------------------------------------------------------------------------

@pytest.fixture
def mixed(tmp_path):
    data = tmp_path / "img"
    sizes = {"10_a": [(64, 96), (66, 100), (96, 64)], "2_b": [(64, 64), (200, 60), (60, 200), (96, 64)]}
    for folder, shapes in sizes.items():
        (data / folder).mkdir(parents=True)
        for i, (w, h) in enumerate(shapes):
            banded(w, h).save(data / folder / f"{i}.png")
    return data


def test_a_step_s_images_share_a_bucket_and_an_epoch_draws_every_image(mixed):
    scan = scan_dataset(mixed)
    resos = make_bucket_resolutions((64, 64), 32, 128, 8)
    data = TrainData(scan, resolution=64, center_crop=True, random_flip=True, seed=5, batch_size=2, grad_accum=2,
                     num_workers=1, bucket_resolutions=resos)
    epoch = data.stream.epoch_length
    assert epoch % data.global_batch == 0
    steps = epoch // data.global_batch
    shapes: dict[int, set] = {}
    drawn = []
    for step, _, batch in data.iterate(0, steps):
        shapes.setdefault(step, set()).add(tuple(batch.images.shape[-2:]))
        drawn += batch.paths
        for path, size, crop in zip(batch.paths, batch.original_sizes, batch.crops_top_left):
            with Image.open(path) as im:
                assert size == (im.height, im.width)
            bucket = select_bucket(im.width, im.height, resos)
            resized = kohya_select_bucket(resos, im.width, im.height)[1]
            top, left = kohya_trim_offsets(bucket, resized)
            assert crop in ((top, left), (top, resized[0] - (left + bucket[0])))     # flipped: mirrored
    data.close()
    assert all(len(s) == 1 for s in shapes.values()) and len({s for v in shapes.values() for s in v}) > 1
    for sample in scan.samples:                          # each image at least its repeats times in an epoch
        assert drawn.count(str(sample.path)) >= sample.repeats


class PoolingVAE(torch.nn.Module):
    """A stand-in VAE for the latent cache: the posterior mean is the image 8x8-average-pooled, the std 1."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode(self, pixels):
        mean = torch.nn.functional.avg_pool2d(pixels, 8) * self.scale
        return types.SimpleNamespace(mean=mean, std=torch.ones_like(mean))


def _pooling_cache(folder) -> LatentCache:
    return LatentCache(PoolingVAE(), lambda z: z, folder, 64, torch.device("cpu"))


def _flipping_generator(flip: bool) -> torch.Generator:
    """A generator whose draw after the crop's flips (``flip``) or does not."""
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        torch.randint(0, 2, (1,), generator=g), torch.randint(0, 2, (1,), generator=g)
        if (float(torch.rand((), generator=g)) < 0.5) == flip:
            return torch.Generator().manual_seed(seed)
    raise AssertionError


@pytest.mark.parametrize("center_crop", [True, False])
def test_a_flipped_image_s_crop_corner_is_mirrored_as_kohya_s(tmp_path, center_crop):
    """SDXL's crop_top_left of a flipped image is the corner of the window in the mirrored resized image: kohya's
    ``crop_left_top = (target_size[0] - crop_ltrb[2], crop_ltrb[1])`` when flipped (``__getitem__``), the width
    less the right edge. The latent cache stores the same corner with its flipped latent."""
    width, height = 300, 70
    resos = make_bucket_resolutions((64, 64), 32, 128, 8)
    bucket = select_bucket(width, height, resos)
    resized = cover_size(width, height, bucket)
    assert (resized[0] - bucket[0]) % 2 == 1            # an odd trim: the mirrored centre crop is 1 px over
    banded(width, height).save(tmp_path / "p.png")
    kwargs = dict(center_crop=center_crop, random_flip=True, bucket=bucket)
    plain = load_training_image(tmp_path / "p.png", 64, generator=_flipping_generator(False), **kwargs)
    flipped = load_training_image(tmp_path / "p.png", 64, generator=_flipping_generator(True), **kwargs)
    if center_crop:
        assert plain.crop_top_left == kohya_trim_offsets(bucket, resized)
    top, left = flipped.crop_top_left
    assert flipped.flipped and not plain.flipped
    mirror = banded(width, height).resize(resized, Image.Resampling.LANCZOS).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    window = mirror.crop((left, top, left + bucket[0], top + bucket[1]))
    assert torch.equal(flipped.pixels, torch.from_numpy(np.asarray(window, np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    if center_crop:
        right = plain.crop_top_left[1] + bucket[0]
        assert (top, left) == (plain.crop_top_left[0], resized[0] - right) != plain.crop_top_left
        cache = _pooling_cache(tmp_path / "cache")
        sample = ImageSample(tmp_path / "p.png", "p")
        cache.ensure([(sample, True, bucket), (sample, False, bucket)])
        entry = cache.load(sample, True, bucket)
        assert tuple(entry["crop_top_left"].tolist()) == (top, left)
        assert tuple(cache.load(sample, False, bucket)["crop_top_left"].tolist()) == plain.crop_top_left
        assert torch.equal(entry["mean"], torch.nn.functional.avg_pool2d(flipped.pixels[None], 8)[0])


@pytest.mark.parametrize("cached", [False, True])
def test_a_bucket_whose_only_image_breaks_after_the_scan_borrows_another_bucket_s(tmp_path, caplog, cached):
    """Its slots take the next images of the stream from other buckets, trained at its bucket: the run goes on
    and every step keeps one bucket; with the latent cache, such an image is encoded at that bucket then."""
    for i, (w, h) in enumerate([(64, 64), (64, 64), (64, 64), (200, 60)]):
        banded(w, h).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("x")
    resos = make_bucket_resolutions((64, 64), 32, 128, 8)
    lonely = select_bucket(200, 60, resos)
    data = TrainData(scan_dataset(tmp_path), resolution=64, center_crop=True, random_flip=False, seed=0,
                     batch_size=2, grad_accum=1, num_workers=1, bucket_resolutions=resos,
                     latent_cache=_pooling_cache(tmp_path / "cache") if cached else None)
    data.prepare_cache()
    (tmp_path / "3.png").unlink()
    buckets = []                                        # (width, height) of each step's pixels
    for _, _, batch in data.iterate(0, 6):              # two epochs of 3 steps, one of them the lonely bucket's
        height, width = [8 * n for n in batch.latents.shape[-2:]] if cached else batch.images.shape[-2:]
        buckets.append((width, height))
        assert all(not path.endswith("3.png") for path in batch.paths)
    data.close()
    assert buckets.count(lonely) == 2
    assert data.broken_at_load == {str(tmp_path / "3.png"): 1}


def test_bucket_settings_are_checked_before_anything_loads():
    with pytest.raises(TrainError, match="--min-bucket-reso 256 shapes --enable-bucket"):
        TrainConfig(min_bucket_reso=256)
    with pytest.raises(TrainError, match="--resolution 512 must lie between"):
        TrainConfig(enable_bucket=True, resolution=512, max_bucket_reso=384)
    with pytest.raises(TrainError, match="--enable-bucket does not apply to it"):
        TrainConfig(task="vae", enable_bucket=True)
    with pytest.raises(TrainError, match="--bucket-reso-steps must be a positive multiple of 8"):
        TrainConfig(enable_bucket=True, bucket_reso_steps=12)


@pytest.mark.parametrize("family, extra", [("sd1", ("--cache-latents",)), ("sdxl", ("--lora-rank", "2"))])
def test_the_tiny_models_train_with_buckets(mixed, tmp_path, family, extra):
    model = write_tiny_model(tmp_path / f"{family}.safetensors", family)
    result = run_in_process(tmp_path / "run", model, mixed, "--max-steps", "3", "--checkpoint-every", "100",
                            "--batch-size", "2", "--enable-bucket", "--bucket-reso-steps", "8", *extra)
    assert result.step == 3 and math.isfinite(result.last_loss) and result.weights.is_file()
