"""The jobs file of `gas-edit batch`: one JSON object per line, read strictly before any edit runs.

A line names the job (its output folder), the image and the edit in one of the plan forms, and may
set any other gas-edit key for that job alone (`{"guidance": {"guidance_scale": 7.5}}`). What
belongs to the whole batch (the model, the output folder, the devices) cannot be set per job.
Lines are bounded in size, must be JSON objects without duplicate keys or NaN, and names are
plain folder names; every mistake is one error that names the file and line. Relative paths
(`image`, `plan`) are read from the jobs file's folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gas_lightning.errors import GasError

MAX_LINE_BYTES = 64 * 1024
MAX_JOBS = 1_000_000
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_NAMES = {"summary.json", "summary.csv"}
PLAN_FORMS = (("request",), ("source", "target"), ("plan",), ("sources", "targets"))
BATCH_KEYS = {
    "model": "--model",
    "dtype": "--dtype",
    "attention": "--attention",
    "allow_pickle_weights": "--allow_pickle_weights",
    "output_dir": "--output_dir",
    "resume": None,
    "overwrite": "--overwrite",
    "plan_only": None,
    "config": "--config",
    "debug": "--debug",
    "jobs": None,
    "metrics": "--metrics.*",
    "print_config": None,
}
BATCH_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy")
FORMAT = (
    'each line is one JSON object such as {"name": "dog1", "image": "dog.png", "request": '
    '"change the dog into a cat.", "boxes": [[0.3, 0.4, 0.7, 0.9]], "seed": 0}'
)


@dataclass(frozen=True)
class Job:
    """One line of the jobs file: its name (the output folder) and the gas-edit keys it sets."""

    name: str
    line: int
    settings: dict[str, Any] = field(default_factory=dict)


def read_jobs(path: str | Path, known: Any = None) -> list[Job]:
    """Every job of the file, in order; `known` (a parsed gas-edit config) lets keys be checked here,
    so a misspelt key stops the batch before the first edit instead of failing one job."""
    path = Path(path)
    if not path.is_file():
        raise GasError(f"--jobs {str(path)!r}: no such file; {FORMAT}")
    jobs: list[Job] = []
    names: dict[str, int] = {}
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            number += 1
            where = f"{path}, line {number}"
            if len(raw) > MAX_LINE_BYTES:
                raise GasError(
                    f"{where} is longer than {MAX_LINE_BYTES // 1024} KiB; {FORMAT} (a plan goes in a "
                    'plan.json file named by "plan")'
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise GasError(f"{where} is not UTF-8 text; save the jobs file as UTF-8") from None
            if not text.strip():
                continue
            job = _parse_line(text, number, where, path.parent, known)
            first = names.setdefault(job.name.casefold(), number)
            if first != number:
                raise GasError(
                    f"{where}: the name {job.name!r} is already used on line {first} (names are output "
                    "folders, compared without case); give every job its own name"
                )
            jobs.append(job)
            if len(jobs) > MAX_JOBS:
                raise GasError(f"{path} holds more than {MAX_JOBS} jobs; split it into several files")
    if not jobs:
        raise GasError(f"--jobs {str(path)!r} holds no jobs; {FORMAT}")
    return jobs


def _parse_line(text: str, number: int, where: str, folder: Path, known: Any) -> Job:
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise GasError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); {FORMAT}") from None
    except ValueError as e:
        raise GasError(f"{where}: {e}") from None
    if not isinstance(obj, dict):
        raise GasError(f"{where} is a JSON {type(obj).__name__}, not an object; {FORMAT}")
    settings = dict(obj)
    name = settings.pop("name", None)
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise GasError(
            f"{where}: \"name\" must be a folder name of letters, digits, '.', '_' or '-' (at most 128, "
            f"starting with a letter or digit, not summary.json/summary.csv), got {name!r}"
        )
    for key, flag in BATCH_KEYS.items():
        if key in settings:
            how = f"set it for the whole batch with {flag}" if flag else "it has no meaning in a batch"
            raise GasError(f"{where}: {key!r} cannot be set per job; {how}")
    trainer = settings.get("trainer", {})
    if not isinstance(trainer, dict):
        raise GasError(f'{where}: "trainer" must be an object of Trainer settings, got {trainer!r}')
    for key in BATCH_TRAINER_KEYS:
        if key in trainer:
            raise GasError(
                f"{where}: trainer.{key} cannot be set per job; each process edits on its own device "
                "(set --trainer.devices / --trainer.num_nodes for the whole batch)"
            )
    image = settings.get("image")
    if not isinstance(image, str) or not image.strip():
        raise GasError(f'{where}: "image" must name the image file to edit, got {image!r}')
    forms = [form for form in PLAN_FORMS if any(k in settings and settings[k] is not None for k in form)]
    if len(forms) != 1:
        given = " and ".join("+".join(f) for f in forms) or "no edit"
        raise GasError(
            f'{where}: {given} given; give exactly one of "request", "source"+"target", "plan" '
            '(a plan.json path) or "sources"+"targets"'
        )
    missing = [k for k in forms[0] if not settings.get(k)]
    if missing:
        raise GasError(f"{where}: {'+'.join(forms[0])} go together; {missing[0]!r} is missing or empty")
    if "seed" in settings and (not isinstance(settings["seed"], int) or isinstance(settings["seed"], bool)):
        raise GasError(f'{where}: "seed" must be an integer, got {settings["seed"]!r}')
    for key in ("image", "plan"):
        if isinstance(settings.get(key), str):
            settings[key] = _beside(settings[key], folder)
    if known is not None:
        unknown = _unknown_keys(settings, known)
        if unknown:
            raise GasError(
                f"{where}: unknown key {unknown!r}; a job sets name, image, the edit, boxes, seed and any "
                "gas-edit key (see gas-edit --print_config)"
            )
    return Job(name=name, line=number, settings=settings)


def _beside(value: str, folder: Path) -> str:
    """A path relative to the jobs file's folder; bundled names (gas-lightning:...) stay as they are."""
    from gas_lightning.resolve import BUNDLED_PREFIX

    if value.startswith(BUNDLED_PREFIX):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (folder / path).resolve())


def _unknown_keys(settings: dict, known: Any, prefix: str = "") -> str | None:
    """The first key that is not a gas-edit key; class_path values (optimizer, callbacks) are left to the parser."""
    from jsonargparse import Namespace

    for key, value in settings.items():
        if not isinstance(key, str) or key not in known:
            return prefix + str(key)
        inner = known[key]
        if isinstance(value, dict) and isinstance(inner, Namespace) and "class_path" not in inner:
            found = _unknown_keys(value, inner, f"{prefix}{key}.")
            if found:
                return found
    return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number; give a finite value")
