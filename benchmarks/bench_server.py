"""`sdlab serve` overhead: the same 20-step generation with the shipped model in-process and through the
server, and throughput with 8 concurrent clients.

    python benchmarks/bench_server.py                 # 8 timed runs each; the issue's target: overhead <= 5 %
    python benchmarks/bench_server.py --runs 12 --threads 1

In-process: `pipe.run(request)` (sampling and VAE decode; no file). Through the server, per request:
HTTP + JSON, the queue, the per-step preview projection, the PNG encode with its parameters chunk, the
atomic file write and the SQLite record, and for A1111's route the base64 answer; for the native route a
client that follows the job's Server-Sent Events (a JPEG preview per step) and then fetches the PNG.
Both sides use the same torch thread count (`--threads`). The concurrent test sends 8
clients' A1111 requests at once: one worker draws one job at a time, so requests/s should match the
in-process rate. Medians; a shared machine is noisy, so repeat before trusting a number.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large red apple in the center on a light blue background"
SETTINGS = {"prompt": PROMPT, "steps": 20, "seed": 1}


def local_pipeline():
    """The in-process pipeline and a `run()` that draws the benchmark's request, warmed up."""
    import sdlab
    from sdlab.pipeline.request import GenerationRequest

    pipe = sdlab.load()
    request = GenerationRequest(**SETTINGS, sampler="DPM++ 2M")
    pipe.run(request)
    return lambda: pipe.run(request)


def queued_in_process(folder: Path):
    """A `run()` through the server's own queue and worker in this process (no HTTP): preview per step, PNG
    encode, atomic write and SQLite record included."""
    from sdlab.pipeline.request import GenerationRequest
    from sdlab.server.config import ServerConfig
    from sdlab.server.inputs import JobSpec
    from sdlab.server.service import Service

    service = Service(ServerConfig(output_dir=folder))
    service.runner.warm()
    service.start()
    request = GenerationRequest(**SETTINGS, sampler="DPM++ 2M")

    def run() -> None:
        job, _ = service.submit(JobSpec(request), "txt2img", None)
        job.finished_event.wait()

    run()
    return run, service.stop


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def start_server(out: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "src"))
    process = subprocess.Popen([sys.executable, "-c", f"import torch; torch.set_num_threads({threads}); "
                                "import sys; from sdlab.cli import main; sys.exit(main())",
                                "serve", "--port", str(port), "--output-dir", str(out), "--max-queue", "64"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/sdapi/v1/options", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("sdlab serve did not start")


def a1111_call(client: httpx.Client) -> float:
    started = time.perf_counter()
    response = client.post("/sdapi/v1/txt2img", json={**SETTINGS, "sampler_name": "DPM++ 2M"})
    response.raise_for_status()
    return time.perf_counter() - started


def native_call(client: httpx.Client) -> float:
    started = time.perf_counter()
    job_id = client.post("/api/jobs", json={**SETTINGS, "sampler": "DPM++ 2M"}).json()["id"]
    done = None
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                done = json.loads(line[6:])
    client.get(done["images"][0]).raise_for_status()
    return time.perf_counter() - started


def concurrent(url: str, clients: int, per_client: int) -> float:
    """Requests per second with `clients` threads each sending `per_client` A1111 requests."""
    def worker():
        with httpx.Client(base_url=url, timeout=600) as client:
            for _ in range(per_client):
                a1111_call(client)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * per_client / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="timed runs per measurement (default 8)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                        help="torch threads on both sides (default $OMP_NUM_THREADS, else 1: the shipped model is "
                             "overhead-bound, and more threads on a shared machine make every op wait)")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(Path(folder) / "outputs", args.threads)
        try:
            run_local = local_pipeline()
            run_queued, stop_queued = queued_in_process(Path(folder) / "in-process")
            local, queued, a1111, native, worker = [], [], [], [], []
            with httpx.Client(base_url=url, timeout=600) as client:
                a1111_call(client)                                   # warm-up
                for _ in range(args.runs):                           # interleaved: the machine's load drifts
                    local.append(timed(run_local))
                    queued.append(timed(run_queued))
                    a1111.append(a1111_call(client))
                    native.append(native_call(client))
                    job = client.get("/api/jobs", params={"limit": 1}).json()["jobs"][0]
                    worker.append(job["finished"] - job["started"])
            stop_queued()
            rate = concurrent(url, args.clients, max(1, args.runs // 4))
        finally:
            process.terminate()
            process.wait(30)
    local, queued, a1111, native, worker = (statistics.median(v) for v in (local, queued, a1111, native, worker))
    print(f"torch threads: {args.threads}, medians of {args.runs} interleaved runs")
    print(f"in-process pipe.run, 20 steps:        {local * 1000:8.1f} ms")
    print(f"server queue + worker, in-process:    {queued * 1000:8.1f} ms   overhead {queued / local - 1:+.1%}")
    print(f"A1111 POST /sdapi/v1/txt2img:         {a1111 * 1000:8.1f} ms   overhead {a1111 / local - 1:+.1%}")
    print(f"native POST /api/jobs + SSE + PNG:    {native * 1000:8.1f} ms   overhead {native / local - 1:+.1%}")
    print(f"  of which the worker (draw + PNG + write + record): {worker * 1000:8.1f} ms")
    print(f"{args.clients} concurrent clients:        {rate:8.2f} requests/s   "
          f"in-process rate {1 / local:.2f}/s   ratio {rate * local:.2f}")


if __name__ == "__main__":
    main()
