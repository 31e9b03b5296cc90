"""A1111's selectable scripts on /sdapi/v1 (modules/api/api.py `get_selectable_script`: the script whose title is
`script_name` in any case, `script_name_to_index` answering `HTTPException(422, "Script '<name>' not found")`
for another; `get_scripts_list`: the lower-case titles) and its X/Y/Z plot (scripts/xyz_grid.py of A1111 1.10:
`script_args` in `Script.run`'s order, x_type / y_type / z_type indexes into `axis_options` as `Script.ui`
filters them for the tab). Each cell must be exactly the picture of a single request with the cell's fields."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from sdlab.pipeline.grid import Plot, parse_axis
from sdlab.pipeline.png_info import parse_parameters, read_parameters
from sdlab.server.a1111_scripts import BODY_FIELDS, OPTION_FIELDS, axis_types, sdlab_field
from server_fixtures import b64_png, picture, sdlab_server  # noqa: F401  (sdlab_server: a session fixture)

# AUTOMATIC1111/stable-diffusion-webui v1.10.1, scripts/xyz_grid.py `axis_options`, transcribed: (class, label)
# ("" AxisOption, "t" AxisOptionTxt2Img, "i" AxisOptionImg2Img). `Script.ui`: `self.current_axis_options = [x for x
# in axis_options if type(x) == AxisOption or x.is_img2img == is_img2img]`.
A1111_AXIS_OPTIONS = [
    ("", "Nothing"), ("", "Seed"), ("", "Var. seed"), ("", "Var. strength"), ("", "Steps"), ("t", "Hires steps"),
    ("", "CFG Scale"), ("i", "Image CFG Scale"), ("", "Prompt S/R"), ("", "Prompt order"), ("t", "Sampler"),
    ("t", "Hires sampler"), ("i", "Sampler"), ("", "Checkpoint name"), ("", "Negative Guidance minimum sigma"),
    ("", "Sigma Churn"), ("", "Sigma min"), ("", "Sigma max"), ("", "Sigma noise"), ("", "Schedule type"),
    ("", "Schedule min sigma"), ("", "Schedule max sigma"), ("", "Schedule rho"), ("", "Beta schedule alpha"),
    ("", "Beta schedule beta"), ("", "Eta"), ("", "Clip skip"), ("", "Denoising"), ("", "Initial noise multiplier"),
    ("", "Extra noise"), ("t", "Hires upscaler"), ("i", "Cond. Image Mask Weight"), ("", "VAE"), ("", "Styles"),
    ("", "UniPC Order"), ("", "Face restore"), ("", "Token merging ratio"), ("", "Token merging ratio high-res"),
    ("", "Always discard next-to-last sigma"), ("", "SGM noise multiplier"), ("", "Refiner checkpoint"),
    ("", "Refiner switch at"), ("", "RNG source"), ("", "FP8 mode"), ("", "Size"),
]
# ... then the axes sdlab adds as an extension would (`axis_options.extend`): ljleb/sd-webui-freeu
# lib_free_u/xyz_grid.py's names for the FreeU factors it draws, sdlab's own for FreeU's window and the PAG scale
EXTENSION_AXIS_OPTIONS = [
    ("", "[FreeU] Enabled"), ("", "[FreeU] Stage 1 Backbone Scale"), ("", "[FreeU] Stage 1 Skip Scale"),
    ("", "[FreeU] Stage 2 Backbone Scale"), ("", "[FreeU] Stage 2 Skip Scale"), ("", "FreeU start"),
    ("", "FreeU end"), ("", "PAG scale"),
]
# A1111's axis -> the sdlab grid field it is (None: one sdlab does not draw)
SDLAB_AXES = {
    "Nothing": "nothing", "Seed": "seed", "Var. seed": "subseed", "Var. strength": "subseed_strength",
    "Steps": "steps", "Hires steps": "hr_steps", "CFG Scale": "cfg_scale", "Image CFG Scale": "image_cfg_scale",
    "Prompt S/R": "prompt",
    "Prompt order": "prompt_order", "Sampler": "sampler", "Hires sampler": "hr_sampler",
    "Negative Guidance minimum sigma": "s_min_uncond", "Sigma Churn": "s_churn", "Sigma min": "s_tmin",
    "Sigma max": "s_tmax", "Sigma noise": "s_noise", "Schedule type": "schedule",
    "Schedule min sigma": "schedule_sigma_min", "Schedule max sigma": "schedule_sigma_max",
    "Schedule rho": "schedule_rho", "Eta": "eta", "Clip skip": "clip_skip", "Denoising": "strength",
    "Initial noise multiplier": "noise_multiplier", "Extra noise": "extra_noise", "Hires upscaler": "hr_upscaler",
    "Cond. Image Mask Weight": "inpainting_mask_weight", "UniPC Order": "unipc_order",
    "Token merging ratio": "token_merging_ratio", "Token merging ratio high-res": "token_merging_ratio_hr",
    "Styles": "styles",
    "Always discard next-to-last sigma": "discard_penultimate_sigma", "SGM noise multiplier": "sgm_noise_multiplier",
    "RNG source": "rng", "Checkpoint name": "checkpoint", "VAE": "vae", "Refiner checkpoint": "refiner",
    "Refiner switch at": "refiner_switch", "Size": "size",
    "[FreeU] Enabled": "freeu_enabled", "[FreeU] Stage 1 Backbone Scale": "freeu_b1",
    "[FreeU] Stage 1 Skip Scale": "freeu_s1", "[FreeU] Stage 2 Backbone Scale": "freeu_b2",
    "[FreeU] Stage 2 Skip Scale": "freeu_s2", "FreeU start": "freeu_start", "FreeU end": "freeu_end",
    "PAG scale": "pag_scale",
}
XYZ_ARGS = ["x_type", "x_values", "x_values_dropdown", "y_type", "y_values", "y_values_dropdown", "z_type",
            "z_values", "z_values_dropdown", "draw_legend", "include_lone_images", "include_sub_grids",
            "no_fixed_seeds", "vary_seeds_x", "vary_seeds_y", "vary_seeds_z", "margin_size", "csv_mode"]
BASE = {"prompt": "a red apple", "negative_prompt": "blurry", "steps": 2, "seed": 7, "cfg_scale": 5.0,
        "sampler_name": "Euler"}


def a1111_indexes(mode: str) -> list[str]:
    tag = "i" if mode == "img2img" else "t"
    return [label for kind, label in A1111_AXIS_OPTIONS + EXTENSION_AXIS_OPTIONS if kind in ("", tag)]


def xyz_args(**given) -> list:
    """`script_args` in A1111 1.10's order, its UI defaults where not given."""
    defaults = {"x_type": 1, "x_values": "", "x_values_dropdown": [], "y_type": 0, "y_values": "",
                "y_values_dropdown": [], "z_type": 0, "z_values": "", "z_values_dropdown": [], "draw_legend": True,
                "include_lone_images": False, "include_sub_grids": False, "no_fixed_seeds": False,
                "vary_seeds_x": False, "vary_seeds_y": False, "vary_seeds_z": False, "margin_size": 0,
                "csv_mode": False}
    return [given.get(name, defaults[name]) for name in XYZ_ARGS]


