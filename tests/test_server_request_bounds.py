"""What one request may cost a server, whoever sends it: a selectable script's pictures all count against
`--max-images` (its cells, lines, passes and tiles together, as a request's batches), refused before any is
drawn; the options kept are bounded; a picture past the pixel limit is a 413 wherever it is sent."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdlab.pipeline.images import ImageTooLargeError, open_image
from sdlab.pipeline.png_info import ParametersError, read_parameters
from sdlab.pipeline.prompts_file import read_lines
from sdlab.pipeline.request import GenerationRequest
from sdlab.server.a1111_scripts import axis_types
from sdlab.server.config import Limits
from sdlab.server.inputs import BadRequest, check_request
from bundle_fixtures import tiny_bundle
from server_fixtures import b64_png, start_server

BASE = {"prompt": "a red apple", "steps": 2, "seed": 7, "cfg_scale": 5.0, "sampler_name": "Euler", "width": 64,
        "height": 64}


INIT = b64_png(Image.fromarray(np.full((64, 64, 3), 120, dtype=np.uint8)))


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """A loopback server without auth that draws at most 2 pictures a request (`--max-images 2 --max-batch 2`)."""
    server = start_server(tmp_path_factory.mktemp("bounds") / "outputs", "--max-images", "2", "--max-batch", "2")
    yield server
    server.stop()


@pytest.fixture
def client(small_server):
    with httpx.Client(base_url=small_server.url, timeout=300) as c:
        yield c


def _xyz_seeds(seeds: str) -> list:
    x_type = [axis.label for axis in axis_types("txt2img")].index("Seed")
    return [x_type, seeds, [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False]


SCRIPTS = {
    "x/y/z plot 3 seeds": ("txt2img", {"script_name": "x/y/z plot", "script_args": _xyz_seeds("1,2,3")}, 3),
    "x/y/z plot 2 seeds x batch 2": ("txt2img", {"script_name": "x/y/z plot", "script_args": _xyz_seeds("1,2"),
                                                  "batch_size": 2}, 4),
    "prompts from file 3 lines": ("txt2img", {"script_name": "prompts from file or textbox",
                                              "script_args": [False, False, "start", "a\nb\n\nc"]}, 3),
    "prompts from file 100,000 lines": ("txt2img", {"script_name": "prompts from file or textbox",
                                                    "script_args": [False, False, "start", "a cat\n" * 100_000]}, 3),
    "prompt matrix 4 prompts": ("txt2img", {"script_name": "prompt matrix", "script_args": [], "prompt": "a|b|c"},
                                4),
    "loopback 3 loops": ("img2img", {"script_name": "loopback", "script_args": [3], "init_images": [INIT]}, 3),
    "loopback 2 loops x n_iter 2": ("img2img", {"script_name": "loopback", "script_args": [2], "n_iter": 2,
                                                "init_images": [INIT]}, 4),
}


@pytest.mark.parametrize("case", SCRIPTS)
def test_a_scripts_pictures_all_count_against_max_images(client, small_server, case: str) -> None:
    """Each cell / line / pass passed `--max-images` alone, so a script drew cells x the limit (6 lines x
    batch_size 2 drew 12 pictures on a server of 2); now all of them count, and nothing is drawn."""
    route, fields, pictures = SCRIPTS[case]
    jobs = len(client.get("/api/jobs", params={"limit": 1000}).json()["jobs"])
    answer = client.post(f"/sdapi/v1/{route}", json={**BASE, **fields})
    assert answer.status_code == 400, answer.text
    assert "at most 2 images per request on this server (--max-images), got " in answer.text
    if "100,000" not in case:
        assert f"got {pictures} from the script's" in answer.text
    assert len(client.get("/api/jobs", params={"limit": 1000}).json()["jobs"]) == jobs


def test_a_script_within_max_images_draws(client) -> None:
    answer = client.post("/sdapi/v1/txt2img", json={**BASE, "script_name": "prompts from file or textbox",
                                                    "script_args": [False, False, "start", "a\n\nb\n"]})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 2


@pytest.mark.parametrize("text", ["a\nb", "a\r\nb\rc\n", "\n\n a \x0b\x0cb\x1c\x1d\x1e\x85c\u2028d\u2029e\r\n\r",
                                  "--prompt x --steps 3\n\n--prompt y", ""])
def test_read_lines_reads_as_splitlines_and_stops_after_most(text: str) -> None:
    """Lines are read one at a time (a 50 MB textbox is not split whole) exactly as A1111's `splitlines()`."""
    expected = [(number, raw.strip()) for number, raw in enumerate(text.splitlines(), 1) if raw.strip()]
    assert [(line.number, line.text) for line in read_lines(text)] == expected
    for most in range(len(expected) + 1):
        assert [(line.number, line.text) for line in read_lines(text, most=most)] == expected[:most]


