"""sd-webui-freeu (ljleb/sd-webui-freeu, A1111's FreeU extension) against sdlab's FreeU under its convention.

The extension's own math and API parsing are transcribed below from the version of the extension with FreeU's
`version` (V1 / V2): lib_free_u/unet.py (`free_u_cat_hijack`, `get_backbone_scale`, `filter_skip`,
`ratio_to_region`, `get_schedule_ratio`) and lib_free_u/global_state.py (`StageInfo`, `State`,
`group_stage_infos`, `format_version`, `all_versions`), scripts/freeu.py (`FreeUScript.process`: a dict, or a bool
then the flat args) and its README's API section; the index this project reads the extension from names no commit
for these files, so the test names them by these functions. Its schedule is FreeU on every model call while the
step counter (one per CFG call, from 0) is below int(stop_ratio * steps), which the tests take as given.

- the U-Net: reduced SD1- and SDXL-shaped U-Nets (diffusers', same random weights) with the extension's
  `free_u_cat_hijack` at every output block (its channel counts 1280 / 640 / 320 taken as 4 / 2 / 1 x
  model_channels, what they are on every SD U-Net) equal sdlab's U-Net with `FreeU(convention="sd-webui-freeu")`
  within 1e-4, V1 and V2; the convention differs from ComfyUI's by the one channel it scales more;
- the A1111 API's `alwayson_scripts: {"FreeU": {"args": [...]}}` (server/alwayson.py) maps each form the
  extension takes onto the FreeU setting the transcribed `State` holds, and refuses what sdlab does not draw.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, List, Tuple, Union

import pytest
import torch
from server_fixtures import sdlab_server  # noqa: F401
from test_freeu import SHAPES, _control_residuals, _inputs, _reference, _sdlab, _with_comfy_patch, patched_and_plain

from sdlab.models.freeu import FreeU


# --- transcribed from ljleb/sd-webui-freeu lib_free_u/global_state.py (the version with `version`) ---
@dataclasses.dataclass
class StageInfo:
    backbone_factor: float = 1.0
    skip_factor: float = 1.0
    backbone_offset: float = 0.0
    backbone_width: float = 0.5
    skip_cutoff: float = 0.0
    skip_high_end_factor: float = 1.0


STAGE_INFO_ARGS_LEN = len(inspect.getfullargspec(StageInfo.__init__)[0]) - 1  # off by one because of self
STAGES_COUNT = 3
all_versions = {
    f"Version {version+1}": str(version+1)
    for version in range(2)
}
reversed_all_versions = {
    v: k
    for k, v in all_versions.items()
}


@dataclasses.dataclass
class State:
    enable: bool = True
    start_ratio: Union[float, int] = 0.0
    stop_ratio: Union[float, int] = 1.0
    transition_smoothness: float = 0.0
    version: str = "1"
    stage_infos: List[Any] = dataclasses.field(default_factory=lambda: [StageInfo() for _ in range(STAGES_COUNT)])

    def __post_init__(self):
        self.stage_infos = self.group_stage_infos()
        self.version = self.format_version()

    def group_stage_infos(self):
        res = []
        i = 0
        while i < len(self.stage_infos) and len(res) < STAGES_COUNT:
            if isinstance(self.stage_infos[i], StageInfo):
                res.append(self.stage_infos[i])
                i += 1
            elif isinstance(self.stage_infos[i], dict):
                res.append(StageInfo(**self.stage_infos[i]))
                i += 1
            else:
                next_i = i + STAGE_INFO_ARGS_LEN
                res.append(StageInfo(*self.stage_infos[i:next_i]))
                i = next_i

        for _ in range(STAGES_COUNT - len(res)):
            res.append(StageInfo())

        return res

    def format_version(self):
        if self.version not in reversed_all_versions:
            return all_versions.get(self.version, "1")

        return self.version
# --- end of global_state.py ---


# --- transcribed from ljleb/sd-webui-freeu lib_free_u/unet.py (the version with `version`); `dims_of_stages`
# stands for its literal [1280, 640, 320], the schedule ratio is 1 (FreeU on), `th.cat` is torch.cat ---
def free_u_cat(hs, state: State, dims_of_stages, dim=1):
    h, h_skip = hs
    dims = h.shape[1]
    try:
        index = dims_of_stages.index(dims)
        stage_info = state.stage_infos[index]
    except ValueError:
        stage_info = None

    if stage_info is not None:
        redion_begin, region_end, region_inverted = ratio_to_region(stage_info.backbone_width, stage_info.backbone_offset, dims)
        mask = torch.arange(dims)
        mask = (redion_begin <= mask) & (mask <= region_end)
        if region_inverted:
            mask = ~mask

        h[:, mask] *= get_backbone_scale(h, state, backbone_factor=stage_info.backbone_factor)
        h_skip = filter_skip(h_skip, threshold=stage_info.skip_cutoff, scale=stage_info.skip_factor,
                             scale_high=stage_info.skip_high_end_factor)

    return torch.cat([h, h_skip], dim=dim)


def get_backbone_scale(h, state: State, backbone_factor):
    if state.version == "1":
        return backbone_factor

    features_mean = h.mean(1, keepdim=True)
    batch_dims = h.shape[0]
    features_max, _ = torch.max(features_mean.view(batch_dims, -1), dim=-1, keepdim=True)
    features_min, _ = torch.min(features_mean.view(batch_dims, -1), dim=-1, keepdim=True)
    hidden_mean = (features_mean - features_min.unsqueeze(2).unsqueeze(3)) / (features_max - features_min).unsqueeze(2).unsqueeze(3)
    return 1 + (backbone_factor - 1) * hidden_mean


def filter_skip(x, threshold, scale, scale_high):
    if scale == 1 and scale_high == 1:
        return x

    x_freq = torch.fft.fftn(x.float(), dim=(-2, -1))
    x_freq = torch.fft.fftshift(x_freq, dim=(-2, -1))

    B, C, H, W = x_freq.shape
    mask = torch.full((B, C, H, W), float(scale_high), device=x.device)

    crow, ccol = H // 2, W // 2
    threshold_row = max(1, math.floor(crow * threshold))
    threshold_col = max(1, math.floor(ccol * threshold))
    mask[..., crow - threshold_row:crow + threshold_row, ccol - threshold_col:ccol + threshold_col] = scale
    x_freq *= mask

    x_freq = torch.fft.ifftshift(x_freq, dim=(-2, -1))
    x_filtered = torch.fft.ifftn(x_freq, dim=(-2, -1)).real.to(device=x.device, dtype=x.dtype)

    return x_filtered


def ratio_to_region(width: float, offset: float, n: int) -> Tuple[int, int, bool]:
    if width < 0:
        offset += width
        width = -width
    width = min(width, 1)

    if offset < 0:
        offset = 1 + offset - int(offset)
    offset = math.fmod(offset, 1.0)

    if width + offset <= 1:
        inverted = False
        start = offset * n
        end = (width + offset) * n
    else:
        inverted = True
        start = (width + offset - 1) * n
        end = offset * n

    return round(start), round(end), inverted
# --- end of unet.py ---


def process_args(args: list) -> State:
    """ljleb/sd-webui-freeu scripts/freeu.py `FreeUScript.process`'s reading of its args (commit
    01218304157d31d1952730548b90125424680abf), transcribed; `i` is that commit's STATE_ARGS_LEN - 1 (its `State`:
    enable, start_ratio, stop_ratio, transition_smoothness, stage_infos), the stages passed by name to the `State`
    above, which has `version` before them."""
    if isinstance(args[0], dict):
        return State(**args[0])
    elif isinstance(args[0], bool):
        i = 4
        return State(args[0], *[float(n) for n in args[1:i]], stage_infos=args[i:])
    raise TypeError(f"Unrecognized args sequence starting with type {type(args[0])}")


# the UI's values A1111 fills the args a request leaves out with (scripts/freeu.py `ui`: off, 0, 1, 0, then the
# first preset's stages, global_state.py `default_presets["SD1.4 Recommendations"]`: StageInfo(1.2, 0.9),
# StageInfo(1.4, 0.2), StageInfo(1, 1), each with StageInfo's other defaults)
UI_VALUES = [False, 0, 1, 0, *[v for b, s in ((1.2, 0.9), (1.4, 0.2), (1, 1)) for v in (b, s, 0.0, 0.5, 0.0, 1.0)]]


def _extension_patch(state: State, model_channels: int):
    """The extension's cat as a patch of (h, hsp) for test_freeu's hooks on diffusers' up-block resnets."""
    dims = [4 * model_channels, 2 * model_channels, model_channels]

    def patch(h, hsp, transformer_options):
        joined = free_u_cat([h, hsp], state, dims)
        return joined[:, : h.shape[1]], joined[:, h.shape[1]:]
    return patch


