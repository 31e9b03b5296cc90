"""The Control Types' preprocessor lists (`GET /controlnet/control_types`, the web UI's Control Type radios) are
sd-webui-controlnet's current ones over sdlab's preprocessors: the types are the tags its preprocessors carry, a
type lists "none" and the preprocessors tagged with it in the extension's order, its default is the first after
"none", and "All" lists every one in that order. Before, sdlab matched words of the type in the preprocessors'
names (the extension's older rule) and kept the older type names (Scribble/Sketch, Tile/Blur, Instant_ID)."""

from __future__ import annotations

import httpx
import pytest

from server_fixtures import start_server
from test_webui import (  # noqa: F401  (fixture: browser)
    By, browser, open_page, severe_console_errors, wait,
)

from sdlab.pipeline.ip_adapter_units import FACE_ID_MODULES, LISTED_MODULES, MODULE_ENCODERS
from sdlab.pipeline.preprocess import PREPROCESSORS, a1111_module
from sdlab.server.a1111_controlnet import _control_type
from sdlab.server.control_types import CONTROL_TYPES, LISTED_PREPROCESSORS

# ---------------------------------------------------------------- the extension, transcribed
# Mikubill/sd-webui-controlnet:
#   scripts/supported_preprocessor.py (commit 01de1cb9028c1c3d6a799f2230d3ae06caa1fedb): `Preprocessor`'s
#     get_sorted_preprocessors, get_all_preprocessor_tags, get_filtered_preprocessors, get_default_preprocessor
#     (below, over the registry `REGISTRY`) and `tag_to_filters`;
#   scripts/global_state.py `select_control_type` (the sd_version form; the preprocessors part: the labels of
#     get_filtered_preprocessors, get_default_preprocessor's label; "all": get_sorted_preprocessors, "none") and
#     scripts/api.py `/controlnet/control_types` (one entry per get_all_preprocessor_tags);
#   the registry entries (name, label, tags, sorting_priority) of the preprocessors sdlab has:
#     scripts/preprocessor/model_free_preprocessors.py, inpaint.py, ip_adapter_auto.py
#     (commit 91a8ddeee2fe578112bf34908546ced372606126), legacy/preprocessor_compiled.py
#     (commit b64d0896aeb8c4daf07e50297afd008e260c1bd3; a legacy entry's key is its name, "priority" its
#     sorting_priority).
REGISTRY = [  # (name, label, tags, sorting_priority)
    ("none", "none", ["InstructP2P"], 10),                                          # PreprocessorNone
    ("canny", "canny", ["Canny"], 100),                                             # PreprocessorCanny
    ("invert", "invert (from white bg & black line)", ["Canny", "Lineart", "Scribble", "MLSD"], 20),
    ("inpaint", "inpaint_global_harmonious", ["Inpaint"], 0),                       # PreprocessorInpaint
    ("inpaint_only", "inpaint_only", ["Inpaint"], 100),                             # PreprocessorInpaintOnly
    ("ip-adapter-auto", "ip-adapter-auto", ["IP-Adapter"], 1000),                   # PreprocessorIPAdapterAuto
    ("ip-adapter_clip_sd15", "ip-adapter_clip_h", ["IP-Adapter"], 100),             # legacy
    ("ip-adapter_clip_sdxl", "ip-adapter_clip_g", ["IP-Adapter"], 0),               # legacy
    ("ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl_plus_vith", ["IP-Adapter"], 0),   # legacy
    ("ip-adapter_face_id", "ip-adapter_face_id", ["IP-Adapter"], 0),               # legacy (given its embedding)
    ("ip-adapter_face_id_plus", "ip-adapter_face_id_plus", ["IP-Adapter"], 0),     # legacy (given its embedding)
    ("threshold", "threshold", [], 0),                                              # legacy
    ("tile_resample", "tile_resample", ["Tile"], 100),                              # legacy
]
# The tags every preprocessor the extension registers carries, by file (the control types come from them).
TAGS_BY_FILE = {
    "model_free_preprocessors.py": ["InstructP2P", "Canny", "Lineart", "Scribble", "MLSD", "Tile", "SparseCtrl",
                                    "Shuffle"],
    "inpaint.py": ["Inpaint"], "lama_inpaint.py": ["Inpaint"], "ip_adapter_auto.py": ["IP-Adapter"],
    "pulid.py": ["IP-Adapter"], "normal_dsine.py": ["NormalMap"], "teed.py": ["SoftEdge"],
    "mobile_sam.py": ["Segmentation"],
    "legacy/preprocessor_compiled.py": ["OpenPose", "Depth", "Instant-ID", "IP-Adapter", "Lineart", "MLSD",
                                        "NormalMap", "Recolor", "Reference", "Revision", "Scribble", "SparseCtrl",
                                        "Segmentation", "SoftEdge", "T2I-Adapter", "Tile"],
}


