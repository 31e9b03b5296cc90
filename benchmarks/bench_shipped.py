"""Wall time of one whole `sdlab txt2img` process with the shipped model at its default settings: start-up,
model load, the default sampling (the model's steps, sampler, schedule and CFG) at 64 x 64, VAE decode and
PNG write.

    python benchmarks/bench_shipped.py                    # 5 runs, median; the issue's budget is 2 s on 2 cores
    python benchmarks/bench_shipped.py --runs 9 --json
    python benchmarks/bench_shipped.py --busy              # with another process spinning on one core
    python benchmarks/bench_shipped.py --flags "--steps 20 --schedule karras"   # other sdlab txt2img flags
    python benchmarks/bench_shipped.py --flags "--compile" # torch.compile, cached
    python benchmarks/bench_shipped.py --runs 11 --against "--steps 20 --schedule karras" --against "--threads 1"

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
    parser.add_argument("--against", action="append", default=[], metavar="FLAGS",
                        help="other flag sets, run in turn with --flags in every round (interleaved, so a drift of "
                             "the machine's speed hits each alike); each gets its median and its ratio to --flags")
    parser.add_argument("--busy", action="store_true", help="keep one other process spinning on a core meanwhile")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="compile every module in every run (PYTHONDONTWRITEBYTECODE=1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per flag set")
    args = parser.parse_args()
    variants = [args.flags, *args.against]
    env = child_environment(not args.no_bytecode_cache)
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if args.busy else None
    times: dict[str, list[float]] = {v: [] for v in variants}
    try:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "bench.png"
            for seed in range(args.runs + 1):              # round 0 warms the disk and bytecode caches
                for flags in variants:
                    times[flags].append(one_run(out, seed, args.model, shlex.split(flags), env))
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    load = [round(v, 2) for v in os.getloadavg()]
    base = statistics.median(times[args.flags][1:])
    for flags in variants:
        runs = times[flags][1:]
        result = {"prompt": PROMPT, "settings": "model default", "flags": flags, "busy_core": args.busy,
                  "bytecode_cache": not args.no_bytecode_cache, "warm_up_s": round(times[flags][0], 3),
                  "runs_s": [round(t, 3) for t in runs], "median_s": round(statistics.median(runs), 3),
                  "ratio_to_flags": round(statistics.median(runs) / base, 3), "cpus": os.cpu_count(),
                  "load_average": load}
        if args.json:
            print(json.dumps(result))
            continue
        ratio = f", {result['ratio_to_flags']:.3f} x {args.flags or 'the defaults'}" if flags != args.flags else ""
        print(f"sdlab txt2img {flags or '(default settings)'}{' (one core busy)' if args.busy else ''}: "
              f"median {result['median_s']:.2f} s over {args.runs} runs {result['runs_s']}{ratio} "
              f"(warm-up {result['warm_up_s']:.2f} s; bytecode cache {'on' if result['bytecode_cache'] else 'off'}; "
              f"load average {load})")


if __name__ == "__main__":
    main()
