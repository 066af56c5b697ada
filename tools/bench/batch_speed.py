"""Wall time of one `gas-edit batch` over the same jobs with 1 and with N processes, and their ratio.

    nice -n 10 python tools/bench/batch_speed.py --jobs 8 --steps 30 --devices 1,2 --out runs/batch_speed

The jobs are held-out cases of the bundled world (exact plans, configs/shapes.yaml's settings with
--steps steps). Each run is a fresh command in a fresh output folder, timed from start to exit
(process start, model load and the summary included). One process keeps torch's thread count
(all cores); Lightning gives each of N processes cores / N threads. The load average before and
after each run is printed, because on a shared machine it decides the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def write_jobs(folder: Path, n: int, seed: int) -> Path:
    from gas_lightning.worlds import held_out_cases, render_pil

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, case in enumerate(held_out_cases(n, seed=seed)):
        render_pil(case.source).save(folder / f"case{k}.png")
        case.edit_plan().save(folder / f"case{k}.json")
        lines.append({"name": f"case{k}", "image": f"case{k}.png", "plan": f"case{k}.json", "seed": k})
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def timed_run(jobs: Path, out: Path, devices: int, steps: int, threads: int | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [
        sys.executable,
        "-m",
        "gas_lightning.cli",
        "batch",
        "--config",
        str(REPO / "configs" / "shapes.yaml"),
        "--jobs",
        str(jobs),
        "--output_dir",
        str(out),
        "--trainer.max_steps",
        str(steps),
        "--lr_scheduler.T_max",
        str(steps),
        "--trainer.devices",
        str(devices),
        "--trainer.accelerator",
        "cpu",
        "--trainer.callbacks",
        "[]",
    ]
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "devices": devices,
        "threads": threads,
        "seconds": round(seconds, 1),
        "ok": summary["ok"],
        "job_seconds": round(sum(r["seconds"] for r in summary["jobs"]), 1),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "command": " ".join(cmd),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--devices", default="1,2", help="comma list of process counts; the first is the baseline")
    p.add_argument(
        "--one_thread_baseline",
        action="store_true",
        help="also time 1 process with OMP_NUM_THREADS=1 (one core, as each of 2 processes gets)",
    )
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("runs/batch_speed"))
    args = p.parse_args(argv)
    jobs = write_jobs(args.out / "jobs", args.jobs, args.seed)
    runs = []
    counts = [int(d) for d in args.devices.split(",")]
    plan = [(counts[0], None)] + ([(1, 1)] if args.one_thread_baseline else []) + [(d, None) for d in counts[1:]]
    for devices, threads in plan:
        runs.append(timed_run(jobs, args.out / f"devices{devices}_threads{threads}", devices, args.steps, threads))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    base = runs[0]["seconds"]
    print(f"{args.jobs} jobs x {args.steps} steps, {os.cpu_count()} CPUs")
    for r in runs:
        print(
            f"processes {r['devices']} (threads {r['threads'] or 'default'}): {r['seconds']} s, "
            f"{r['seconds'] / base:.2f} of the first; load average before {r['load_before'][0]}, after {r['load_after'][0]}"
        )
    (args.out / "speed.json").write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