def _sdlab_setting(state: State) -> FreeU:
    first, second = state.stage_infos[:2]
    return FreeU(b1=first.backbone_factor, b2=second.backbone_factor, s1=first.skip_factor, s2=second.skip_factor,
                 version=int(state.version), convention="sd-webui-freeu")


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("version", ["1", "2"])
def test_the_unet_under_the_convention_matches_the_extensions_cat(shape, version):
    cfg = SHAPES[shape]
    reference = _reference(cfg)
    model = _sdlab(reference, cfg)
    x, t, context, y, added = _inputs(cfg, (8, 12))
    skips, middle = _control_residuals(reference, x, t, context, added)
    state = State(version=version, stage_infos=[{"backbone_factor": 1.3, "skip_factor": 0.9},
                                                {"backbone_factor": 1.4, "skip_factor": 0.2}])
    setting = _sdlab_setting(state)
    hooks = _with_comfy_patch(reference, _extension_patch(state, cfg.model_channels))
    expected, plain = patched_and_plain(reference, hooks, x, t, context, (skips, middle), added)
    with torch.no_grad():
        actual = model(x, t, context, y, control=(skips, middle), freeu=setting)
        comfyui = model(x, t, context, y, control=(skips, middle), freeu=dataclasses.replace(setting,
                                                                                             convention="comfyui"))
    assert (expected - plain).abs().max() > 0.05                     # FreeU changed the output
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert (comfyui - expected).abs().max() > 1e-3                   # the extra channel shows