def get_sorted_preprocessors(registry):
    none, *others = registry                                                    # "none" is registered first
    return [none] + sorted(others, key=lambda x: str(x[3]).zfill(8) + x[1], reverse=True)


def get_all_preprocessor_tags():
    tags = set()
    for carried in TAGS_BY_FILE.values():
        tags.update(carried)
    return ["All"] + sorted(tags)


def get_filtered_preprocessors(registry, tag):
    return [p for p in get_sorted_preprocessors(registry) if tag in p[2] or p[1] == "none"]


def get_default_preprocessor(registry, tag):
    ps = get_filtered_preprocessors(registry, tag)
    return ps[0] if len(ps) == 1 else ps[1]


def get_modules(registry, alias_names=False):
    # internal_controlnet/external_code.py get_modules (commit 01de1cb9, as scripts/api.py `/controlnet/module_list`
    # calls it, and get_modules_detail's keys): the sorted preprocessors' names, or labels with alias_names
    return [(p[1] if alias_names else p[0]) for p in get_sorted_preprocessors(registry)]


def extension_preprocessors(control_type: str, registry=REGISTRY) -> tuple[list[str], str]:
    if control_type.lower() == "all":
        return [p[1] for p in get_sorted_preprocessors(registry)], "none"
    return ([p[1] for p in get_filtered_preprocessors(registry, control_type)],
            get_default_preprocessor(registry, control_type)[1])


INVERT = "invert (from white bg & black line)"
# What the route serves, written out: the extension's values above, and sdlab's own scribble and tile (which the
# extension has not) under Scribble and Tile, last of their type (priority 0).
EXPECTED = {
    "All": (["none", "ip-adapter-auto", "tile_resample", "ip-adapter_clip_h", "inpaint_only", "canny", INVERT, "tile",
             "threshold", "scribble", "ip-adapter_face_id_plus", "ip-adapter_face_id", "ip-adapter_clip_sdxl_plus_vith",
             "ip-adapter_clip_g", "inpaint_global_harmonious"], "none"),
    "Canny": (["none", "canny", INVERT], "canny"),
    "Depth": (["none"], "none"),
    "IP-Adapter": (["none", "ip-adapter-auto", "ip-adapter_clip_h", "ip-adapter_face_id_plus", "ip-adapter_face_id",
                    "ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_g"], "ip-adapter-auto"),
    "Inpaint": (["none", "inpaint_only", "inpaint_global_harmonious"], "inpaint_only"),
    "Instant-ID": (["none"], "none"),
    "InstructP2P": (["none"], "none"),
    "Lineart": (["none", INVERT], INVERT),
    "MLSD": (["none", INVERT], INVERT),
    "NormalMap": (["none"], "none"),
    "OpenPose": (["none"], "none"),
    "Recolor": (["none"], "none"),
    "Reference": (["none"], "none"),
    "Revision": (["none"], "none"),
    "Scribble": (["none", INVERT, "scribble"], INVERT),
    "Segmentation": (["none"], "none"),
    "Shuffle": (["none"], "none"),
    "SoftEdge": (["none"], "none"),
    "SparseCtrl": (["none"], "none"),
    "T2I-Adapter": (["none"], "none"),
    "Tile": (["none", "tile_resample", "tile"], "tile_resample"),
}
SDLAB_OWN = [("scribble", "scribble", ["Scribble"], 0), ("tile", "tile", ["Tile"], 0)]


def test_the_written_lists_are_the_extensions_rule_over_its_registry():
    """The values written out are those of the transcribed extension: its types, and for each its preprocessors
    and default over its registry entries of sdlab's preprocessors (and sdlab's scribble and tile, tagged)."""
    assert list(EXPECTED) == get_all_preprocessor_tags()
    for name, expected in EXPECTED.items():
        assert extension_preprocessors(name, REGISTRY + SDLAB_OWN) == expected, name
        extensions_alone = extension_preprocessors(name)[0]                 # the same, less sdlab's own two
        assert extensions_alone == [label for label in expected[0] if label not in ("scribble", "tile")], name


def test_sdlabs_table_holds_every_preprocessor_sdlab_runs_as_the_extension_registers_it():
    """Each of sdlab's preprocessors (and IP-Adapter modules) is one entry, by the extension's name or label, and
    every label a type lists is a module a unit may name."""
    entries = [(p.name, p.label, list(p.tags), p.priority) for p in LISTED_PREPROCESSORS]
    assert sorted(entries) == sorted(REGISTRY + SDLAB_OWN)
    for module in [*PREPROCESSORS, *LISTED_MODULES]:
        assert sum(module in (p.name, p.label) for p in LISTED_PREPROCESSORS) == 1, module
    for p in LISTED_PREPROCESSORS:
        assert p.label in MODULE_ENCODERS or p.label in FACE_ID_MODULES or a1111_module(p.label) == p.name, p


