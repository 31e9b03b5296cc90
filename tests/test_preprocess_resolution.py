"""A ControlNet preprocessor's Processor Res and Pixel Perfect, compared with sd-webui-controlnet's own functions
(transcribed below with cv2, which A1111 runs them with): the picture's short side scaled to the resolution and
padded to multiples of 64 (`resize_image_with_pad`), canny / threshold / scribble run on it and cut back, Pixel
Perfect's resolution from the drawing's size; the preprocessors that take no resolution are unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdlab.pipeline.control import ControlInput, at_first_pass_resolution, infotext_lines, recorded_unit, resolution_of
from sdlab.pipeline.preprocess import (
    PREPROCESSORS, RESOLUTION_MODULES, cubic_resize, pixel_perfect_resolution, preprocess, processor_resolution,
    resized_with_pad,
)

cv2 = pytest.importorskip("cv2")


@pytest.fixture
def opencvs_own_code():
    """cv2 without Intel IPP: OpenCV's INTER_CUBIC as its own code computes it, which `cubic_resize` follows (IPP's
    rounds about 3% of the values 1 the other way; INTER_AREA is the same either way)."""
    was = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    yield
    cv2.ipp.setUseIPP(was)


# --- sd-webui-controlnet, transcribed (scripts/processor.py, v1.1.4xx: pad64, safer_memory, resize_image_with_pad,
# canny with annotator/canny's apply_canny = cv2.Canny, scribble_thr, threshold; scripts/utils.py /
# internal_controlnet/external_code.py: pixel_perfect_resolution) -------------------------------------------------

def pad64(x):
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_image_with_pad(input_image, resolution):
    img = input_image                                                  # HWC3 of an RGB picture: itself
    H_raw, W_raw, _ = img.shape
    k = float(resolution) / float(min(H_raw, W_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    H_target = int(np.round(float(H_raw) * k))
    W_target = int(np.round(float(W_raw) * k))
    img = cv2.resize(img, (W_target, H_target), interpolation=interpolation)
    H_pad, W_pad = pad64(H_target), pad64(W_target)
    img_padded = np.pad(img, [[0, H_pad], [0, W_pad], [0, 0]], mode='edge')

    def remove_pad(x):
        return np.ascontiguousarray(x[:H_target, :W_target].copy()).copy()

    return np.ascontiguousarray(img_padded.copy()).copy(), remove_pad


def extension_canny(img, res=512, thr_a=100, thr_b=200):
    img, remove_pad = resize_image_with_pad(img, res)
    return remove_pad(cv2.Canny(img, thr_a, thr_b))


def extension_scribble_thr(img, res=512):
    img, remove_pad = resize_image_with_pad(img, res)
    result = np.zeros_like(img, dtype=np.uint8)
    result[np.min(img, axis=2) < 127] = 255
    return remove_pad(result)


def extension_threshold(img, res=512, thr_a=127):
    img, remove_pad = resize_image_with_pad(img, res)
    result = np.zeros_like(img, dtype=np.uint8)
    result[np.min(img, axis=2) > thr_a] = 255
    return remove_pad(result)


def extension_pixel_perfect_resolution(image, target_H, target_W, resize_mode):
    raw_H, raw_W, _ = image.shape
    k0 = float(target_H) / float(raw_H)
    k1 = float(target_W) / float(raw_W)
    if resize_mode == "Resize and Fill":                                # ResizeMode.OUTER_FIT
        estimation = min(k0, k1) * float(min(raw_H, raw_W))
    else:
        estimation = max(k0, k1) * float(min(raw_H, raw_W))
    return int(np.round(estimation))

# -----------------------------------------------------------------------------------------------------------------


def _drawing(width: int, height: int, seed: int = 0) -> Image.Image:
    """Shapes with soft and hard edges, and some noise: edges at every scale."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (40, 60, 90))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(4, max(5, width // 2)), y0 + rng.integers(4, max(5, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


SIZES = [(300, 200), (200, 300), (96, 160), (57, 41), (640, 512), (256, 256), (1000, 120)]
"""(width, height): shrunk and enlarged to 256, both orientations, odd sides, a side already 256, a long strip."""


@pytest.mark.usefixtures("opencvs_own_code")
@pytest.mark.parametrize("size", [(5, 7, 256, 329), (20, 50, 73, 50), (50, 70, 256, 358), (64, 64, 256, 256),
                                  (37, 100, 256, 692), (3, 3, 200, 200)])
