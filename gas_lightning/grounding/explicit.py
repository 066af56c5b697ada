"""Boxes typed by the user (`--boxes '[[0.1, 0.2, 0.5, 0.6], ...]'`).

Parsed with json only (never eval), so a typo is a clear message instead of surprising code.
A `null` entry leaves that subtask to the detector; one flat box is accepted for one subtask.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from PIL import Image

from gas_lightning.errors import PlanError
from gas_lightning.plan import Box, EditPlan, check_box

_FORMAT = (
    "--boxes takes a JSON list of [x0, y0, x1, y1] boxes normalised to [0, 1], e.g. '[[0.1, 0.2, 0.5, 0.6], null]'"
)


def parse_boxes(text: str | Sequence[Any], count: int | None = None) -> list[Box | None]:
    """Parse and validate user boxes; `count` (the number of subtasks) checks the length.

    Also accepts an already-parsed list (from a YAML/JSON config).
    """
    if isinstance(text, str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"--boxes is not valid JSON ({e.msg} at character {e.pos}). {_FORMAT}.") from None
    else:
        data = text
    if (
        isinstance(data, (list, tuple))
        and len(data) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
    ):
        data = [data]  # one flat box
    if not isinstance(data, (list, tuple)) or not data:
        raise PlanError(f"--boxes must be a non-empty list, got {data!r}. {_FORMAT}.")
    boxes: list[Box | None] = []
    for i, item in enumerate(data):
        if item is None:
            boxes.append(None)
            continue
        if not isinstance(item, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in item
        ):
            raise PlanError(f"--boxes entry {i} must be 4 numbers or null, got {item!r}. {_FORMAT}.")
        boxes.append(check_box(item, f"--boxes entry {i}"))
    if count is not None and len(boxes) != count:
        raise PlanError(
            f"--boxes has {len(boxes)} boxes for {count} subtasks: give one per subtask, in order "
            "(null for one the detector should find)."
        )
    return boxes


def apply_boxes(plan: EditPlan, boxes: Sequence[Box | None]) -> EditPlan:
    """Give the plan the user's boxes; a null keeps the box the plan already had (if any)."""
    if len(boxes) != len(plan.subtasks):
        parse_boxes(list(boxes), len(plan.subtasks))  # raises the length message
    return plan.with_boxes([b if b is not None else s.box for s, b in zip(plan.subtasks, boxes)])


class ExplicitGrounder:
    """A fixed answer, one box per phrase in order: handy in tests and scripted runs."""

    def __init__(self, boxes: Sequence[Sequence[float]]):
        self.boxes = [check_box(b, f"box {i}") for i, b in enumerate(boxes)]

    def ground(self, image: Image.Image, phrases: list[str]) -> list[Box]:
        if len(phrases) != len(self.boxes):
            raise PlanError(f"{len(self.boxes)} explicit boxes for {len(phrases)} phrases: give one per phrase.")
        return list(self.boxes)

    def __repr__(self) -> str:
        return f"ExplicitGrounder({len(self.boxes)} boxes)"