def test_every_types_preprocessors_and_default_are_the_extensions():
    assert list(CONTROL_TYPES) == list(EXPECTED)
    for name, (modules, default) in EXPECTED.items():
        served = _control_type(name, ["None"])
        assert (served["module_list"], served["default_option"]) == (modules, default), name


# What `/controlnet/module_list` serves, written out: the extension's names and (alias_names) labels of sdlab's
# preprocessors and IP-Adapter modules in its order, the "All" type's list.
MODULE_NAMES = ["none", "ip-adapter-auto", "tile_resample", "ip-adapter_clip_sd15", "inpaint_only", "canny", "invert",
                "tile", "threshold", "scribble", "ip-adapter_face_id_plus", "ip-adapter_face_id",
                "ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl", "inpaint"]


def test_the_written_module_list_is_the_extensions_get_modules():
    assert get_modules(REGISTRY + SDLAB_OWN) == MODULE_NAMES
    assert get_modules(REGISTRY + SDLAB_OWN, alias_names=True) == EXPECTED["All"][0]


def test_every_name_and_label_module_list_gives_is_a_module_a_unit_may_name():
    """A client may send back any entry of either list, and the older names (ip-adapter_clip_sd15 / _sdxl, invert,
    inpaint) as well as the labels (ip-adapter_clip_h / _g, ...)."""
    for module in MODULE_NAMES + EXPECTED["All"][0]:
        assert module in MODULE_ENCODERS or module in FACE_ID_MODULES or a1111_module(module) in PREPROCESSORS, module


# ---------------------------------------------------------------- the route and the page

CONTROLNETS = ("control_v11p_sd15_canny", "control_v11f1e_sd15_tile", "control_v11p_sd15_scribble",
               "control_v11p_sd15_inpaint", "control_v11e_sd15_ip2p")


@pytest.fixture(scope="module")
def types_server(tmp_path_factory: pytest.TempPathFactory):
    """A server drawing with the shipped model (no family: every ControlNet passes) whose ControlNet folder holds
    files named as ControlNets of several types (listed by name only)."""
    root = tmp_path_factory.mktemp("preprocessor-types")
    controlnets = root / "models" / "ControlNet"
    controlnets.mkdir(parents=True)
    for name in CONTROLNETS:
        (controlnets / f"{name}.safetensors").write_bytes(b"\0" * 4096)
    server = start_server(root / "outputs", "--models-dir", str(root / "models"))
    try:
        yield server.url.rstrip("/")
    finally:
        server.stop()


def test_the_route_serves_every_type_with_the_extensions_preprocessors(types_server):
    """`GET /controlnet/control_types` (the extension's route, and sdlab's `?model=`): every type, in the
    extension's order, with its preprocessors and default as the extension's."""
    for params in ({}, {"model": ""}):
        types = httpx.get(types_server + "/controlnet/control_types", params=params, timeout=60).json()["control_types"]
        assert list(types) == list(EXPECTED)
        assert {name: (t["module_list"], t["default_option"]) for name, t in types.items()} == EXPECTED
    stems = {name: [title.split(" [")[0] for title in t["model_list"]] for name, t in types.items()}
    assert stems["Tile"] == ["None", "control_v11f1e_sd15_tile"]
    assert stems["Scribble"] == ["None", "control_v11p_sd15_scribble"]
    assert stems["InstructP2P"] == ["None", "control_v11e_sd15_ip2p"]
    assert stems["Depth"] == ["None"]


def test_module_list_lists_the_extensions_preprocessors_in_its_order(types_server):
    """`GET /controlnet/module_list` as the extension's route (`get_modules`, `get_modules_detail`): every
    preprocessor and IP-Adapter module once, in the "All" type's order, by name, or by label with alias_names;
    `module_detail` keyed by the same names. Before, it kept sdlab's own order and listed ip-adapter_clip_sd15 /
    _sdxl beside their labels ip-adapter_clip_h / _g."""
    types = httpx.get(types_server + "/controlnet/control_types", timeout=60).json()["control_types"]
    for params, expected in (({}, MODULE_NAMES), ({"alias_names": "false"}, MODULE_NAMES),
                             ({"alias_names": "true"}, EXPECTED["All"][0])):
        listed = httpx.get(types_server + "/controlnet/module_list", params=params, timeout=60).json()
        assert listed["module_list"] == expected, params
        assert list(listed["module_detail"]) == expected, params
    aliased = httpx.get(types_server + "/controlnet/module_list", params={"alias_names": True}, timeout=60).json()
    assert aliased["module_list"] == types["All"]["module_list"]
    assert aliased["module_detail"]["ip-adapter_clip_h"] == {"model_free": False, "sliders": []}
    plain = httpx.get(types_server + "/controlnet/module_list", timeout=60).json()["module_detail"]
    assert aliased["module_detail"]["canny"] == plain["canny"] and len(plain["canny"]["sliders"]) == 3
    assert aliased["module_detail"]["inpaint_global_harmonious"] == plain["inpaint"] == {"model_free": False,
                                                                                        "sliders": []}


