"""The pytest configuration silences the known third-party warnings (diffusers' numpy 2 deprecations, about
65,000 a run) and nothing of sdlab's own, and `outputs/` (the CLI's default folder) is not committed."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMPY_COPY = "__array__ implementation doesn't accept a copy keyword, so passing copy=False failed."
NUMPY_WRAP = "__array_wrap__ must accept context and return_scalar arguments (positionally) in the future."


def _shown(message: str, module: str) -> bool:
    """Whether a DeprecationWarning raised from ``module`` reaches the report under the active filters."""
    with warnings.catch_warnings(record=True) as caught:   # keeps the filters pytest installed for this test
        warnings.warn_explicit(message, DeprecationWarning, f"{module}.py", 1, module=module, registry={})
    return bool(caught)


def test_each_filter_names_a_message_and_a_third_party_module():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    for entry in config["filterwarnings"]:
        action, message, category, module = entry.split(":")[:4]
        assert action == "ignore" and message and category.endswith("Warning"), entry
        assert module and not module.startswith(("sdlab", "tests")), entry


def test_diffusers_numpy_deprecations_are_hidden_and_sdlabs_are_not():
    assert not _shown(NUMPY_COPY, "diffusers.schedulers.scheduling_euler_discrete")
    assert not _shown(NUMPY_WRAP, "diffusers.schedulers.scheduling_k_dpm_2_discrete")
    assert not _shown(NUMPY_WRAP, "numpy._core.fromnumeric")
    assert _shown(NUMPY_COPY, "sdlab.pipeline.generate")
    assert _shown(NUMPY_WRAP, "sdlab.diffusion.samplers")
    assert _shown("something else", "diffusers.schedulers.scheduling_euler_discrete")


def test_outputs_folder_is_ignored_by_git():
    assert "outputs/" in (ROOT / ".gitignore").read_text().split()