def test_the_window_is_one_channel_more_than_half():
    """The extension's default window (offset 0, width 0.5) on C channels: 0..C/2 inclusive; sdlab's join scales
    exactly those under the convention, C/2 under ComfyUI's."""
    for channels in (1280, 640, 64, 10):
        begin, end, inverted = ratio_to_region(0.5, 0.0, channels)
        assert (begin, end, inverted) == (0, channels // 2, False)
        h = torch.ones(1, channels, 2, 2)
        joined = FreeU(b1=2.0, s1=1.0, version=1, convention="sd-webui-freeu").join(h, torch.zeros(1, 1, 2, 2), 1)
        assert int((joined[0, :channels, 0, 0] == 2).sum()) == end - begin + 1 == channels // 2 + 1


DRAWN = [
    # the README's example without its windows and cutoffs; enable true by default in the object
    [{"start_ratio": 0.0, "stop_ratio": 1.0, "transition_smoothness": 0.0, "stage_infos": [
        {"backbone_factor": 1.2, "skip_factor": 0.9}, {"backbone_factor": 1.4, "skip_factor": 0.2}]}],
    [{"enable": True, "version": "2", "stage_infos": [{"backbone_factor": 1.5, "skip_factor": 0.95},
                                                      {"backbone_factor": 1.6, "skip_factor": 0.2}]}],
    [{"version": "Version 2", "stage_infos": [{}, {"skip_factor": 0.3, "skip_cutoff": 0.0}]}],
    [{"version": 2, "stage_infos": [1.1, 0.8]}],                            # an int version: the extension's "1"
    [{"stage_infos": [1.3, 0.9, 0.0, 0.5, 0.0, 1.0, {"backbone_factor": 1.4}, {}]}],   # flat, then objects
    [{"stop_ratio": 30}],                                                   # a step number past the 20 steps
    [True],                                                                 # the UI's values for the rest
    [True, 0.0, 1.0, 0.0, 1.3, 0.9, 0.0, 0.5, 0.0, 1.0, 1.4, 0.2],
    [True, 0, 1, 0, 1.3, 0.9, 0, 0.5, 0, 1, 1.4, 0.2, 0, 0.5, 0, 1, 1, 1, 0, 0.5, 0, 1],
    [True, 0.0, 1.0, 0.0, 1.0, 1.0, 0.7, 0.1, 0.3, 1.0],                   # a neutral stage's window: no change
]


@pytest.mark.parametrize("args", DRAWN, ids=range(len(DRAWN)))
def test_the_a1111_args_map_onto_the_extensions_state(args):
    from sdlab.server.alwayson import alwayson_freeu

    full = args if isinstance(args[0], dict) else [*args, *UI_VALUES[len(args):]]      # A1111's init_script_args
    state = process_args(full)
    mapped = alwayson_freeu({"FreeU": {"args": args}}, steps=20, calls=20)
    assert mapped == {**_sdlab_fields(state), "convention": "sd-webui-freeu"}


def _sdlab_fields(state: State) -> dict[str, Any]:
    setting = _sdlab_setting(state)
    return {name: getattr(setting, name) for name in ("b1", "b2", "s1", "s2", "version")}


def test_what_is_off_is_no_freeu():
    from sdlab.server.alwayson import alwayson_freeu

    for args in ([], [False], [{"enable": False, "version": "2"}], [False, 0.5, 0.2, 3.0]):
        full = args if args and isinstance(args[0], dict) else [*args, *UI_VALUES[len(args):]]
        assert not process_args(full).enable
        assert alwayson_freeu({"freeu": {"args": args}}, steps=20) is None


@pytest.mark.parametrize("args, run, words", [
    ([{"stage_infos": [{"backbone_factor": 1.2, "backbone_offset": 0.25}]}], {}, "stage 1's backbone window"),
    ([{"stage_infos": [{}, {"backbone_factor": 1.2, "backbone_width": 0.75}]}], {}, "stage 2's backbone window"),
    ([{"stage_infos": [{"skip_factor": 0.9, "skip_cutoff": 0.3}]}], {}, "stage 1's skip_cutoff 0.3"),
    ([{"stage_infos": [{"skip_high_end_factor": 1.1}]}], {}, "stage 1's skip_high_end_factor 1.1"),
    ([{"stage_infos": [{}, {}, {"backbone_factor": 1.1}]}], {}, "stage 3's factors"),
    ([{"start_ratio": 0.2}], {}, "start_ratio 0.2 leaves the first model calls out"),
    ([{"stop_ratio": 0.8}], {}, "stop_ratio 0.8 leaves the last model calls out"),
    ([{"stop_ratio": 1}], {}, "stop_ratio 1 leaves the last model calls out"),     # an int: step 1
    ([{"transition_smoothness": 0.5}], {}, "transition_smoothness 0.5"),
    ([{}], {"calls": 39}, "more model calls than that (39, counting every step's), so its FreeU stops part-way"),
    ([{}], {"calls": math.inf}, "picks its number of model calls"),                         # DPM adaptive
    ([{"start_ratio": 0.05}], {}, "start_ratio 0.05 leaves the first model calls out"),     # int(0.05 x 20) = 1
    ([{"start_ratio": math.nan}], {}, "start_ratio must be a finite number, got nan"),
    ([True, math.nan], {}, "start_ratio must be a finite number, got nan"),
    ([{}], {"hires": True}, "hires fix"),
    ([{"stage_infos": [{"backbone_factor": "1.2"}]}], {}, "backbone_factor must be a number"),
    ([{"stage_infos": [{"backbone_scale": 1.2}]}], {}, "unknown field 'backbone_scale'"),
    ([{"enabled": True}], {}, "unknown field 'enabled'"),
    ([1, 0.0, 1.0], {}, "first arg must be true / false"),
    ([True, *[1.0] * 22], {}, "at most 22 args"),
    ([{"version": ["2"]}], {}, "version must be"),
    ([{"stage_infos": [{"backbone_factor": 11.0}]}], {}, "FreeU b1 must lie in [-10, 10]"),
])
def test_what_sdlab_does_not_draw_is_one_422_naming_it(args, run, words):
    from sdlab.server.alwayson import alwayson_freeu
    from sdlab.server.inputs import BadRequest

    with pytest.raises(BadRequest) as refused:
        alwayson_freeu({"FreeU": {"args": args}}, **{"steps": 20, **run})
    assert refused.value.status == 422 and words in refused.value.message, refused.value.message
    assert refused.value.message.startswith("alwayson_scripts.FreeU")


def test_the_a1111_route_draws_the_extensions_freeu_as_the_native_convention(sdlab_server):
    """POST /sdapi/v1/txt2img with sd-webui-freeu's args records FreeU's "sd-webui-freeu" convention, and the native
    job of the settings its picture records (/api/parameters) draws it pixel for pixel; the same job under ComfyUI's
    convention, or without FreeU, differs; a setting it does not draw is one 422 and no job."""
    import base64
    import json

    import httpx
    import numpy as np
    from server_fixtures import drawn_job, job_pixels, png_picture

    from sdlab.server.native import JobIn

    a1111 = {"prompt": "a freeu house", "steps": 3, "seed": 11, "width": 64, "height": 64, "sampler_name": "Euler",
             "scheduler": "Automatic"}
    setting = {"b1": 1.3, "b2": 1.6, "s1": 0.9, "s2": 0.2, "version": 2, "convention": "sd-webui-freeu"}
    with httpx.Client(base_url=sdlab_server.url, timeout=120) as client:
        answer = client.post("/sdapi/v1/txt2img", json={**a1111, "alwayson_scripts": {"FreeU": {"args": [{
            "version": "Version 2", "stage_infos": [{"backbone_factor": 1.3, "skip_factor": 0.9},
                                                    {"backbone_factor": 1.6, "skip_factor": 0.2}]}]}}})
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])["infotexts"][0]
        assert "freeu_enabled: True, freeu_b1: 1.3, freeu_b2: 1.6, freeu_s1: 0.9, freeu_s2: 0.2" in info
        assert "FreeU convention: sd-webui-freeu" in info
        drawn = np.asarray(png_picture(base64.b64decode(answer.json()["images"][0])).convert("RGB"), dtype=np.int16)
        read = client.post("/api/parameters", json={"image": answer.json()["images"][0]}).json()["settings"]
        assert read["freeu"] == {**setting, "start": 0.0, "end": 1.0}
        body = {key: value for key, value in read.items()
                if value is not None and key in JobIn.model_fields and key != "model"}
        same = job_pixels(client, drawn_job(client, body))
        comfyui = job_pixels(client, drawn_job(client, {**body, "freeu": {**setting, "convention": "comfyui"}}))
        plain = job_pixels(client, drawn_job(client, {key: value for key, value in body.items() if key != "freeu"}))
        assert np.array_equal(drawn, same)
        assert np.abs(drawn - comfyui).max() > 0 and np.abs(drawn - plain).max() > 4
        jobs = len(client.get("/api/jobs").json()["jobs"])
        refused = client.post("/sdapi/v1/txt2img", json={**a1111, "sampler_name": "Heun",
                                                         "alwayson_scripts": {"FreeU": {"args": [True]}}})
        assert refused.status_code == 422 and "more model calls than that (5," in refused.text, refused.text
        plms = client.post("/sdapi/v1/txt2img", json={**a1111, "sampler_name": "PLMS",      # 3 steps: 4 timesteps
                                                      "alwayson_scripts": {"FreeU": {"args": [True]}}})
        assert plms.status_code == 422 and "more model calls than that (4," in plms.text, plms.text
        both = client.post("/sdapi/v1/txt2img", json={**a1111, "alwayson_scripts": {
            "FreeU": {"args": [True]}, "FreeU Integrated": {"args": [True]}}})
        assert both.status_code == 422 and "two FreeU scripts" in both.text, both.text
        assert len(client.get("/api/jobs").json()["jobs"]) == jobs