def _shown(driver, select_id: str) -> list[tuple[str, str]]:
    return driver.execute_script(
        "return [...document.getElementById(arguments[0]).options].map((o) => [o.text, o.value])", select_id)


def _chosen(driver, select_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).value", select_id)


def test_choosing_a_control_type_shows_its_preprocessors_and_selects_its_default(browser, types_server):
    """Each Control Type radio (all but IP-Adapter, the IP-Adapter box's) shows the type's preprocessors in the
    extension's order by the extension's names (each option's value sdlab's name of it), its default selected, and
    its models; All shows every one but the IP-Adapter modules, none selected."""
    open_page(browser, types_server)
    wait(browser, lambda d: len(_shown(d, "cn0_module")) > 1 and len(_shown(d, "cn0_model")) > 1, 30,
         "the ControlNet lists did not load")
    browser.get_log("browser")
    radios = browser.execute_script("return [...document.getElementsByName('cn0_type')].map((r) => r.value)")
    assert radios == [name for name in EXPECTED if name != "IP-Adapter"]
    types = httpx.get(types_server + "/controlnet/control_types", timeout=60).json()["control_types"]
    name_of = {p.label: p.name for p in LISTED_PREPROCESSORS}
    for name in radios[1:] + radios[:1]:                       # All last: it is chosen at first
        browser.find_element(By.ID, f"cn0_type_{radios.index(name)}").click()
        labels, default = EXPECTED[name]
        expected = [[label, name_of[label]] for label in labels if not name_of[label].startswith("ip-adapter")]
        models = ["", *types[name]["model_list"][1:]]
        # one wait for the lists and the default together: the radio's choice re-reads the control types (a fetch)
        # before the lists settle, so reading them one by one after the first matched could catch them mid-way
        wait(browser, lambda d: (_shown(d, "cn0_module"), _chosen(d, "cn0_module"),
                                 [value for _, value in _shown(d, "cn0_model")]) == (expected, name_of[default], models),
             60, f"{name} does not show {expected} with {name_of[default]} chosen and models {models}")
    assert severe_console_errors(browser) == []


def test_the_ip_adapter_box_lists_the_ip_adapter_types_modules_in_its_order(browser, types_server):
    """The IP-Adapter box's Image encoder: the adapter's own, then the IP-Adapter type's modules in its order, shown by
    the extension's labels (each value the extension's name, which the server takes), each once; Reuse of a job or
    picture naming a module by either name selects it. Before, the box listed six names alphabetically, clip_h
    beside clip_sd15 and clip_g beside clip_sdxl."""
    open_page(browser, types_server)
    wait(browser, lambda d: len(_shown(d, "ipa_module")) > 1, 30, "the IP-Adapter modules did not load")
    browser.get_log("browser")
    name_of = {p.label: p.name for p in LISTED_PREPROCESSORS}
    labels, default = EXPECTED["IP-Adapter"]
    assert default == labels[1]                                 # ip-adapter-auto, the first module listed
    assert _shown(browser, "ipa_module") == [["The adapter's own", ""]] + [
        [label, name_of[label]] for label in labels if label != "none"]
    assert browser.find_element(By.ID, "ipa_module").get_attribute("value") == ""
    restored = (("ip-adapter_clip_h", "ip-adapter_clip_sd15"), ("ip-adapter_clip_g", "ip-adapter_clip_sdxl"),
                ("ip-adapter_clip_sd15", "ip-adapter_clip_sd15"), ("IP-Adapter_Clip_SDXL", "ip-adapter_clip_sdxl"),
                ("ip-adapter-auto", "ip-adapter-auto"), (None, ""))
    for module, chosen in restored:
        unknown = browser.execute_script(
            "const unknown = []; fillControls({ip_adapters: [{model: 'ip-adapter_tiny', scale: 0.5, "
            "module: arguments[0]}]}, unknown); return unknown", module)
        assert browser.find_element(By.ID, "ipa_module").get_attribute("value") == chosen, module
        assert not [line for line in unknown if "module" in line], (module, unknown)
    assert severe_console_errors(browser) == []