def test_cubic_resize_is_opencvs_inter_cubic_bit_for_bit(size):
    width, height, new_w, new_h = size
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(cubic_resize(pixels, new_w, new_h), expected)


@pytest.mark.usefixtures("opencvs_own_code")
@pytest.mark.parametrize("band_values", [1, 700, 1 << 18])
def test_cubic_resize_in_bands_is_the_same(monkeypatch, band_values):
    """Bands of one row, of a few rows that do not divide the height, and the default: OpenCV's result each time."""
    import sdlab.pipeline.preprocess as module

    monkeypatch.setattr(module, "CUBIC_BAND_VALUES", band_values)
    for width, height, new_w, new_h in ((7, 5, 90, 61), (40, 30, 23, 77)):
        pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
        assert np.array_equal(cubic_resize(pixels, new_w, new_h), expected)


def test_cubic_resize_memory_is_near_its_outputs():
    """An 8 x 512 strip at the default resolution 512 is 512 x 32768 (48 MiB): the resize holds its output, the
    rows pass's int32 sums and one band's taps (it took ~2.9 GB, 60 times the output, in one piece)."""
    import tracemalloc

    pixels = np.random.default_rng(0).integers(0, 256, (8, 512, 3), dtype=np.uint8)
    tracemalloc.start()
    try:
        out = cubic_resize(pixels, 32768, 512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (512, 32768, 3)
    assert peak < out.nbytes + 8 * 32768 * 3 * 4 + (32 << 20)


def test_processor_res_above_the_sliders_top_is_refused(tmp_path):
    """Python's and the CLI's processor_res stops at 2048, A1111's slider's top (check_control)."""
    from sdlab.pipeline.control import check_control
    from sdlab.pipeline.request import RequestError

    net, hint = tmp_path / "net.safetensors", tmp_path / "hint.png"
    net.write_bytes(b"x")
    Image.new("RGB", (8, 8)).save(hint)
    assert check_control(ControlInput(str(net), str(hint), module="canny", processor_res=2048)).processor_res == 2048
    for given in (2049, 10000, 0):
        with pytest.raises(RequestError, match=r"control 0: processor_res must be a whole number in 1\.\.2048"):
            check_control(ControlInput(str(net), str(hint), module="canny", processor_res=given))


def test_a_map_past_the_bound_is_refused_before_it_is_made():
    """A 1024 x 4 strip's short side scaled to 512 is 131072 x 512 (67 Mpx, gigabytes in canny): a ValueError naming
    the sizes, raised before the resize; a map of MAX_MAP_PIXELS (a 4:1 picture at 2048) is still made."""
    from sdlab.pipeline.preprocess import MAX_MAP_PIXELS

    strip = Image.new("RGB", (1024, 4))
    for module in RESOLUTION_MODULES:
        with pytest.raises(ValueError, match=r"processor resolution 512 scales the 1024x4 picture to 131072x512, past "
                                             r"the 16777216 pixels a preprocessor map may have"):
            preprocess(strip, module, resolution=512)
    assert preprocess(strip, "invert", resolution=512).size == (1024, 4)        # no resolution: no map
    assert MAX_MAP_PIXELS == 4 * 2048 * 2048
    assert resized_with_pad(np.zeros((4, 16, 3), dtype=np.uint8), 1024)[1] == (1024, 4096)


@pytest.mark.usefixtures("opencvs_own_code")
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("resolution", [256, 512, 100])
def test_resized_with_pad_is_the_extensions(size, resolution):
    pixels = np.asarray(_drawing(*size))
    padded, (height, width) = resized_with_pad(pixels, resolution)
    expected, remove_pad = resize_image_with_pad(pixels, resolution)
    assert np.array_equal(padded, expected)
    assert remove_pad(expected).shape[:2] == (height, width) and min(height, width) == resolution
    assert padded.shape[0] % 64 == 0 and padded.shape[1] % 64 == 0


@pytest.mark.usefixtures("opencvs_own_code")
@pytest.mark.parametrize("size", SIZES)
def test_canny_threshold_and_scribble_at_processor_res_256_equal_the_extensions_maps(size):
    image = _drawing(*size, seed=size[0])
    pixels = np.asarray(image)
    expected = {"canny": extension_canny(pixels, 256, 100, 200), "threshold": extension_threshold(pixels, 256, 127),
                "scribble": extension_scribble_thr(pixels, 256)}
    for module, reference in expected.items():
        ours = np.asarray(preprocess(image, module, resolution=256))
        assert ours.shape[:2] == reference.shape[:2], module
        assert np.array_equal(ours[..., 0], reference if reference.ndim == 2 else reference[..., 0]), module
    low_high = np.asarray(preprocess(image, "canny", 50, 150, resolution=256))[..., 0]
    assert np.array_equal(low_high, extension_canny(pixels, 256, 50, 150))


def test_the_preprocessors_without_a_resolution_ignore_it():
    """The extension's invert, tile_resample, none and inpaint run on the picture as it is (no
    resize_image_with_pad), and sdlab's tile with them: a resolution changes nothing."""
    image = _drawing(90, 70)
    assert set(PREPROCESSORS) - set(RESOLUTION_MODULES) == {"none", "invert", "tile_resample", "tile", "inpaint",
                                                            "inpaint_only"}
    for module in set(PREPROCESSORS) - set(RESOLUTION_MODULES):
        assert np.array_equal(np.asarray(preprocess(image, module, resolution=256)),
                              np.asarray(preprocess(image, module))), module
    assert np.array_equal(np.asarray(preprocess(image, "canny")), np.asarray(PREPROCESSORS["canny"](image)))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("target", [(512, 512), (768, 512), (512, 896), (64, 64), (200, 136)])
@pytest.mark.parametrize("mode", [("resize", "Just Resize"), ("crop", "Crop and Resize"),
                                  ("fill", "Resize and Fill")])
def test_pixel_perfect_resolution_is_the_extensions(size, target, mode):
    (width, height), (target_w, target_h), (ours, theirs) = size, target, mode
    image = np.zeros((height, width, 3), dtype=np.uint8)
    assert pixel_perfect_resolution(size, target_w, target_h, ours) == \
        extension_pixel_perfect_resolution(image, target_h, target_w, theirs)


def test_a_controls_resolution_pixel_perfect_and_its_second_pass():
    """Pixel Perfect replaces processor_res with the drawing's resolution; a preprocessor that takes none gets none;
    a hires fix's second pass keeps the first pass's (the extension preprocesses once)."""
    image = _drawing(300, 200)
    canny = ControlInput("net.safetensors", image, module="canny", processor_res=384)
    assert resolution_of(canny, image, 512, 512, "crop") == 384
    perfect = ControlInput("net.safetensors", image, module="canny", processor_res=384, pixel_perfect=True)
    assert resolution_of(perfect, image, 512, 512, "crop") == 512          # max(512 / 200, 512 / 300) * 200
    assert resolution_of(perfect, image, 512, 512, "fill") == 341          # min(...) * 200 = 341.33
    assert resolution_of(ControlInput("net.safetensors", image, module="invert", processor_res=384), image,
                         512, 512, "crop") is None
    [fixed] = at_first_pass_resolution([perfect], 768, 512, "a1111")
    assert (fixed.processor_res, fixed.pixel_perfect) == (512, False)
    assert resolution_of(fixed, image, 1536, 1024, "crop") == 512


def test_processor_res_outside_the_extensions_slider_is_its_default():
    """The extension's bound check of processor_res (slider 64..2048, value 512); unset (null) is its unit's -1,
    so 512 too."""
    for given, taken in ((None, 512), (-1, 512), (0, 512), (63, 512), (2049, 512), (64, 64), (2048, 2048),
                         (768, 768), (256.0, 256)):
        assert processor_resolution(given) == taken
        assert type(processor_resolution(given)) is type(taken)


def test_infotext_says_what_was_drawn_and_reads_back(tmp_path):
    net = tmp_path / "net.safetensors"
    net.write_bytes(b"x")
    lines = infotext_lines([ControlInput(str(net), "hint.png", module="canny", processor_res=256),
                            ControlInput(str(net), "hint.png", module="threshold", pixel_perfect=True),
                            ControlInput(str(net), "hint.png", module="canny"),
                            ControlInput(str(net), "hint.png", module="invert", processor_res=256)], "a1111")
    assert "Resize Mode: Crop and Resize, Processor Res: 256, Guidance Start" in lines["ControlNet 0"]
    assert lines["ControlNet 1"].endswith("Guidance End: 1, Pixel Perfect: True")
    assert "Processor Res: 512" in lines["ControlNet 2"] and "Pixel Perfect" not in lines["ControlNet 2"]   # unset
    # the extension's serialize writes its unit's Processor Res on every line, Pixel Perfect or invert (none) too
    assert "Processor Res: 512" in lines["ControlNet 1"] and "Processor Res: 256" in lines["ControlNet 3"]
    native = infotext_lines([ControlInput(str(net), "hint.png", module="invert", processor_res=256),
                             ControlInput(str(net), "hint.png", module="threshold", pixel_perfect=True)], "diffusers")
    assert not any("Processor Res" in line for line in native.values())   # sdlab's: what it drew at, if any
    assert recorded_unit(lines["ControlNet 0"])["processor_res"] == 256
    assert recorded_unit(lines["ControlNet 1"])["pixel_perfect"] is True
    extension = ("Module: canny, Model: cn [12345678], Weight: 1, Resize Mode: Crop and Resize, Processor Res: -1, "
                 "Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, "
                 "Control Mode: Balanced")
    assert recorded_unit(extension)["processor_res"] == 512 and recorded_unit(extension)["pixel_perfect"] is False
    with pytest.raises(ValueError, match="Processor Res 'big'"):
        recorded_unit("Module: canny, Processor Res: big")


# --- sd-webui-controlnet, transcribed: scripts/controlnet.py Script.detectmap_proc's high_quality_resize ("Written
# by lvmin"), scripts/utils.py nake_nms / get_unique_axis0, scripts/lvminthin.py lvmin_thin (v1.1.4xx) ------------

lvmin_kernels_raw = [np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], dtype=np.int32),
                     np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], dtype=np.int32)]