def test_the_command_line_draws_records_and_redraws_the_convention(tmp_path, capsys):
    """`--freeu-convention sd-webui-freeu` draws as the Python API's FreeU(convention="sd-webui-freeu"), records
    `FreeU convention: sd-webui-freeu`, and --from-png draws the picture again."""
    import numpy as np
    from cli_helpers import assert_from_png_redraws, draw_with_and_without, pixels

    from sdlab.pipeline.png_info import parse_parameters, read_parameters

    draws = draw_with_and_without(tmp_path, capsys, ["--freeu", "1.3,1.6,0.9,0.2", "--freeu-version", "1",
                                                     "--freeu-convention", "sd-webui-freeu"], steps=2)
    assert parse_parameters(read_parameters(draws.drawn))["FreeU convention"] == "sd-webui-freeu"
    import sdlab
    python = tmp_path / "python.png"
    sdlab.load(draws.model).txt2img("a wall", steps=2, width=32, height=32, seed=3, freeu=FreeU(
        1.3, 1.6, 0.9, 0.2, version=1, convention="sd-webui-freeu")).images[0].save(python)
    assert np.array_equal(pixels(python), pixels(draws.drawn))
    assert np.abs(pixels(draws.drawn) - pixels(draws.plain)).max() > 8
    assert_from_png_redraws(draws, "--no-freeu", tmp_path, capsys)