def index_of(label: str, mode: str = "txt2img") -> int:
    return a1111_indexes(mode).index(label)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(picture(b64))


@pytest.fixture
def client(sdlab_server):
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=300) as c:
        yield c


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_axis_indexes_are_a1111s_for_the_tab(mode: str) -> None:
    assert [axis.label for axis in axis_types(mode)] == a1111_indexes(mode)
    for axis in axis_types(mode):
        field = sdlab_field(axis)
        assert (field.name if field else None) == SDLAB_AXES.get(axis.label), axis.label


def test_every_axis_sdlab_draws_sets_an_a1111_field_or_option() -> None:
    """The request field of each axis sdlab draws goes where A1111's `apply_field` / `apply_override` put it."""
    set_fields = {*BODY_FIELDS, *OPTION_FIELDS, "nothing", "prompt_order", "size",     # Size: width and height
                  *(f"freeu_{name}" for name in ("enabled", "b1", "b2", "s1", "s2", "start", "end")),  # FreeU's
                  "pag_scale"}      # and PAG's always-on scripts' args (`alwayson_args`)
    assert set(SDLAB_AXES.values()) <= set_fields
    assert not set(BODY_FIELDS) & set(OPTION_FIELDS)


def test_scripts_and_script_info_list_the_x_y_z_plot(client) -> None:
    """A1111 lists `script.name`, the lower-case title of a script with UI controls (Comments has none; Hypertile's
    class names itself); sdlab the scripts it runs: the plot, A1111's always-on scripts, ControlNet's, Forge's FreeU
    Integrated."""
    always_on = ["refiner", "seed", "sampler", "Hypertile", "extra options"]
    selectable = ["prompt matrix", "prompts from file or textbox", "x/y/z plot"]
    img2img = ["loopback", "outpainting mk2", "poor man's outpainting", "prompt matrix", "prompts from file or textbox",
               "sd upscale", "x/y/z plot"]
    assert client.get("/scripts").json() == {
        "txt2img": [*selectable, *always_on, "controlnet", "freeu integrated (sd 1.x, sd 2.x, sdxl)",
                    "perturbedattentionguidance integrated"],
        "img2img": [*img2img, *always_on, "soft inpainting", "controlnet", "freeu integrated (sd 1.x, sd 2.x, sdxl)",
                    "perturbedattentionguidance integrated"]}
    infos = [info for info in client.get("/script-info").json() if info["name"] == "x/y/z plot"]
    assert [(i["name"], i["is_img2img"], i["is_alwayson"]) for i in infos] == [
        ("x/y/z plot", False, False), ("x/y/z plot", True, False)]
    for info, mode in zip(infos, ("txt2img", "img2img")):
        args = info["args"]
        assert len(args) == len(XYZ_ARGS)
        assert args[0]["label"] == "X type" and args[0]["value"] == "Seed" and args[0]["choices"] == a1111_indexes(mode)
        assert args[3]["value"] == "Nothing" and args[9] == {"label": "Draw legend", "value": True, "minimum": None,
                                                            "maximum": None, "step": None, "choices": None}
        assert args[16]["label"] == "Grid margins (px)" and (args[16]["minimum"], args[16]["maximum"]) == (0, 500)