def test_the_options_kept_are_bounded(client) -> None:
    """`POST options` and `override_settings` (kept with `override_settings_restore_afterwards: false`) stored any
    key of any size for good (six 40 MB keys: +240 MiB of server memory). What is kept stays within 1 MiB of
    JSON: past it a 422, nothing set, nothing queued; small unknown keys are still kept and echoed."""
    options = "/sdapi/v1/options"
    assert client.post(options, json={"a_client_setting": [1, 2]}).status_code == 200
    assert client.get(options).json()["a_client_setting"] == [1, 2]
    refused = client.post(options, json={"big": "x" * (2 << 20), "CLIP_stop_at_last_layers": 2})
    assert refused.status_code == 422 and "this server keeps at most 1048576" in refused.text, refused.text
    kept = client.get(options).json()
    assert "big" not in kept and kept["CLIP_stop_at_last_layers"] == 1
    for n in range(3):
        assert client.post(options, json={f"part{n}": "x" * (300 << 10)}).status_code == 200
    assert client.post(options, json={"part3": "x" * (300 << 10)}).status_code == 422
    jobs = len(client.get("/api/jobs", params={"limit": 1000}).json()["jobs"])
    refused = client.post("/sdapi/v1/txt2img", json={**BASE, "override_settings": {"part3": "x" * (300 << 10)},
                                                     "override_settings_restore_afterwards": False})
    assert refused.status_code == 422 and "override_settings: the options set would hold" in refused.text, refused.text
    assert len(client.get("/api/jobs", params={"limit": 1000}).json()["jobs"]) == jobs
    assert "part3" not in client.get(options).json()


def test_a_model_switch_is_measured_without_the_model_near_the_options_cap(client) -> None:
    """`sd_model_checkpoint` is never stored, but its text was counted: with the options kept 10 bytes under the
    cap, a model switch was a 422 (`the options set would hold 1048614 bytes`), an unknown model too instead of
    its own error; kept `override_settings` naming the model alike."""
    options = "/sdapi/v1/options"
    probe = "x" * (1 << 20)
    refused = client.post(options, json={"near_cap": probe})
    held = int(refused.json()["detail"].split("would hold ")[1].split(" bytes")[0])
    assert client.post(options, json={"near_cap": probe[:len(probe) - (held - (1 << 20)) - 10]}).status_code == 200
    try:
        model = client.get(options).json()["sd_model_checkpoint"]
        switched = client.post(options, json={"sd_model_checkpoint": model})
        assert switched.status_code == 200, switched.text
        unknown = client.post(options, json={"sd_model_checkpoint": "no such model"})
        assert unknown.status_code != 200 and "keeps at most" not in unknown.text, unknown.text
        kept = client.post("/sdapi/v1/txt2img", json={**BASE, "steps": 1, "override_settings": {
            "sd_model_checkpoint": model}, "override_settings_restore_afterwards": False})
        assert kept.status_code == 200, kept.text
        assert client.post(options, json={"near_cap_2": "x" * 20}).status_code == 422    # the cap still holds
    finally:
        client.post(options, json={"near_cap": ""})


