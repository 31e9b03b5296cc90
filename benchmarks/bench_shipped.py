"""Wall time of one whole `sdlab txt2img` process with the shipped model at its default settings: start-up,
model load, the default sampling (the model's steps, sampler, schedule and CFG) at 64 x 64, VAE decode and
PNG write.

    python benchmarks/bench_shipped.py                    # 5 runs, median; the issue's budget is 2 s on 2 cores
    python benchmarks/bench_shipped.py --runs 9 --json
    python benchmarks/bench_shipped.py --busy              # with another process spinning on one core
    python benchmarks/bench_shipped.py --flags "--steps 20 --schedule karras"   # other sdlab txt2img flags
    python benchmarks/bench_shipped.py --flags "--compile" # torch.compile, cached

Each run is a fresh process running the console script's entry point (`sdlab.command:run`, through
`python -c`), timed from before it starts to after it exits, so Python and torch start-up are counted. The
first run warms the disk cache and is reported but left out of the median. `--busy` keeps one extra process
spinning for the whole measurement (the "loaded machine" case).
Python's bytecode cache is on in the timed processes, as on a user's machine (pip writes `.pyc` files at
install; an editable install writes them on the first run): a `PYTHONDONTWRITEBYTECODE` set in the calling
environment is dropped for them, so the warm-up run writes the cache. Without it every run compiles sdlab's
~90 modules again (about 0.1 s); `--no-bytecode-cache` measures that case.
Numbers on a shared machine are noisy: repeat before trusting them; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a large red apple in the center on a light blue background"
ENTRY = "from sdlab.command import run; run()"


BUSY = "while True: pass"


def child_environment(bytecode_cache: bool) -> dict[str, str]:
    env = dict(os.environ)
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def one_run(out: Path, seed: int, model: str | None, flags: list[str], env: dict[str, str]) -> float:
    command = [sys.executable, "-c", ENTRY, "txt2img", PROMPT, "--seed", str(seed), "--out", str(out),
               "--no-progress", *flags]
    if model:
        command += ["--model", model]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs after the warm-up run (default 5)")
    parser.add_argument("--model", help="checkpoint (default: the shipped model)")
    parser.add_argument("--flags", default="",
                        help='sdlab txt2img flags over the defaults, e.g. "--steps 20", "--compile" or "--threads 2"')
    parser.add_argument("--busy", action="store_true", help="keep one other process spinning on a core meanwhile")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="compile every module in every run (PYTHONDONTWRITEBYTECODE=1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    flags = shlex.split(args.flags)
    env = child_environment(not args.no_bytecode_cache)
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if args.busy else None
    try:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "bench.png"
            warm = one_run(out, 0, args.model, flags, env)
            times = [one_run(out, i + 1, args.model, flags, env) for i in range(args.runs)]
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    result = {"prompt": PROMPT, "settings": "model default", "flags": args.flags,
              "busy_core": args.busy, "bytecode_cache": not args.no_bytecode_cache,
              "warm_up_s": round(warm, 3), "runs_s": [round(t, 3) for t in times],
              "median_s": round(statistics.median(times), 3), "cpus": os.cpu_count(),
              "load_average": [round(v, 2) for v in os.getloadavg()]}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"sdlab txt2img {args.flags or '(default settings)'}{' (one core busy)' if args.busy else ''}: "
              f"median {result['median_s']:.2f} s over "
              f"{args.runs} runs {result['runs_s']} (warm-up {result['warm_up_s']:.2f} s; bytecode cache "
              f"{'on' if result['bytecode_cache'] else 'off'}; load average "
              f"{result['load_average']})")


if __name__ == "__main__":
    main()
