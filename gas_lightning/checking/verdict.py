"""One subtask's verdict after an edit: done, not done or unsure, with the scores that decided it.

Kept as plain data (and JSON) so the report, plan records, the batch summary and the app read the
same thing, and so that a refine pass can pick what to run again without knowing how it was judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from PIL import Image

from gas_lightning.plan import EditPlan

DONE, NOT_DONE, UNSURE = "done", "not done", "unsure"
VERDICTS = (DONE, NOT_DONE, UNSURE)


@dataclass(frozen=True)
class Verdict:
    """Subtask `index` of the plan, judged. `scores` are in [0, 1]; `why` says which rule decided."""

    index: int
    source: str
    target: str
    keep: bool
    verdict: str
    scores: dict[str, float] = field(default_factory=dict)
    why: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    @property
    def passed(self) -> bool:
        return self.verdict == DONE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scores": {k: round(float(v), 4) for k, v in self.scores.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(**data)


class Checker(Protocol):
    """Judges every subtask of `plan` from the source and the edited image alone (no ground truth)."""

    name: str

    def __call__(self, source: Image.Image, edited: Image.Image, plan: EditPlan) -> list[Verdict]: ...


def vote(votes: Sequence[str]) -> str:
    """Several signals' verdicts -> one: all agree, or unsure (an empty vote is unsure too)."""
    return votes[0] if votes and all(v == votes[0] for v in votes) else UNSURE


def by_threshold(score: float, done_at: float, failed_below: float) -> str:
    """done at or above `done_at`, not done below `failed_below`, unsure between."""
    if score >= done_at:
        return DONE
    return NOT_DONE if score < failed_below else UNSURE


def counts(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """How many edit subtasks (keep subtasks apart) got each verdict."""
    out = {v: 0 for v in VERDICTS}
    for v in verdicts:
        if not v.keep:
            out[v.verdict] += 1
    return out
