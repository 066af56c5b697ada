"""What a batch keeps of each job and of the whole: DIR/<name>/job.json, DIR/summary.json and .csv.

job.json is written last and atomically, so its presence with status ok and the hash of the job's
resolved settings is what "finished" means; the summary is assembled from the records at the end.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from gas_lightning.errors import GasError
from gas_lightning.io import atomic_write

OUTPUTS = ("edited.png", "latent.pt", "plan.json", "config.yaml", "metrics.json")
COLUMNS = ("job", "status", "reused", "seconds", "output")


def settings_hash(parser, cfg) -> str:
    """sha256 of the resolved config (where it is written and on which device index aside) and of
    the bytes of the image and plan files it reads."""
    from gas_lightning.resolve import resolve_bundled

    c = cfg.clone()
    c.output_dir, c.trainer.devices = "", None
    digest = hashlib.sha256(parser.dump(c, skip_validation=True).encode())
    for path in (cfg.image, cfg.plan):
        if path is None:
            continue
        try:
            digest.update(Path(resolve_bundled(path)).read_bytes())
        except (OSError, GasError):
            digest.update(b"unreadable")
    return digest.hexdigest()


def finished(record: dict | None, digest: str, out: Path) -> bool:
    return (
        record is not None
        and record.get("status") == "ok"
        and record.get("settings") == digest
        and all((out / name).is_file() for name in OUTPUTS)
    )


def read_record(out: Path) -> dict | None:
    try:
        record = json.loads((out / "job.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(record: dict, out: Path) -> None:
    """job.json, atomically and last: present means the job's other files are complete."""
    with atomic_write(out / "job.json", "w") as f:
        f.write(json.dumps({k: v for k, v in record.items() if k != "reused"}, indent=2) + "\n")


def metric_names(records: list[dict]) -> list[str]:
    names: list[str] = []
    for r in records:
        names += [k for k in (r.get("metrics") or {}) if k not in names]
    return names


def write_summary(records: list[dict], root: Path) -> None:
    """summary.json holds every record as written; summary.csv one column per metric."""
    rows = [{k: r.get(k) for k in (*COLUMNS, "metrics", "error", "line")} for r in records]
    with atomic_write(root / "summary.json", "w") as f:
        f.write(
            json.dumps(
                {
                    "jobs": rows,
                    "ok": sum(r["status"] == "ok" for r in rows),
                    "failed": sum(r["status"] != "ok" for r in rows),
                },
                indent=2,
            )
            + "\n"
        )
    names = metric_names(records)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*COLUMNS, *names, "error"])
    for r in records:
        metrics = r.get("metrics") or {}
        writer.writerow([r.get(k) for k in COLUMNS] + [metrics.get(n) for n in names] + [r.get("error") or ""])
    with atomic_write(root / "summary.csv", "w") as f:
        f.write(buffer.getvalue())


def print_table(records: list[dict], root: Path) -> None:
    names = [n for n in metric_names(records) if n != "outside_fraction"]
    header = ["job", "status", "seconds", *names, "error"]
    rows = []
    for r in records:
        metrics = r.get("metrics") or {}
        status = r["status"] + (" (earlier)" if r.get("reused") else "")
        cells = [r["job"][:40], status, f"{r.get('seconds') or 0:.1f}"]
        cells += [_fmt(metrics.get(n)) for n in names]
        rows.append(cells + [(r.get("error") or "")[:100]])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for cells in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
    ok = sum(r["status"] == "ok" for r in records)
    reused = sum(bool(r.get("reused")) for r in records)
    print(
        f"{len(records)} jobs: {ok} ok ({reused} from an earlier run), {len(records) - ok} failed; "
        f"{root / 'summary.json'}, {root / 'summary.csv'}"
    )


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