lvmin_kernels = [np.rot90(x, k=k, axes=(0, 1)) for k in range(4) for x in lvmin_kernels_raw]
lvmin_prunings_raw = [np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], dtype=np.int32),
                      np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]], dtype=np.int32)]
lvmin_prunings = [np.rot90(x, k=k, axes=(0, 1)) for k in range(4) for x in lvmin_prunings_raw]


def remove_pattern(x, kernel):
    objects = cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel)
    objects = np.where(objects > 127)
    x[objects] = 0
    return x, objects[0].shape[0] > 0


def thin_one_time(x, kernels):
    y = x
    is_done = True
    for k in kernels:
        y, has_update = remove_pattern(y, k)
        if has_update:
            is_done = False
    return y, is_done


def lvmin_thin(x, prunings=True):
    y = x
    for i in range(32):
        y, is_done = thin_one_time(y, lvmin_kernels)
        if is_done:
            break
    if prunings:
        y, _ = thin_one_time(y, lvmin_prunings)
    return y


def nake_nms(x):
    f1 = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8)
    f2 = np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8)
    f3 = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8)
    f4 = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8)
    y = np.zeros_like(x)
    for f in [f1, f2, f3, f4]:
        np.putmask(y, cv2.dilate(x, kernel=f) == x, x)
    return y