def test_an_xyz_freeu_axis_writes_the_extensions_own_args_back():
    """With sd-webui-freeu's script in the request, the X/Y/Z plot's FreeU axes (sd-webui-freeu's own names) change
    that script's setting: a cell's FreeU is written back as its object, which reads as the cell's setting, and no
    Forge FreeU key is added (two FreeU scripts would be a 422)."""
    from sdlab.server.a1111_scripts import alwayson_args, alwayson_base
    from sdlab.server.alwayson import alwayson_freeu

    scripts = {"freeu": {"args": [True]}}
    base = alwayson_base(scripts)["freeu"]
    assert base == FreeU(1.2, 1.4, 0.9, 0.2, version=1, convention="sd-webui-freeu")
    cell = dataclasses.replace(base, b1=1.5, s2=0.3)
    written = alwayson_args(scripts, {"freeu": cell})
    assert list(written) == ["freeu"]
    assert alwayson_freeu(written, steps=20) == {"b1": 1.5, "b2": 1.4, "s1": 0.9, "s2": 0.3, "version": 1,
                                                 "convention": "sd-webui-freeu"}
    assert alwayson_freeu(alwayson_args(scripts, {"freeu": None}), steps=20) is None


HUGE = 10 ** 400         # a JSON integer past a float's range


