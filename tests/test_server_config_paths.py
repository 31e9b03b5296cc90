"""`ServerConfig` takes its folders as strings too, as a Python caller writes them (`sdlab.load` takes str paths)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from sdlab.server.app import create_app
from sdlab.server.config import ServerConfig


def test_folders_given_as_strings_are_paths(tmp_path):
    config = ServerConfig(output_dir=str(tmp_path / "out"), models_dir=str(tmp_path), vae_dir=None)
    assert config.output_dir == tmp_path / "out" and isinstance(config.output_dir, Path)
    assert config.models_dir == tmp_path and config.vae_dir is None


def test_an_app_built_with_a_string_output_folder_serves(tmp_path):
    app = create_app(ServerConfig(output_dir=str(tmp_path / "out")))
    with TestClient(app) as client:
        assert client.get("/sdapi/v1/options").status_code == 200
    assert (tmp_path / "out").is_dir()