def get_unique_axis0(data):
    arr = np.asanyarray(data)
    idxs = np.lexsort(arr.T)
    arr = arr[idxs]
    unique_idxs = np.empty(len(arr), dtype=np.bool_)
    unique_idxs[:1] = True
    unique_idxs[1:] = np.any(arr[:-1, :] != arr[1:, :], axis=-1)
    return arr[unique_idxs]


def extension_high_quality_resize(x, size):                           # the map's RGB: no inpaint alpha
    if x.shape[0] != size[1] or x.shape[1] != size[0]:
        new_size_is_smaller = (size[0] * size[1]) < (x.shape[0] * x.shape[1])
        new_size_is_bigger = (size[0] * size[1]) > (x.shape[0] * x.shape[1])
        unique_color_count = len(get_unique_axis0(x.reshape(-1, x.shape[2])))
        is_one_pixel_edge = False
        is_binary = False
        if unique_color_count == 2:
            is_binary = np.min(x) < 16 and np.max(x) > 240
            if is_binary:
                xc = x
                xc = cv2.erode(xc, np.ones(shape=(3, 3), dtype=np.uint8), iterations=1)
                xc = cv2.dilate(xc, np.ones(shape=(3, 3), dtype=np.uint8), iterations=1)
                one_pixel_edge_count = np.where(xc < x)[0].shape[0]
                all_edge_count = np.where(x > 127)[0].shape[0]
                is_one_pixel_edge = one_pixel_edge_count * 2 > all_edge_count
        if 2 < unique_color_count < 200:
            interpolation = cv2.INTER_NEAREST
        elif new_size_is_smaller:
            interpolation = cv2.INTER_AREA
        else:
            interpolation = cv2.INTER_CUBIC  # Must be CUBIC because we now use nms. NEVER CHANGE THIS
        y = cv2.resize(x, size, interpolation=interpolation)
        if is_binary:
            y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
            if is_one_pixel_edge:
                y = nake_nms(y)
                _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
                y = lvmin_thin(y, prunings=new_size_is_bigger)
            else:
                _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            y = np.stack([y] * 3, axis=2)
    else:
        y = x
    return y

