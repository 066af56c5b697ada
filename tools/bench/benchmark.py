"""Seconds per step, UNet calls and peak memory of the sequential and batched schedules, same edit.

    python tools/bench/benchmark.py                                          # bundled model, CPU
    python tools/bench/benchmark.py --arch sd15 --width_mult 0.25 --resolution 256   # SD 1.5-shaped, CPU
    python tools/bench/benchmark.py --arch sd15 --device cuda --dtype float16 --compile true --json out.json

Both schedules run the same model, image, plan, seed and step count in this one process. Each
repeat is a Trainer.fit of `--warmup` + `--steps` steps on a freshly built edit; the clock runs
(after a CUDA synchronise) from the first step after warm-up to the end of the last, so loading,
compilation and the first steps are excluded, and the median over repeats is reported. UNet calls
and samples are counted by wrapping the UNet's call, not from a formula. Peak memory comes from one
more run (encode, steps, decode): `torch.cuda.max_memory_allocated` on CUDA, the process's peak
resident set size (sampled every 2 ms, after returning freed heap to the system) on the CPU.

`--arch sd15|sd21|sdxl` builds the published architecture with random weights (no download): right for
time and memory, meaningless as an edit. `--width_mult` narrows it so a CPU can run it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from gas_lightning.backbone import COMPILE_MODES, Backbone, resolve_dtype, set_attention
from gas_lightning.callbacks import NullTextPenalty
from gas_lightning.errors import GasError
from gas_lightning.guidance.dds import BATCHED_NOISE, GuidanceConfig
from gas_lightning.loading import load_backbone
from gas_lightning.pipeline import build_edit, load_image
from gas_lightning.plan import EditPlan
from gas_lightning.resolve import resolve_bundled
from gas_lightning.testing import ARCHITECTURES, build_arch_backbone

SCHEDULES = ("sequential", "batched")
PHRASES = [
    ("the red circle", "a yellow circle"),
    ("the blue square", "a green square"),
    ("the snow", "sand"),
    ("the orange triangle", "a purple triangle"),
    ("the green circle", "a red circle"),
    ("the sky", "a sunset"),
]
KEEP_PHRASES = ["the yellow square", "the purple circle", "the red triangle"]


class UNetCounter:
    """Stands in for the UNet and counts its calls and samples; everything else is the UNet's."""

    def __init__(self, unet: torch.nn.Module):
        self.__dict__.update(unet=unet, calls=0, samples=0)

    def __call__(self, sample: torch.Tensor, *args, **kwargs):
        self.__dict__["calls"] += 1
        self.__dict__["samples"] += int(sample.shape[0])
        return self.unet(sample, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["unet"], name)

    def reset(self) -> None:
        self.__dict__.update(calls=0, samples=0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Wall time and UNet calls of the steps after `warmup` (batch indices count from 0 in each fit)."""

    def __init__(self, counter: UNetCounter, warmup: int, steps: int):
        self.counter, self.warmup, self.steps = counter, warmup, steps
        self.start = self.seconds = self.cpu_start = self.cpu_seconds = None
        self.first_start = self.first_step = None
        self.calls = self.samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            synchronize(pl_module.device)
            self.first_start = time.perf_counter()
        if batch_idx == self.warmup:
            synchronize(pl_module.device)
            self.counter.reset()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == 0:  # with --compile the first repeat's first step holds the compilation
            synchronize(pl_module.device)
            self.first_step = time.perf_counter() - self.first_start
        if batch_idx == self.warmup + self.steps - 1:
            synchronize(pl_module.device)
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.cpu_start
            self.calls, self.samples = self.counter.calls, self.counter.samples


class SyncWatch(Callback):
    """CUDA only: host synchronisations from the start of each non-logging step (the first excluded)
    to the start of the next, caught by torch.cuda.set_sync_debug_mode("warn")."""

    def __init__(self):
        self.messages: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        torch.cuda.set_sync_debug_mode("default")
        if batch_idx > 0 and not trainer._logger_connector.should_update_logs:
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, pl_module) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        self.messages = [str(w.message) for w in self._records if "synchroniz" in str(w.message)]


class PeakRss:
    """Peak resident set size while inside, in MiB. The CPU has no allocator peak counter, so the
    RSS is sampled; freed heap is returned to the system first so earlier runs do not hide a peak."""

    def __enter__(self) -> PeakRss:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.peak = self.start = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    @staticmethod
    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def benchmark_plan(n: int, keep: int = 0) -> EditPlan:
    """n subtasks with distinct phrases on a grid of overlapping boxes, then `keep` keep subtasks (source ==
    target, as the shapes preset's untouched objects) in small boxes inside them."""
    if not 1 <= n <= len(PHRASES):
        raise GasError(f"--subtasks must be between 1 and {len(PHRASES)}, got {n}")
    if not 0 <= keep <= len(KEEP_PHRASES):
        raise GasError(f"--keep must be between 0 and {len(KEEP_PHRASES)}, got {keep}")
    cols = 3 if n > 2 else n
    rows = -(-n // cols)
    boxes = [
        [(k % cols) / cols, (k // cols) / rows, min(1.0, (k % cols + 1.3) / cols), min(1.0, (k // cols + 1.3) / rows)]
        for k in range(n)
    ]
    boxes += [[0.05 + 0.3 * k, 0.7, 0.25 + 0.3 * k, 0.95] for k in range(keep)]
    src, tgt = zip(*PHRASES[:n])
    src, tgt = list(src) + KEEP_PHRASES[:keep], list(tgt) + KEEP_PHRASES[:keep]
    return EditPlan.from_lists(src, tgt, source_prompt=", ".join(src), target_prompt=", ".join(tgt), boxes=boxes)


def _trainer(args, callbacks: list, max_steps: int, log_dir: str) -> L.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        max_steps=max_steps,
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        precision=args.precision,
        logger=TensorBoardLogger(log_dir, name="", version=""),
        log_every_n_steps=args.log_every_n_steps,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NullTextPenalty(), *callbacks],
    )


def edit(backbone: Backbone, image, plan: EditPlan, schedule: str, args):
    return build_edit(
        backbone,
        image,
        plan,
        GuidanceConfig(batched_noise=args.batched_noise),
        resolution=args.resolution,
        schedule=schedule,
        seed=0,
    )


def timed_run(backbone: Backbone, counter: UNetCounter, image, plan: EditPlan, schedule: str, args, log_dir: str):
    """Per step of one fit, warm-up excluded: wall seconds, this process's CPU seconds (on a shared
    machine, with one thread, the measure of work that other processes' load does not inflate),
    UNet calls and samples."""
    module = edit(backbone, image, plan, schedule, args)
    timer = StepTimer(counter, args.warmup, args.steps)
    _trainer(args, [timer], args.warmup + args.steps, log_dir).fit(module)
    n = args.steps
    return timer.seconds / n, timer.cpu_seconds / n, timer.calls / n, timer.samples / n, timer.first_step, module


def peak_memory(backbone: Backbone, image, plan: EditPlan, schedule: str, args, log_dir: str) -> float:
    """MiB at the peak of one edit, from the encode to the decode."""
    device = torch.device(args.device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRss() as rss:
        module = edit(backbone, image, plan, schedule, args)
        _trainer(args, [], args.warmup + 1, log_dir).fit(module)
        module.decode()
        synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss.peak


def host_syncs(backbone: Backbone, image, plan: EditPlan, schedule: str, args, log_dir: str) -> dict:
    """How many host synchronisations the non-logging steps of one fit made (CUDA only)."""
    if not args.device.startswith("cuda"):
        return {"count": None, "why": "torch.cuda.set_sync_debug_mode needs CUDA"}
    module = edit(backbone, image, plan, schedule, args)
    watch = SyncWatch()
    _trainer(args, [watch], args.warmup + args.steps, log_dir).fit(module)
    return {"count": len(watch.messages), "first": watch.messages[:1]}


def run(backbone: Backbone, counter: UNetCounter, image, plan: EditPlan, schedules: list[str], args) -> dict:
    """The schedules' repeats interleave, so a load change on a shared machine hits both alike."""
    runs: dict[str, list] = {s: [] for s in schedules}
    out = {}
    with tempfile.TemporaryDirectory() as log_dir:
        for _ in range(args.repeats):
            for schedule in schedules:
                runs[schedule].append(timed_run(backbone, counter, image, plan, schedule, args, log_dir))
        for schedule in schedules:
            seconds, cpu_seconds, calls, samples, first, module = zip(*runs[schedule])
            s = statistics.median(seconds)
            out[schedule] = {
                **(
                    {"host_syncs": host_syncs(backbone, image, plan, schedule, args, log_dir)}
                    if args.sync_check
                    else {}
                ),
                "s_per_step": s,
                "s_per_500_steps": 500 * s,
                "s_per_step_repeats": list(seconds),
                # Step 0 of each repeat, a fresh edit on the same model: with --compile the first one
                # holds the compilation, the later ones show it reused across edits (as in a batch).
                "first_step_s_repeats": list(first),
                "compile_s": first[0] - s if args.compile else 0.0,
                "cpu_s_per_step": statistics.median(cpu_seconds),
                "unet_calls_per_step": statistics.median(calls),
                "unet_samples_per_step": statistics.median(samples),
                "peak_mem_mb": round(peak_memory(backbone, image, plan, schedule, args, log_dir), 1),
                "n_terms": len(module[0].active_terms),
                "latent": list(module[0].latent.shape),
            }
    return out


def build_backbone(args) -> Backbone:
    if args.arch is None:
        backbone = load_backbone(
            resolve_bundled(args.model), device=args.device, dtype=args.dtype, attention=args.attention
        )
    else:
        backbone = build_arch_backbone(args.arch, args.device, resolve_dtype(args.dtype, args.device), args.width_mult)
        backbone.attention = set_attention(backbone.unet, args.attention)
    return backbone.tune(
        compile=args.compile, low_memory=args.low_memory, micro_batch=args.micro_batch, channels_last=args.channels_last
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = lambda v: {"true": True, "false": False}[v.lower()]  # noqa: E731
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--model", default="gas-lightning:shapes-model", help="hub id, local folder or gas-lightning:NAME"
    )
    model.add_argument(
        "--arch",
        choices=list(ARCHITECTURES),
        default=None,
        help="a published architecture with random weights instead of --model",
    )
    p.add_argument(
        "--width_mult", type=float, default=1.0, help="--arch only: narrower UNet/VAE (e.g. 0.25 for the CPU)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a busy machine a second "
        "OpenMP thread spin-waits, seconds per call; 0 = torch's default)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="weights dtype")
    p.add_argument("--precision", default="32-true", help="Trainer precision, e.g. 16-mixed (autocast, fp32 weights)")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers"])
    p.add_argument(
        "--compile",
        type=lambda v: v if v in COMPILE_MODES else flag(v),
        default=False,
        help=f"torch.compile the UNet: true/false or a mode ({', '.join(COMPILE_MODES)})",
    )
    p.add_argument("--channels_last", type=flag, default=False, help="UNet weights in NHWC order (true/false)")
    p.add_argument(
        "--low_memory",
        type=flag,
        default=False,
        help="micro-batched UNet calls, text encoder and VAE off the accelerator between uses (true/false)",
    )
    p.add_argument(
        "--micro_batch", type=int, default=None, help="most samples per UNet call (default 4 with --low_memory)"
    )
    p.add_argument(
        "--batched_noise",
        default="shared",
        choices=list(BATCHED_NOISE),
        help="the batched schedule's sampling: shared (2n + 2 samples per call, the SD configs' default) or "
        "per_term / keep_aware (4n; keep_aware 2 fewer per --keep subtask; the sequential schedule is the same either way)",
    )
    p.add_argument("--subtasks", type=int, default=3)
    p.add_argument(
        "--keep",
        type=int,
        default=0,
        help="keep subtasks added to them (under keep_aware each shares an edit's draw and null-text samples)",
    )
    p.add_argument("--resolution", type=int, default=None, help="short side in pixels (default: the model's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--log_every_n_steps", type=int, default=50, help="Trainer logging interval (logging steps sync)")
    p.add_argument(
        "--sync_check",
        type=flag,
        default=False,
        help="CUDA: one more fit per schedule counting host synchronisations in non-logging steps",
    )
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="comma list of sequential, batched")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gas_lightning.runner import cpu_precision

    settings = {"accelerator": "gpu" if args.device.startswith("cuda") else "cpu", "precision": args.precision}
    cpu_precision(settings)  # 16-mixed on the CPU runs (and is reported) as 32-true, as gas-edit runs it
    args.precision = settings["precision"]
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    schedules = [s for s in args.schedules.split(",") if s]
    if not set(schedules) <= set(SCHEDULES) or args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        raise GasError("--schedules takes sequential and/or batched; --steps and --repeats >= 1, --warmup >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    plan = benchmark_plan(args.subtasks, args.keep)
    backbone = build_backbone(args)
    counter = UNetCounter(backbone.unet)
    backbone.unet = counter
    image = load_image(resolve_bundled("gas-lightning:example.png"))
    result = {
        "model": args.model if args.arch is None else backbone.source,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(backbone.dtype).replace("torch.", ""),
        "precision": args.precision,
        "attention": backbone.attention,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "low_memory": args.low_memory,
        "batched_noise": args.batched_noise,
        "micro_batch": backbone.micro_batch,
        "subtasks": args.subtasks,
        "keep": args.keep,
        "resolution": args.resolution or backbone.default_resolution,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    result.update(run(backbone, counter, image, plan, schedules, args))
    if len(schedules) == 2:
        seq, bat = result["sequential"], result["batched"]
        result["ratio"] = seq["s_per_step"] / bat["s_per_step"]
        result["ratio_repeats"] = [a / b for a, b in zip(seq["s_per_step_repeats"], bat["s_per_step_repeats"])]
        result["cpu_ratio"] = seq["cpu_s_per_step"] / bat["cpu_s_per_step"]
    print(
        f"{result['model']} on {result['device_name']} ({result['dtype']}, {result['precision']}, "
        f"attention={result['attention']}, compile={args.compile}, low_memory={args.low_memory}, "
        f"batched_noise={args.batched_noise}), "
        f"{args.subtasks} subtasks + {args.keep} kept, {result['resolution']} px"
    )
    print(
        f"{'schedule':<11} {'s/step':>9} {'s/500 steps':>12} {'CPU s/step':>11} {'UNet calls':>11} {'samples':>8} "
        f"{'peak MiB':>9}"
    )
    for schedule in schedules:
        r = result[schedule]
        print(
            f"{schedule:<11} {r['s_per_step']:>9.4f} {r['s_per_500_steps']:>12.1f} {r['cpu_s_per_step']:>11.4f} "
            f"{r['unet_calls_per_step']:>11g} {r['unet_samples_per_step']:>8g} {r['peak_mem_mb']:>9.0f}"
        )
    for schedule in schedules if args.compile else ():
        r = result[schedule]
        print(
            f"{schedule}: compilation {r['compile_s']:.1f} s (the first edit's first step less a step); first step "
            f"of the later edits {', '.join(f'{v:.2f}' for v in r['first_step_s_repeats'][1:]) or '-'} s"
        )
    if "ratio" in result:
        print(
            f"sequential / batched seconds per step: {result['ratio']:.2f} (repeats "
            f"{', '.join(f'{v:.2f}' for v in result['ratio_repeats'])}; CPU seconds {result['cpu_ratio']:.2f})"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GasError as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        sys.exit(2)