def _single(client, route: str, **fields) -> dict:
    answer = client.post(f"/{route}", json={**BASE, **fields})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_each_cell_is_the_single_txt2img_request_and_the_answer_is_a1111s(client) -> None:
    """X Sampler (from the dropdown), Y Steps, Z Prompt S/R with seeds varied along X, sub-grids and cells: the
    cells (X fastest) are pixel-equal to single requests with those fields, the grid and sub-grids are the cells
    laid out by sdlab.pipeline.grid, and `info` is A1111's (grid, sub-grids, then every cell)."""
    args = xyz_args(x_type=index_of("Sampler"), x_values_dropdown=["Euler", "DPM++ 2M"],
                    y_type=index_of("Steps"), y_values="1,2", z_type=index_of("Prompt S/R"), z_values="apple, pear",
                    include_lone_images=True, include_sub_grids=True, vary_seeds_x=True)
    answer = client.post("/txt2img", json={**BASE, "script_name": "X/Y/Z Plot", "script_args": args})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    images, info = body["images"], json.loads(body["info"])
    assert len(images) == 1 + 2 + 8 and info["index_of_first_image"] == 1
    singles, cells = {}, {}
    for n, (k, j, i) in enumerate((k, j, i) for k in range(2) for j in range(2) for i in range(2)):
        single = _single(client, "txt2img", sampler_name=["Euler", "DPM++ 2M"][i], steps=[1, 2][j],
                         prompt=["a red apple", "a red pear"][k], seed=7 + i)
        singles[(i, j, k)] = single
        cells[(i, j, k)] = pixels(images[3 + n])
        assert np.array_equal(cells[(i, j, k)], pixels(single["images"][0])), (i, j, k)
        assert info["infotexts"][3 + n] == json.loads(single["info"])["infotexts"][0]
        assert info["all_seeds"][2 + n] == 7 + i and info["all_prompts"][2 + n] == single["parameters"]["prompt"]
    plot = Plot(parse_axis("sampler=Euler,DPM++ 2M"), parse_axis("steps=1,2"), parse_axis("prompt=apple, pear"))
    pictures = {index: Image.fromarray(cell) for index, cell in cells.items()}
    assert np.array_equal(pixels(images[0]), np.asarray(plot.sheet(pictures)))
    for k in range(2):
        assert np.array_equal(pixels(images[1 + k]), np.asarray(plot.grids(pictures)[k]))
    grid = read_parameters(io.BytesIO(base64.b64decode(images[0])))
    fields = parse_parameters(grid)
    assert grid == info["infotexts"][0]
    assert (fields["Script"], fields["X Type"], fields["X Values"], fields["Y Type"], fields["Z Type"],
            fields["Z Values"]) == ("X/Y/Z plot", "Sampler", "Euler,DPM++ 2M", "Steps", "Prompt S/R", "apple, pear")
    sub = parse_parameters(info["infotexts"][2])
    assert sub["Prompt"] == "a red pear" and "Z Type" not in sub and sub["Y Values"] == "1,2"
    assert body["parameters"]["script_args"] == args and body["parameters"]["seed"] == 7