@pytest.mark.parametrize("scripts, words", [
    ({"FreeU": {"args": [True, HUGE]}}, "FreeU: start_ratio must be a finite number"),
    ({"FreeU": {"args": [{"stop_ratio": HUGE}]}}, "FreeU: stop_ratio must be a finite number"),
    ({"FreeU": {"args": [{"stage_infos": [HUGE]}]}}, "stage_infos[0]: backbone_factor must be a finite number"),
    ({"FreeU": {"args": [{"stage_infos": [{"backbone_factor": 1.2, "backbone_offset": HUGE}]}]}},
     "stage_infos[0]: backbone_offset must be a finite number"),
    ({"FreeU Integrated (SD 1.x, SD 2.x, SDXL)": {"args": [True, HUGE]}}, "FreeU b1 must be a finite number"),
])
def test_an_integer_past_a_floats_range_is_one_422(scripts, words):
    from sdlab.server.alwayson import alwayson_freeu
    from sdlab.server.inputs import BadRequest

    with pytest.raises(BadRequest) as refused:
        alwayson_freeu(scripts, steps=20)
    assert refused.value.status == 422 and words in refused.value.message, refused.value.message


def test_a_start_before_the_first_step_starts_at_the_first_call():
    """The extension starts at call int(start_ratio x steps): 0 for any start_ratio below 1 / steps."""
    from sdlab.server.alwayson import alwayson_freeu

    for start in (0.01, 0.049, 0):
        assert alwayson_freeu({"FreeU": {"args": [{"start_ratio": start}]}}, steps=20) is not None
        assert alwayson_freeu({"FreeU": {"args": [True, start]}}, steps=20) is not None