# -----------------------------------------------------------------------------------------------------------------


def _maps(size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Control maps of a drawing of `size`: binary ones (canny's one-pixel edges, threshold's and scribble's
    areas), a few-colour one (a segmentation map) and a photo (noise: hundreds of colours)."""
    drawing = _drawing(*size)
    maps = {module: np.asarray(preprocess(drawing, module)) for module in ("canny", "threshold", "scribble")}
    maps["segmentation"] = np.asarray(Image.fromarray(np.asarray(drawing)).quantize(12).convert("RGB"))
    maps["photo"] = np.asarray(drawing)
    return maps


@pytest.mark.usefixtures("opencvs_own_code")
@pytest.mark.parametrize("fit", [((300, 200), (96, 64)), ((96, 64), (300, 200)), ((200, 300), (77, 130)),
                                 ((57, 41), (640, 480)), ((120, 80), (120, 200)), ((120, 80), (200, 60)),
                                 ((64, 64), (64, 64))])
def test_a_map_is_fitted_as_the_extensions_high_quality_resize(fit):
    """Shrunk (INTER_AREA), enlarged (INTER_CUBIC), one side kept, a wider aspect with more pixels, the same
    size: each map pixel-equal to the extension's high_quality_resize (cv2 without IPP: its INTER_CUBIC)."""
    from sdlab.pipeline.hint_resize import high_quality_resize

    size, (width, height) = fit
    for name, pixels in _maps(size).items():
        expected = extension_high_quality_resize(pixels.copy(), (width, height))
        assert np.array_equal(high_quality_resize(pixels.copy(), width, height), expected), name


@pytest.mark.usefixtures("opencvs_own_code")
@pytest.mark.parametrize("fit", [((64, 64), (63, 65)), ((64, 64), (65, 63)), ((300, 200), (150, 230)),
                                 ((200, 300), (310, 97)), ((97, 61), (40, 140)), ((512, 512), (1024, 200))])
def test_a_stretch_that_shrinks_one_side_and_grows_the_other_is_the_extensions(fit):
    """Where INTER_AREA shrinks the picture while one side grows, OpenCV interpolates linearly on both sides with
    its area coefficients (`area_resize`): each map pixel-equal to the extension's (area + cubic, before: canny
    64x64 -> 63x65 1.8% of pixels apart, a photo 1.6 levels on average)."""
    from sdlab.pipeline.hint_resize import high_quality_resize

    size, (width, height) = fit
    for name, pixels in _maps(size).items():
        expected = extension_high_quality_resize(pixels.copy(), (width, height))
        assert np.array_equal(high_quality_resize(pixels.copy(), width, height), expected), name


@pytest.mark.usefixtures("opencvs_own_code")
@pytest.mark.parametrize("resize_mode", ["resize", "crop", "fill"])
def test_an_a1111_hint_at_processor_res_is_the_extensions_fitted_map(resize_mode):
    """canny at 512 on a 96 x 64 hint for a 96 x 64 picture: under A1111's convention the ControlNet reads the
    extension's detectmap_proc of the map (binary, thin edges), not a Lanczos blur of it (43 grey levels
    where the extension has 2); diffusers' convention keeps Lanczos."""
    from sdlab.pipeline.control import hint_tensor

    hint = Image.new("RGB", (96, 64), "black")
    draw = ImageDraw.Draw(hint)
    draw.ellipse([10, 8, 70, 56], outline="white", width=3)
    draw.line([0, 60, 95, 5], fill=(200, 200, 200), width=2)
    drawn = preprocess(hint, "canny", resolution=512)                     # 768 x 512
    old_w, old_h = drawn.size
    k = (max if resize_mode == "crop" else min)(64 / old_h, 96 / old_w)      # detectmap_proc's safeint(old * k)
    fitted = extension_high_quality_resize(np.asarray(drawn), (int(np.round(old_w * k)), int(np.round(old_h * k))))
    tensor = hint_tensor(drawn, 96, 64, resize_mode, "a1111")
    ours = (tensor[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(ours, fitted) and len(np.unique(ours)) == 2
    assert len(np.unique(hint_tensor(drawn, 96, 64, resize_mode, "diffusers"))) > 2


def test_nearest_resize_is_opencvs_inter_nearest_on_random_sizes():
    """`nearest_resize` (the extension's binary maps) picks cv2's INTER_NEAREST source pixels on 2000 random size
    pairs, 1 to 700 each way (d * source / target in place of OpenCV's d * (1 / (target / source)) picked
    another pixel on 192 of them)."""
    from sdlab.pipeline.hint_resize import nearest_resize

    rng = np.random.default_rng(0)
    for _ in range(2000):
        height, width, new_h, new_w = (int(v) for v in rng.integers(1, 700, 4))
        rows = np.arange(height, dtype=np.int32)[:, None] * 1000 + np.arange(width, dtype=np.int32)   # the pixel's place
        expected = cv2.resize(rows.view(np.uint8).reshape(height, width, 4), (new_w, new_h),
                              interpolation=cv2.INTER_NEAREST)
        got = nearest_resize(rows.view(np.uint8).reshape(height, width, 4), new_w, new_h)
        assert np.array_equal(got, expected), ((width, height), (new_w, new_h))


def test_a_maps_colour_count_is_numpys_unique_rows():
    """`colour_count` counts the colours `np.unique(axis=0)` (the extension's `get_unique_axis0`) finds, in
    milliseconds: a photo (all 2 ** 24 colours possible), a binary map, a segmentation map, one colour, a
    channel at 255 (the packing's top bits)."""
    from sdlab.pipeline.hint_resize import colour_count

    rng = np.random.default_rng(3)
    photo = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    binary = np.where(rng.random((64, 96, 1)) > 0.9, 255, 0).astype(np.uint8).repeat(3, axis=2)
    palette = rng.integers(0, 256, (37, 3), dtype=np.uint8)
    segmentation = palette[rng.integers(0, 37, (50, 70))]
    for x in (photo, binary, segmentation, np.zeros((5, 5, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8),
              np.stack([np.full((2, 2), 255, np.uint8), np.zeros((2, 2), np.uint8), np.eye(2, dtype=np.uint8)], 2)):
        assert colour_count(x) == len(np.unique(x.reshape(-1, 3), axis=0))


def test_an_unset_processor_res_is_512_under_a1111s_convention(tmp_path):
    """Unset under A1111's convention (a --from-png redraw of an A1111 picture, Python's control_convention="a1111")
    is the extension's 512, as the server's A1111 units, and is recorded; under diffusers' the picture's own size.
    A tile_resample line (no Processor Res recorded) switched to canny by --from-png so runs at 512."""
    from sdlab.cli.generate import _kept_settings

    image = _drawing(300, 200)
    unset = ControlInput("net.safetensors", image, module="canny")
    assert (unset.processor_res_under("a1111"), unset.processor_res_under("diffusers")) == (512, None)
    assert resolution_of(unset, image, 512, 512, "crop", "a1111") == 512
    assert resolution_of(unset, image, 512, 512, "crop") is None
    assert resolution_of(ControlInput("net.safetensors", image, module="canny", processor_res=256), image, 512, 512,
                         "crop", "a1111") == 256
    assert "Processor Res: 512" in infotext_lines([unset], "a1111")["ControlNet 0"]
    assert "Processor Res" not in infotext_lines([unset], "diffusers")["ControlNet 0"]
    line = ("Module: tile_resample, Model: cn [12345678], Weight: 1.0, Resize Mode: Crop and Resize, Threshold A: 1.0, "
            "Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced")
    switched = ControlInput("net.safetensors", image, **{**_kept_settings(recorded_unit(line), {"module": "canny"}),
                                                         "module": "canny"})
    assert resolution_of(switched, image, 512, 512, "crop", "a1111") == 512


def test_control_processor_res_help_gives_its_range_and_a1111s_default(capsys):
    from sdlab.cli import main

    with pytest.raises(SystemExit):
        main(["txt2img", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "scaled to N (1..2048, A1111's slider's top)" in text
    assert "or 512 when a picture's parameters are redrawn by A1111's rule" in text
