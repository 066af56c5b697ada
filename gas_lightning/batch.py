"""`gas-edit batch`: many edits from a jobs file, the model loaded once per process, spread over devices.

Each job becomes a gas-edit config (the batch's config and flags, then the job's own keys) and runs
through runner.run_edit, so DIR/<name>/ holds what one gas-edit writes, plus metrics.json and
job.json. Lightning Fabric starts one process per device (`--trainer.devices N`) or joins the
processes torchrun or SLURM started (`--trainer.num_nodes M`); process r takes jobs r, r + world,
... and edits each with an ordinary single-device Trainer, which sees no cluster variables and so
never joins the processes' gloo group (that group only gathers the results for the summary).
A job is finished when its outputs exist and its job.json holds the hash of its resolved settings:
a rerun skips it, and a kill loses only the jobs in flight.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from gas_lightning.errors import GasError
from gas_lightning.records import OUTPUTS, finished, read_record, settings_hash, write_record
from gas_lightning.usage import parse_or_explain, short_help

log = logging.getLogger("gas_lightning")
GATHER_TIMEOUT = timedelta(days=7)  # a rank done early waits this long for the others at the end
# What makes Lightning see a cluster; the per-job Trainer must see none of it.
CLUSTER_VARS = (
    "LOCAL_RANK",
    "NODE_RANK",
    "RANK",
    "GROUP_RANK",
    "ROLE_RANK",
    "LOCAL_WORLD_SIZE",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "KUBERNETES_PORT",
)
CLUSTER_PREFIXES = ("SLURM_", "LSB_", "JSM_", "OMPI_COMM_WORLD_", "PMI_")


def build_parser():
    """gas-edit's own flags plus --jobs and --metrics.*; --output_dir is the batch's folder."""
    from typing import Optional

    from gas_lightning.metrics import MetricsSpec
    from gas_lightning.runner import build_parser as edit_parser

    p = edit_parser(exit_on_error=False)
    p.prog = "gas-edit batch"
    p.description = "Run the edits of a jobs file (one JSON object per line), on one device or many."
    p.add_argument("--jobs", type=Optional[str], default=None, help="the jobs file (JSON lines; docs/guide/batch.md)")
    p.add_class_arguments(MetricsSpec, "metrics")
    p.set_defaults({"output_dir": "outputs/batch"})
    return p


def run(argv: list[str], debug=None) -> int:
    """Parse, launch, edit this process's share, then (rank 0) the summary. Exit status 1 if any job failed."""
    from gas_lightning.jobs import read_jobs
    from gas_lightning.metrics import EditMetrics, MetricsSpec
    from gas_lightning.planners.llm import check_base_url
    from gas_lightning.runner import build_parser as edit_parser

    parser = build_parser()
    if "--help-all" in argv:
        parser.print_help()
        return 0
    if "-h" in argv or "--help" in argv:
        print(short_help(parser, prog="gas-edit batch"), end="")
        return 0
    printing = [a for a in argv if a == "--print_config" or a.startswith("--print_config=")]
    cfg = parse_or_explain(
        parser, [a for a in argv if a not in printing], prog="gas-edit batch"
    )  # checked, then printed
    if debug is not None:
        debug.set(bool(cfg.debug))
    check_base_url(cfg.llm_base_url)
    if printing:
        print(parser.dump(cfg, skip_validation=True), end="")
        return 0
    if cfg.jobs is None:
        raise GasError("gas-edit batch needs --jobs FILE (one JSON object per line; docs/guide/batch.md)")
    if cfg.resume is not None or cfg.plan_only:
        raise GasError(
            "gas-edit batch takes neither --resume nor --plan_only: a rerun of the same command skips "
            "finished jobs and redoes the others"
        )
    if cfg.model is None:
        raise GasError(
            "no model given: pass --model HUB_ID_OR_FOLDER, or gas-lightning:shapes-model for the bundled one"
        )
    spec = MetricsSpec(**vars(cfg.metrics))
    base = cfg.clone()  # the gas-edit config every job starts from
    for key in ("jobs", "metrics", "config"):
        if key in base:
            del base[key]
    jobs = read_jobs(cfg.jobs, known=base)

    fabric = _fabric(cfg.trainer, argv)
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    root = Path(cfg.output_dir)
    runner = _Runner(
        base,
        edit_parser(exit_on_error=False),
        root,
        fabric.device,
        EditMetrics(spec, fabric.device),
        spec,
        overwrite=bool(cfg.overwrite),
    )
    mine = jobs[rank::world]
    records = runner.run_all(mine, label=f"rank {rank}/{world}" if world > 1 else "jobs", position=fabric.local_rank)
    if world > 1:
        import torch.distributed as dist

        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, records)
        records = [r for share in shares for r in share]
    order = {job.name: i for i, job in enumerate(jobs)}
    records.sort(key=lambda r: order[r["job"]])
    if rank == 0:
        from gas_lightning.records import print_table, write_summary

        write_summary(records, root)
        print_table(records, root)
    fabric.barrier()  # every process ends with the same status, after the summary is written
    return 1 if any(r["status"] != "ok" for r in records) else 0