def test_the_positional_layout_with_version_reads_it_at_the_fifth_arg():
    """The newest layout, [enable, start, stop, smoothness, version, *stages] (a string at args[4]), and the
    earlier one, [enable, start, stop, smoothness, *stages], draw the same stages; the version only from the first."""
    from sdlab.server.alwayson import alwayson_freeu

    stages = [1.5, 0.95, 0, 0.5, 0, 1, 1.6, 0.2]
    for version, drawn in (("Version 2", 2), ("2", 2), ("1", 1), ("Version 1", 1)):
        assert alwayson_freeu({"FreeU": {"args": [True, 0, 1, 0, version, *stages]}}, steps=20) == {
            "b1": 1.5, "b2": 1.6, "s1": 0.95, "s2": 0.2, "version": drawn, "convention": "sd-webui-freeu"}
    assert alwayson_freeu({"FreeU": {"args": [True, 0, 1, 0, *stages]}}, steps=20) == {
        "b1": 1.5, "b2": 1.6, "s1": 0.95, "s2": 0.2, "version": 1, "convention": "sd-webui-freeu"}
    assert alwayson_freeu({"FreeU": {"args": [True, 0, 1, 0, "Version 2"]}}, steps=20)["b1"] == 1.2   # UI's preset


@pytest.mark.parametrize("sampler, steps, img2img", [
    ("Euler", 6, False), ("Euler", 7, True), ("PLMS", 6, False), ("PLMS", 20, False), ("PLMS", 7, True),
    ("DDIM", 20, False), ("DDIM", 6, True), ("UniPC", 6, False), ("DPM fast", 6, False), ("DPM fast", 6, True),
    *((sampler, steps, img2img) for sampler in ("Heun", "DPM2", "DPM2 a", "DPM++ SDE", "DPM++ 2S a", "Restart")
      for steps, img2img in ((1, False), (3, False), (5, True))),        # the last step, to sigma 0: one call
])
def test_the_model_calls_counted_ahead_are_the_runs(sampler, steps, img2img, tiny_pipe):
    """`plan.a1111_model_calls` (what the A1111 route checks sd-webui-freeu's schedule by) == the U-Net calls the
    run makes, on A1111's timesteps for its timestep samplers (PLMS 6 steps: 7 timesteps, 7 calls)."""
    from PIL import Image

    from sdlab.diffusion.samplers import get_sampler
    from sdlab.pipeline.plan import a1111_model_calls
    from sdlab.pipeline.request import GenerationRequest

    pipe, calls = tiny_pipe
    schedule = "ddim_uniform" if sampler in ("PLMS", "DDIM", "UniPC") else None
    options = {"steps": steps, "width": 32, "height": 32, "seed": 1, "sampler": sampler, "schedule": schedule}
    if img2img:
        options.update(init_image=Image.new("RGB", (32, 32), (120, 80, 40)), strength=0.6, img2img_convention="a1111")
    calls.clear()
    pipe.run(GenerationRequest(prompt="a house", **options))
    assert len(calls) == a1111_model_calls(get_sampler(sampler), GenerationRequest(prompt="a house", **options),
                                           img2img)