def test_without_sub_images_the_answer_is_the_grid_with_every_cells_infotext(client) -> None:
    """A1111 keeps every cell's infotext and seed in `info` when it drops their pictures."""
    args = xyz_args(x_type=index_of("CFG Scale"), x_values="3-5 (+2)", draw_legend=False)
    answer = client.post("/txt2img", json={**BASE, "script_name": "x/y/z plot", "script_args": args}).json()
    info = json.loads(answer["info"])
    assert len(answer["images"]) == 1 and len(info["infotexts"]) == 3 and info["all_seeds"] == [7, 7]
    cells = [pixels(_single(client, "txt2img", cfg_scale=cfg)["images"][0]) for cfg in (3.0, 5.0)]
    assert np.array_equal(pixels(answer["images"][0]), np.concatenate(cells, axis=1))   # no legend: cells alone


def test_with_the_return_grid_option_off_each_cell_is_drawn_at_batch_size_1(client) -> None:
    """A1111 1.10's `Script.run`: `if not opts.return_grid: p.batch_size = 1` (its Show grid in gallery option, true
    by default): a batch of 2 asked, each cell is the single request at batch size 1 with the option off, and is
    drawn at batch size 2 with it on (the answer's `info` is the first cell's)."""
    args = xyz_args(x_type=index_of("CFG Scale"), x_values="3,5", include_lone_images=True)
    plot = {**BASE, "batch_size": 2, "script_name": "x/y/z plot", "script_args": args}
    assert client.post("/options", json={"return_grid": False}).status_code == 200
    try:
        off = client.post("/txt2img", json=plot)
    finally:
        assert client.post("/options", json={"return_grid": True}).status_code == 200
    on = client.post("/txt2img", json=plot)
    for answer, batch_size in ((off, 1), (on, 2)):
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        assert info["batch_size"] == batch_size and len(info["all_seeds"]) == 2
    for cfg, cell in zip((3.0, 5.0), off.json()["images"][1:]):
        single = _single(client, "txt2img", cfg_scale=cfg)
        assert np.array_equal(pixels(cell), pixels(single["images"][0]))
        assert read_parameters(io.BytesIO(base64.b64decode(cell))) == json.loads(single["info"])["infotexts"][0]


def test_options_axes_and_a_random_seed_drawn_once(client) -> None:
    """Clip skip (an `override_settings` option, as A1111 1.10's `apply_override`) over a seed of -1: one seed
    for every cell (A1111's `fix_seed`), each cell the single request with that seed and option."""
    args = xyz_args(x_type=index_of("Clip skip"), x_values="1,2", include_lone_images=True)
    answer = client.post("/txt2img", json={**BASE, "seed": -1, "script_name": "x/y/z plot",
                                           "script_args": args}).json()
    info = json.loads(answer["info"])
    seed = info["all_seeds"][0]
    assert info["all_seeds"] == [seed, seed] and seed != -1
    for skip, cell in zip((1, 2), answer["images"][1:]):
        single = _single(client, "txt2img", seed=seed, override_settings={"CLIP_stop_at_last_layers": skip})
        assert np.array_equal(pixels(cell), pixels(single["images"][0]))