def _fabric(trainer, argv: list[str]):
    """Fabric for the devices and nodes asked for: launches the processes or joins torchrun's / SLURM's."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    kwargs = {"accelerator": trainer.accelerator, "devices": trainer.devices, "num_nodes": trainer.num_nodes}
    try:
        fabric = Fabric(**kwargs)
        if isinstance(fabric.strategy, DDPStrategy) or trainer.num_nodes > 1:
            strategy = DDPStrategy(process_group_backend="gloo", timeout=GATHER_TIMEOUT)
            fabric = Fabric(**kwargs, strategy=strategy)
    except (ValueError, RuntimeError, TypeError) as e:
        raise GasError(
            f"the batch cannot run on --trainer.accelerator {trainer.accelerator} --trainer.devices "
            f"{trainer.devices} --trainer.num_nodes {trainer.num_nodes}: {' '.join(str(e).split())[:300]}"
        ) from None
    strategy = fabric.strategy
    local_launch = strategy.launcher is not None and not strategy.cluster_environment.creates_processes_externally
    if local_launch and sys.argv[1:] != ["batch", *argv]:
        raise GasError(
            "several devices start new processes that run the command line again; run gas-edit batch "
            "(or python -m gas_lightning.cli batch) from a shell, or use one device from Python"
        )
    return fabric


class _Runner:
    """Edits one process's jobs with one model, writes each job's record, shows progress."""

    def __init__(self, base, parser, root: Path, device, metrics, spec, overwrite: bool):
        from dataclasses import asdict

        self.base, self.parser, self.root, self.device = base, parser, root, device
        self.metrics, self.spec, self.overwrite = metrics, asdict(spec), overwrite
        self.backbone = None

    def run_all(self, jobs, label: str, position: int) -> list[dict]:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        records, failed = [], 0
        bar = tqdm(total=len(jobs), desc=label, unit="job", position=position, file=sys.stderr, dynamic_ncols=True)
        with bar, logging_redirect_tqdm(loggers=[log]):
            for job in jobs:
                records.append(self.run_one(job))
                failed += records[-1]["status"] != "ok"
                bar.set_postfix_str(
                    f"done {len(records) - failed}, failed {failed}, left {len(jobs) - len(records)}", refresh=False
                )
                bar.update(1)
        return records

    def run_one(self, job) -> dict:
        out = self.root / job.name
        record = {
            "job": job.name,
            "line": job.line,
            "status": "failed",
            "seconds": 0.0,
            "output": str(out),
            "metrics": {},
            "error": None,
            "settings": None,
            "metrics_spec": self.spec,
            "reused": False,
        }
        start = time.perf_counter()
        try:
            cfg = self.config(job)
            record["settings"] = settings_hash(self.parser, cfg)
            earlier = read_record(out)
            if not self.overwrite and finished(earlier, record["settings"], out):
                return self.reuse(earlier, cfg, out)
            (out / "job.json").unlink(missing_ok=True)  # outputs about to change: not finished until rewritten
            result = self.edit(cfg)
            record["metrics"] = self.measure(cfg, result.image, result.plan, out)
            missing = [name for name in OUTPUTS if not (out / name).is_file()]
            if missing:
                raise RuntimeError(f"the edit ended without writing {', '.join(missing)}")
            record["status"] = "ok"
        except KeyboardInterrupt:
            raise
        except Exception as e:
            record["error"] = one_line(e)
            if isinstance(e, GasError):
                log.warning("job %s (line %d) failed: %s", job.name, job.line, record["error"])
            else:
                log.warning("job %s (line %d) failed: %s", job.name, job.line, record["error"], exc_info=True)
        record["seconds"] = round(time.perf_counter() - start, 3)
        write_record(record, out)
        return record

    def config(self, job):
        """The job's gas-edit config: its edit replaces the config's, its keys override the batch's."""
        from jsonargparse import ArgumentError

        from gas_lightning.api import EDIT_KEYS

        overrides: dict[str, Any] = dict.fromkeys(EDIT_KEYS)
        overrides.update(job.settings)
        overrides["output_dir"] = str(self.root / job.name)
        overrides["overwrite"] = True  # the batch owns DIR/<name>; an unfinished job starts again
        trainer = dict(overrides.get("trainer") or {})
        trainer.update(
            enable_progress_bar=False,
            enable_model_summary=False,
            num_nodes=1,
            strategy="auto",
            **_one_device(self.device),
        )
        overrides["trainer"] = trainer
        try:
            return self.parser.parse_object(overrides, namespace=self.base.clone())
        except ArgumentError as e:
            raise GasError(f"line {job.line}: {' '.join(str(e).split())[:300]}") from None

    def edit(self, cfg):
        from gas_lightning.runner import run_edit

        if self.backbone is None:  # loaded for the first job that runs, not for a rerun that skips them all
            from gas_lightning.loading import load_backbone
            from gas_lightning.resolve import resolve_bundled

            self.backbone = load_backbone(
                resolve_bundled(cfg.model),
                device=str(self.device),
                dtype=cfg.dtype,
                attention=cfg.attention,
                allow_pickle_weights=cfg.allow_pickle_weights,
            )
        with single_process(), _quiet():
            return run_edit(cfg, self.parser, backbone=self.backbone)

    def measure(self, cfg, edited, plan, out: Path) -> dict:
        from gas_lightning.io import atomic_write
        from gas_lightning.pipeline import load_image
        from gas_lightning.report import summary
        from gas_lightning.resolve import resolve_bundled

        values = self.metrics(load_image(resolve_bundled(cfg.image)), edited, plan)
        if (out / "report.json").is_file():  # the edit's own check (docs/guide/checking.md), summarised
            values.update(summary(json.loads((out / "report.json").read_text())))
        with atomic_write(out / "metrics.json", "w") as f:
            f.write(json.dumps(values, indent=2) + "\n")
        return values

    def reuse(self, earlier: dict, cfg, out: Path) -> dict:
        """A finished job; its metrics are computed again only when other metrics were asked for."""
        from PIL import Image

        from gas_lightning.plan import EditPlan

        record = {**earlier, "reused": True}
        if earlier.get("metrics_spec") != self.spec:
            with Image.open(out / "edited.png") as im:
                record["metrics"] = self.measure(cfg, im.convert("RGB"), EditPlan.load(out / "plan.json"), out)
            record["metrics_spec"] = self.spec
            write_record({**record, "reused": False}, out)
        return record


def _one_device(device) -> dict:
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    return {"accelerator": device.type, "devices": 1}


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())[:300]
    if isinstance(error, GasError):
        return text
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return f"out of memory ({text})"
    return f"internal error: {type(error).__name__}: {text}"


@contextmanager
def single_process() -> Iterator[None]:
    """While a job runs, the process looks like a lone one: no cluster variables for the Trainer's
    environment detection (and runner.is_child_rank), rank 0 for Lightning's rank-zero-only outputs."""
    from lightning.pytorch.utilities import rank_zero_only

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k in CLUSTER_VARS or k.startswith(CLUSTER_PREFIXES)}
    rank = rank_zero_only.rank
    rank_zero_only.rank = 0
    try:
        yield
    finally:
        os.environ.update(saved)
        rank_zero_only.rank = rank


@contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's and the runner's per-edit notices would repeat once a job; warnings still show."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "gas_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