@pytest.fixture(scope="module")
def tiny_pipe():
    import sdlab
    from sdlab.api import SHIPPED_MODEL

    pipe = sdlab.load(SHIPPED_MODEL)
    calls: list[int] = []
    forward = pipe.bundle.unet.forward
    pipe.bundle.unet.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    return pipe, calls


def test_adaptive_steps_are_uncounted():
    from sdlab.diffusion.samplers import get_sampler
    from sdlab.pipeline.plan import a1111_model_calls
    from sdlab.pipeline.request import GenerationRequest

    assert a1111_model_calls(get_sampler("DPM adaptive"), GenerationRequest(prompt="a", steps=20), False) == math.inf


DISABLED_WITH_VALUES = [
    ({"FreeU": {"args": [False, 0, 1, 0, 1.5, 0.95, 0, 0.5, 0, 1, 1.6, 0.2]}}, 1),
    ({"FreeU": {"args": [{"enable": False, "version": "2", "stage_infos": [
        {"backbone_factor": 1.5, "skip_factor": 0.95}, {"backbone_factor": 1.6, "skip_factor": 0.2}]}]}}, 2),
]


@pytest.mark.parametrize("scripts, version", DISABLED_WITH_VALUES)
def test_xyz_enabled_draws_the_disabled_scripts_own_stages(scripts, version):
    """X/Y/Z on a request whose sd-webui-freeu script is off with its own stages (what its UI sends): a
    [FreeU] Enabled True cell draws those stages and version (the extension's axis sets `enable` on the state its
    args hold), a Stage 1 Backbone Scale cell only sets the factor and FreeU stays off."""
    from sdlab.pipeline.grid import field_named
    from sdlab.server.a1111_scripts import alwayson_args, alwayson_base
    from sdlab.server.alwayson import alwayson_freeu

    base = alwayson_base(scripts)
    own = {"b1": 1.5, "b2": 1.6, "s1": 0.95, "s2": 0.2, "version": version, "convention": "sd-webui-freeu"}
    enabled = field_named("[FreeU] Enabled").set(dict(base), True, (False, True))
    assert alwayson_freeu(alwayson_args(scripts, {"freeu": enabled["freeu"]}), steps=20) == own
    scaled = field_named("[FreeU] Stage 1 Backbone Scale").set(dict(base), 1.7, (1.7,))
    assert scaled["freeu"] is None
    then_enabled = field_named("[FreeU] Enabled").set(scaled, True, (True,))
    assert alwayson_freeu(alwayson_args(scripts, {"freeu": then_enabled["freeu"]}), steps=20) == {**own, "b1": 1.7}
    off = field_named("[FreeU] Enabled").set(dict(base), False, (False,))
    assert off["freeu"] is None


def test_xyz_enabled_on_a_disabled_script_sdlab_does_not_draw_is_the_cells_error():
    from sdlab.pipeline.grid import GridError, field_named
    from sdlab.server.a1111_scripts import alwayson_base

    base = alwayson_base({"FreeU": {"args": [{"enable": False, "stage_infos": [{"skip_high_end_factor": 1.1}]}]}})
    with pytest.raises(GridError, match="skip_high_end_factor 1.1"):
        field_named("[FreeU] Enabled").set(dict(base), True, (True,))