def test_extras_batch_pictures_count_against_max_images_before_any_is_decoded(client) -> None:
    """`extra-batch-images` upscaled any number of pictures (400 on a `--max-images 2` server, each to 4 x
    `--max-pixels`, the answer built whole in memory). Past `--max-images`: a 400 before any is decoded."""
    route = "/sdapi/v1/extra-batch-images"
    refused = client.post(route, json={"upscaler_1": "Lanczos", "imageList": [
        {"data": "not a picture", "name": str(n)} for n in range(3)]})
    assert refused.status_code == 400 and "at most 2 images per request" in refused.text, refused.text
    assert "got 3 in imageList" in refused.text
    drawn = client.post(route, json={"upscaler_1": "Lanczos", "imageList": [{"data": INIT, "name": str(n)}
                                                                            for n in range(2)]})
    assert drawn.status_code == 200 and len(drawn.json()["images"]) == 2, drawn.text


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixel data (69 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _png_with_parameters(text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


PICTURE_ROUTES = {                      # route -> the body sending the picture `b64`
    "/sdapi/v1/png-info": lambda b64: {"image": b64},
    "/api/parameters": lambda b64: {"image": b64},
    "/sdapi/v1/img2img": lambda b64: {**BASE, "init_images": [b64]},
    "/sdapi/v1/extra-single-image": lambda b64: {"image": b64, "upscaler_1": "None"},
    "/controlnet/detect": lambda b64: {"controlnet_module": "canny", "controlnet_input_images": [b64]},
}


@pytest.mark.parametrize("side", [5000, 20_000, 65_535, 100_000])
@pytest.mark.parametrize("route", PICTURE_ROUTES)
def test_a_picture_past_the_pixel_limit_is_a_413_on_every_route(client, route: str, side: int) -> None:
    """Past Pillow's bomb limit (about 179 Mpx) the header never reached the size check: img2img, Extras and
    ControlNet answered 400 "could be decompression bomb", png-info and /api/parameters a garbled 400 "expected str,
    bytes or os.PathLike object, not BytesIO"."""
    answer = client.post(route, json=PICTURE_ROUTES[route](base64.b64encode(_png_header(side, side)).decode()))
    assert answer.status_code == 413, answer.text
    assert "limit" in answer.text and "PathLike" not in answer.text


@pytest.mark.parametrize("raw", [b"B", b"ab", b"BM\x00"])
def test_a_picture_of_under_4_bytes_is_not_a_picture_file(client, raw: bytes) -> None:
    """Pillow's BMP / DIB `accept` raises struct.error on fewer than 4 bytes (Image.open tries the next format);
    Extras answered 400 "not a readable image: unpack_from requires a buffer of at least 4 bytes"."""
    answer = client.post("/sdapi/v1/extra-single-image",
                         json=PICTURE_ROUTES["/sdapi/v1/extra-single-image"](base64.b64encode(raw).decode()))
    assert answer.status_code == 400, answer.text
    assert "image is not a readable image: not a picture file Pillow knows" in answer.text, answer.text


@pytest.mark.parametrize("route", ["/sdapi/v1/png-info", "/api/parameters"])
def test_a_parameters_text_past_the_limit_is_a_422_that_says_so(client, route: str) -> None:
    picture = base64.b64encode(_png_with_parameters("a" * 70_000)).decode()
    answer = client.post(route, json={"image": picture})
    assert answer.status_code == 422, answer.text
    assert "the parameters text of the picture is 70000 characters long; the limit is 65536" in answer.text


def test_read_parameters_names_a_picture_in_memory() -> None:
    """`read_parameters(io.BytesIO(...))`, as the server calls it, raised TypeError from os.fspath in its message."""
    with pytest.raises(ParametersError, match="^the parameters text of the picture is 70000 characters long"):
        read_parameters(io.BytesIO(_png_with_parameters("a" * 70_000)))
    with pytest.raises(ImageTooLargeError, match="^the picture is too large to open safely"):
        with open_image(io.BytesIO(_png_header(100_000, 100_000))):
            pass


REGIONAL = " AND ".join(["two people in a park"] + [f"cell {row} {col}" for row in range(6) for col in range(6)])
"""A 6x6 latent-couple prompt with its base prompt: 37 AND parts."""


def _work_checked(prompt: str, limits: Limits, **fields) -> None:
    check_request(GenerationRequest(prompt=prompt, seed=1, **fields), limits)


def test_a_regional_prompt_of_37_and_parts_is_drawn_at_a_normal_size(client) -> None:
    """A1111 has no limit on AND parts; a cap of 32 refused a 6x6 latent couple with its base (37 parts) in
    every path, the command line's and `--from-png`'s too. At 512x512, 20 steps, its work is far within the
    default limits'; the server draws it."""
    _work_checked(REGIONAL, Limits(), width=512, height=512, steps=20)
    _work_checked(REGIONAL, Limits(), width=512, height=512, steps=20, batch_size=4, hr_scale=2.0)
    drawn = client.post("/sdapi/v1/txt2img", json={**BASE, "steps": 1, "prompt": REGIONAL})
    assert drawn.status_code == 200, drawn.text


def test_the_work_of_and_parts_is_bounded_as_the_largest_plain_request_at_the_server() -> None:
    """The server bounds what the parts cost, not how many they are: each part and the negative is a U-Net call at
    every step, for each picture of the batch, at each pass's pixels. The largest request the limits allow with a
    one-part prompt (hires, `--max-steps` in each pass, `--max-batch`, `--max-pixels`) is 2 x 2 x steps x batch x
    pixels; 3 parts without hires reach it, 4 pass it (a 422, one line)."""
    limits = Limits(max_pixels=64 * 64, max_steps=4, max_batch=2)
    most = {"width": 64, "height": 64, "steps": 4, "batch_size": 2}
    _work_checked("a", limits, **most, hr_scale=1.0)
    _work_checked("a AND b AND c", limits, **most)
    _work_checked(" AND ".join("abcdefg"), limits, width=64, height=64, steps=1, batch_size=1)
    for prompt, fields in (("a AND b AND c AND d", most), ("a AND b", {**most, "hr_scale": 1.0}),
                           (REGIONAL, {**most, "steps": 1, "batch_size": 1})):
        with pytest.raises(BadRequest) as refused:
            _work_checked(prompt, limits, **fields)
        assert refused.value.status == 422 and "\n" not in str(refused.value)
        assert "U-Net work" in str(refused.value) and "times this server's limit" in str(refused.value)


def test_the_work_of_and_parts_is_bounded_over_all_the_batches_of_a_request() -> None:
    """The work bound held for one batch: 31 AND parts, batch_size 1, n_iter 100 at 150 steps and 2048² were
    taken, 8 times the work of the largest one-part request (hires, 100 pictures). Now all `batch_count` batches
    count, against `--max-images` pictures of that request; the refusal says how far past with one decimal,
    rounded up (1.0125 reads 1.1, not 1)."""
    limits = Limits(max_pixels=64 * 64, max_steps=4, max_batch=2, max_images=100)     # 2 x 2 x 4 x 100 x pixels
    most = {"seed": 1, "width": 64, "height": 64, "steps": 4, "batch_size": 1}
    for prompt, fields, fits, times in (("a", {"hr_scale": 1.0}, 100, None),            # the largest one-part
                                        ("a AND b AND c", {}, 100, None),               # 4 x 4 x 100
                                        ("a AND b AND c AND d", {}, 80, "1.1"),         # 5 x 4 x 81 = 1620
                                        ("a AND b", {"hr_scale": 1.0}, 66, "1.1"),      # 3 x 4 x 2 x 67
                                        (" AND ".join("abcdefg"), {}, 50, "1.1")):      # 8 x 4 x 51 = 1632
        request = GenerationRequest(prompt=prompt, **{**most, **fields})
        check_request(request, limits, batch_count=fits)
        if times is None:
            continue
        with pytest.raises(BadRequest) as refused:
            check_request(request, limits, batch_count=fits + 1)
        assert refused.value.status == 422 and "\n" not in str(refused.value)
        assert str(refused.value).startswith("the request's U-Net work"), str(refused.value)
        assert f"is {times} times" in str(refused.value) and "--max-images" in str(refused.value)


def test_an_img2img_requests_work_is_its_steps_at_its_strength() -> None:
    """img2img and inpaint run int(min(strength, 0.999) x steps) + 1 of their steps (A1111's `t_enc + 1`), not all
    of them: a low-strength img2img whose parts' work is within the bound was refused at its full steps."""
    limits = Limits(max_pixels=64 * 64, max_steps=10, max_batch=1, max_images=1)
    init = Image.new("RGB", (64, 64))
    fields = {"prompt": " AND ".join("abcdefgh"), "seed": 1, "width": 64, "height": 64, "steps": 10,
              "init_image": init, "img2img_convention": "a1111"}      # 9 conditionings vs 2 x 2 one-part
    check_request(GenerationRequest(**fields, strength=0.3), limits)        # 4 steps run: 36 <= 40
    with pytest.raises(BadRequest, match=r"U-Net work .* is 1\.8 times"):
        check_request(GenerationRequest(**fields, strength=0.75), limits)   # 8 steps run: 72 / 40


def test_a_many_part_prompt_at_the_largest_size_is_refused_before_it_is_drawn(client) -> None:
    """Before, 32 parts x 150 steps x 2 pictures x 2048² (hours of U-Net calls) were queued."""
    jobs = len(client.get("/api/jobs", params={"limit": 1000}).json()["jobs"])
    for field in ("prompt", "hr_prompt"):
        many = " AND ".join(["a red apple"] * 8)
        hires = {"enable_hr": True, "hr_scale": 1.0} if field == "hr_prompt" else {}
        answer = client.post("/sdapi/v1/txt2img", json={**BASE, "width": 2048, "height": 2048, "steps": 150,
                                                         "batch_size": 2, **hires, field: many})
        assert answer.status_code == 422 and "U-Net work (9 U-Net rows a step" in answer.text, answer.text
    assert len(client.get("/api/jobs", params={"limit": 1000}).json()["jobs"]) == jobs


def test_the_work_counts_the_rows_the_memory_estimate_counts() -> None:
    """A step's rows are `memory.unet_rows`' (the source the memory estimate uses) plus one per further AND part:
    PAG's perturbed row counts (3 parts + the negative reach the bound; with PAG, 5 rows, 1.3 times), and a CFG 1
    step runs no negative (4 parts fit)."""
    limits = Limits(max_pixels=64 * 64, max_steps=4, max_batch=2)
    most = {"width": 64, "height": 64, "steps": 4, "batch_size": 2}
    _work_checked("a AND b AND c", limits, **most)
    _work_checked("a AND b AND c AND d", limits, **most, cfg_scale=1.0)
    with pytest.raises(BadRequest, match=r"U-Net work \(5 U-Net rows a step.* is 1\.3 times") as refused:
        _work_checked("a AND b AND c", limits, **most, pag_scale=3.0)
    assert refused.value.status == 422 and "\n" not in str(refused.value)


def test_the_work_refusal_names_the_rows_that_counted() -> None:
    """The refusal named only AND parts, steps, pictures and pixels as what to lower, though PAG's row and an edit
    model's image pass count too: it lists the rows of a step and says how to drop PAG's and the image pass."""
    limits = Limits(max_pixels=64 * 64, max_steps=4, max_batch=2)
    most = {"width": 64, "height": 64, "steps": 4, "batch_size": 2}
    with pytest.raises(BadRequest) as refused:
        _work_checked("a AND b AND c", limits, **most, pag_scale=3.0)
    said = str(refused.value)
    assert "(5 U-Net rows a step: 3 prompt parts, the negative, PAG's extra row;" in said, said
    assert said.endswith("pixels; a PAG scale of 0 drops PAG's extra row"), said
    edit = tiny_bundle("sd1-edit", seed=4)
    picture = {"init_image": Image.new("RGB", (64, 64)), "strength": 1.0, "image_cfg_scale": 1.5}
    with pytest.raises(BadRequest) as refused:
        check_request(GenerationRequest(prompt="a AND b AND c", seed=1, **most, **picture), limits, model=edit,
                      memory=False)
    said = str(refused.value)
    assert "(5 U-Net rows a step: 3 prompt parts, the negative, the edit model's image pass;" in said, said
    assert said.endswith("pixels; an image CFG scale of 1 drops the edit model's image pass"), said
    with pytest.raises(BadRequest) as refused:
        _work_checked("a AND b AND c AND d", limits, **most)
    assert str(refused.value).endswith("use fewer AND parts, steps, pictures or pixels"), str(refused.value)