def test_img2img_cells_are_single_img2img_requests(client) -> None:
    """In img2img the Denoising axis (its own index there) is the strength of each cell's img2img."""
    init = Image.fromarray(np.stack([np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))] * 3, axis=-1))
    init_b64 = b64_png(init)
    args = xyz_args(x_type=index_of("Denoising", "img2img"), x_values="0.5,0.9", include_lone_images=True)
    answer = client.post("/img2img", json={**BASE, "steps": 4, "init_images": [init_b64], "script_name": "x/y/z plot",
                                           "script_args": args})
    assert answer.status_code == 200, answer.text
    for strength, cell in zip((0.5, 0.9), answer.json()["images"][1:]):
        single = _single(client, "img2img", steps=4, init_images=[init_b64], denoising_strength=strength)
        assert np.array_equal(pixels(cell), pixels(single["images"][0]))


@pytest.mark.parametrize("args, message", [
    (xyz_args(x_type=index_of("Face restore"), x_values="a"), "x_type 32 is A1111's 'Face restore' axis"),
    (xyz_args(x_type=index_of("FP8 mode"), x_values="Enable"), "x_type 40 is A1111's 'FP8 mode' axis"),
    (xyz_args(x_values="1", y_type=60, y_values="1"), "y_type must be 0..49"),
    (xyz_args(x_type=index_of("Steps"), x_values="1,x"), "'x' is not an integer"),
    (xyz_args(x_type=index_of("Sampler"), x_values="Euler"), "x_values_dropdown (csv_mode false): no values"),
    (xyz_args(x_type=index_of("Prompt S/R"), x_values="banana,kiwi"), "Prompt S/R did not find 'banana'"),
    (xyz_args(x_type="1", x_values="1"), "x_type must be an integer"),
    (xyz_args() + [False], "at most 18 values"),
    (xyz_args(x_values="1", margin_size=-2), "margin_size must be 0..500"),
])
def test_what_the_plot_cannot_draw_is_a_422_before_anything_is_drawn(client, args, message) -> None:
    before = client.get("/progress").json()["state"]["job_count"]
    answer = client.post("/txt2img", json={**BASE, "script_name": "x/y/z plot", "script_args": args})
    assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    assert client.get("/progress").json()["state"]["job_count"] == before


def test_csv_mode_takes_a_choice_axis_from_the_text(client) -> None:
    args = xyz_args(x_type=index_of("Sampler"), x_values="Euler, Euler a", csv_mode=True, draw_legend=False)
    answer = client.post("/txt2img", json={**BASE, "script_name": "x/y/z plot", "script_args": args})
    assert answer.status_code == 200, answer.text
    fields = parse_parameters(json.loads(answer.json()["info"])["infotexts"][0])
    assert fields["X Values"] == "Euler, Euler a" and fields["Sampler"] == "Euler"


@pytest.mark.parametrize("route, name", [("txt2img", "no such script"), ("img2img", "no such script"),
                                         ("txt2img", "loopback"), ("txt2img", "x/y/z plot "), ("img2img", "x/y/z plot ")])
def test_a_script_it_does_not_list_is_a1111s_422(client, route: str, name: str) -> None:
    body = {"prompt": "a cat", "steps": 1, "script_name": name, "script_args": [4, "1,2", [], 6, "1,3", []]}
    if route == "img2img":
        body["init_images"] = ["not even a picture: the script is looked up first"]
    answer = client.post(f"/{route}", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"] == f"Script '{name}' not found"


@pytest.mark.parametrize("name", [None, ""])
def test_no_script_draws_the_picture(client, name) -> None:
    answer = client.post("/txt2img", json={"prompt": "a cat", "steps": 1, "seed": 1, "script_name": name,
                                          "script_args": []})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 1


def test_grid_margins_part_a_legended_grids_cells() -> None:
    """A1111's Grid margins (`draw_grid_annotations`): white px between the cells, with the legend only."""
    cells = {(i, j, 0): Image.new("RGB", (16, 8), (200, 10 * i, 10 * j)) for i in range(3) for j in range(2)}
    axes = parse_axis("steps=1,2,3"), parse_axis("cfg=4,5")
    plain, parted = Plot(*axes).sheet(cells), Plot(*axes, margin=6).sheet(cells)
    assert parted.size == (plain.width + 2 * 6, plain.height + 6)
    assert Plot(*axes, legend=False, margin=6).sheet(cells).size == (48, 16)
    right, bottom = parted.width, parted.height
    assert parted.getpixel((right - 1, bottom - 1)) == (200, 20, 10)          # cell (2, 1) at the bottom right
    assert parted.getpixel((right - 16 - 3, bottom - 1)) == (255, 255, 255)   # the margin left of it
