"""A1111 1.10's sampler aliases (the third item of each row of `samplers_k_diffusion` in
modules/sd_samplers_kdiffusion.py, `samplers_timesteps` in sd_samplers_timesteps.py, `samplers_lcm` in
sd_samplers_lcm.py), which its `samplers_map` maps to their samplers and its `/sdapi/v1/samplers` lists as
`aliases`: sdlab names each sampler by them too and lists them first. Its "ddim" and "plms" are written as ComfyUI
writes samplers, which sdlab's rows "ddim" and "plms" go by."""

from __future__ import annotations

import json

import httpx
import pytest

from server_fixtures import sdlab_server  # noqa: F401  (a session fixture)
from sdlab.diffusion.samplers import SAMPLERS, comfyui_spelling, get_sampler

A1111_ALIASES = {   # A1111 1.10: label -> aliases
    "DPM++ 2M": ["k_dpmpp_2m"], "DPM++ SDE": ["k_dpmpp_sde"], "DPM++ 2M SDE": ["k_dpmpp_2m_sde"],
    "DPM++ 2M SDE Heun": ["k_dpmpp_2m_sde_heun"], "DPM++ 2S a": ["k_dpmpp_2s_a"], "DPM++ 3M SDE": ["k_dpmpp_3m_sde"],
    "Euler a": ["k_euler_a", "k_euler_ancestral"], "Euler": ["k_euler"], "LMS": ["k_lms"], "Heun": ["k_heun"],
    "DPM2": ["k_dpm_2"], "DPM2 a": ["k_dpm_2_a"], "DPM fast": ["k_dpm_fast"], "DPM adaptive": ["k_dpm_ad"],
    "Restart": ["restart"],
    "DDIM": ["ddim"], "DDIM CFG++": ["ddim_cfgpp"], "PLMS": ["plms"], "UniPC": ["unipc"],
    "LCM": ["k_lcm"],
}
COMFYUI_ROWS = {"ddim", "plms"}     # A1111's aliases that are sdlab rows of their own


def _own(aliases: list[str]) -> list[str]:
    return [alias for alias in aliases if alias not in COMFYUI_ROWS]


@pytest.mark.parametrize("label", sorted(A1111_ALIASES))
def test_each_a1111_alias_names_its_sampler_under_a1111s_conventions(label):
    assert label in SAMPLERS
    for alias in _own(A1111_ALIASES[label]):
        assert get_sampler(alias) is SAMPLERS[label] and get_sampler(alias.upper()) is SAMPLERS[label]
        assert not comfyui_spelling(alias)


def test_the_samplers_route_lists_a1111s_aliases_first():
    from sdlab.server.a1111 import samplers

    rows = {row["name"]: row["aliases"] for row in samplers()}
    for label, aliases in A1111_ALIASES.items():
        assert rows[label][:len(_own(aliases))] == _own(aliases), label


def test_a_request_naming_an_alias_draws_its_sampler(sdlab_server):
    fields = {"prompt": "a cat", "steps": 2, "seed": 3}
    with httpx.Client(base_url=sdlab_server.url + "/sdapi/v1", timeout=120) as client:
        by_alias = client.post("/txt2img", json={**fields, "sampler_name": "k_euler_a"})
        by_name = client.post("/txt2img", json={**fields, "sampler_name": "Euler a"})
        pasted = client.post("/txt2img", json={"infotext": "a cat\nSteps: 2, Seed: 3, Sampler: k_euler_a"})
    assert by_alias.status_code == 200, by_alias.text
    assert by_alias.json()["images"] == by_name.json()["images"]
    assert json.loads(by_alias.json()["info"])["sampler_name"] == "Euler a"
    assert pasted.status_code == 200 and json.loads(pasted.json()["info"])["sampler_name"] == "Euler a"
