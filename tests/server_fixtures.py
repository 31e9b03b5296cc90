"""A real `sdlab serve` process on a free localhost port, for the server and web UI tests.

    from server_fixtures import sdlab_server          # noqa: F401  (a session fixture)

    def test_x(sdlab_server):
        httpx.get(sdlab_server.url + "/api/jobs")

`start_server(output_dir, *args)` starts another one (its own arguments, e.g. --auth); `stop()` ends it.
The shipped model draws 64 px pictures, a few steps take a fraction of a second.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"                    # two cores shared with the test process and others
    return env


@dataclass
class ServerProcess:
    url: str
    output_dir: Path
    process: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def kill(self) -> None:
        """End it abruptly (SIGKILL): nothing gets to clean up, as in a crash or power loss."""
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(output_dir: Path, *args: str, auth: tuple[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> ServerProcess:
    """`sdlab serve --port <free> --output-dir output_dir ARGS`, once it answers."""
    output_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = output_dir.parent / f"serve-{port}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "sdlab", "serve", "--port", str(port), "--output-dir", str(output_dir), *args],
            stdout=sink, stderr=subprocess.STDOUT, env=server_env(), cwd=output_dir.parent,
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", output_dir, process, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sdlab serve exited with {process.returncode}:\n{server.output()}")
        try:
            if httpx.get(server.url + "/sdapi/v1/options", auth=auth, headers=headers, timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"sdlab serve did not answer within {START_TIMEOUT_S} s:\n{server.output()}")


@pytest.fixture(scope="session")
def sdlab_server(tmp_path_factory: pytest.TempPathFactory):
    """One server for a test session: `.url` (http://127.0.0.1:PORT) and `.output_dir`."""
    server = start_server(tmp_path_factory.mktemp("sdlab-serve") / "outputs", "--max-queue", "4")
    yield server
    server.stop()


def write_preset_models(models: Path) -> Path:
    """Two reduced-width SD1 files in `models`: one whose metadata names the "lcm" preset
    (distilled.safetensors, returned) and the same weights without (plain.safetensors)."""
    from dataclasses import replace

    from bundle_fixtures import tiny_bundle
    from sdlab.checkpoints.save import save_bundle

    models.mkdir(parents=True, exist_ok=True)
    save_bundle(replace(tiny_bundle("sd1", seed=3), preset="lcm"), models / "distilled.safetensors")
    save_bundle(tiny_bundle("sd1", seed=3), models / "plain.safetensors")
    return models / "distilled.safetensors"


@contextmanager
def tiny_models_client(root: Path, families: Sequence[str], seed: int) -> Iterator[Any]:
    """An in-process app (a `TestClient`; `.app.state.service` its service) whose --models-dir (root / "models")
    holds one reduced-width random-weight file `<family>.safetensors` of each of `families` (`tiny_bundle`, `seed`),
    its outputs under root / "outputs"."""
    from fastapi.testclient import TestClient

    from bundle_fixtures import tiny_bundle
    from sdlab.checkpoints.save import save_bundle
    from sdlab.server.app import create_app
    from sdlab.server.config import ServerConfig

    models = root / "models"
    models.mkdir()
    for family in families:
        save_bundle(tiny_bundle(family, seed=seed), models / f"{family}.safetensors")
    with TestClient(create_app(ServerConfig(output_dir=root / "outputs", models_dir=models))) as client:
        yield client


def run_job(client: httpx.Client, body: dict, timeout_s: float = 120) -> dict:
    """POST a job to /api/jobs and poll it until it ends; returns its last state (any final status)."""
    created = client.post("/api/jobs", json=body)
    assert created.status_code == 202, created.text
    return wait_for_job(client, created.json()["id"], timeout_s)


def wait_for_job(client: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    """Poll /api/jobs/ID until the job ends; returns its last state (any final status)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def drawn_job(client: httpx.Client, body: dict, timeout_s: float = 120) -> dict:
    """`run_job`, asserting the job ended done."""
    job = run_job(client, body, timeout_s)
    assert job["status"] == "done", job
    return job


def drawn_picture(client: httpx.Client, body: dict, timeout_s: float = 120) -> tuple[dict, Image.Image]:
    """`drawn_job` and its first picture, read whole (its PNG text chunks in `.info`)."""
    job = drawn_job(client, body, timeout_s)
    return job, png_picture(client.get(job["images"][0]).content)


def job_pixels(client: httpx.Client, job: dict, index: int = 0) -> np.ndarray:
    """A done job's picture ``index`` as RGB int16 pixels (differences do not wrap)."""
    return np.asarray(png_picture(client.get(job["images"][index]).content).convert("RGB"), dtype=np.int16)


def b64_png(image: Image.Image) -> str:
    """A picture as a request sends it: a PNG in base64."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def file_b64(path: Path) -> str:
    """A file's bytes in base64, as a request sends a picture file."""
    return base64.b64encode(path.read_bytes()).decode("ascii")


def png_picture(data: bytes) -> Image.Image:
    """A picture read whole from its file's bytes (its PNG text chunks in `.info`)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def drawn_pictures(client: httpx.Client, body: dict, decode: Callable[[bytes], Any] = png_picture,
                   timeout_s: float = 120) -> tuple[dict, list]:
    """`drawn_job` and every picture it drew, each made from its file's bytes by `decode`."""
    job = drawn_job(client, body, timeout_s)
    return job, [decode(client.get(url).content) for url in job["images"]]


def cli_txt2img(tmp_path: Path, *args: str) -> Image.Image:
    """`sdlab txt2img ARGS` in a subprocess under the servers' environment; the picture it wrote."""
    out = tmp_path / "cli.png"
    result = subprocess.run([sys.executable, "-m", "sdlab", "txt2img", *args, "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, env=server_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    return png_picture(out.read_bytes())


def picture(b64: str) -> Image.Image:
    """An answer's base64 picture, in RGB."""
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
