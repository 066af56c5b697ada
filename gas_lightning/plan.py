"""The edit plan: what to change, where, and how strongly.

A plan is the one object that every upstream stage produces (request parsers, sentence diff,
LLM planner, detectors add boxes) and every downstream stage consumes (masks, the module).
It is plain data, validated on construction and round-tripped through JSON so that a user can
inspect, edit and re-run exactly what the edit used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gas_lightning.errors import PlanError

Box = tuple[float, float, float, float]
WHOLE_IMAGE: Box = (0.0, 0.0, 1.0, 1.0)  # the region of a subtask without a box, and of the background

MAX_SUBTASKS = 16
_OPTIONAL_KEYS = ("mask", "mask_label")
MAX_PHRASE_CHARS = 300


def _check_phrase(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise PlanError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    text = " ".join(value.split())
    if not text:
        raise PlanError(f"{what} is empty; give a short phrase such as 'a dog'.")
    if len(text) > MAX_PHRASE_CHARS:
        raise PlanError(f"{what} is {len(text)} characters long; keep it under {MAX_PHRASE_CHARS}.")
    return text


def check_box(box: Any, what: str = "box") -> Box:
    """Validate a normalised xyxy box and return it as a tuple of floats."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise PlanError(f"{what} must be 4 numbers [x0, y0, x1, y1] in [0, 1], got {box!r}")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise PlanError(f"{what} must be 4 numbers [x0, y0, x1, y1] in [0, 1], got {box!r}") from None
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise PlanError(
            f"{what} {list(box)} has coordinates that are NaN, infinite or outside [0, 1]; boxes are normalised "
            "(divide pixel coordinates by the image width and height)."
        )
    if x0 >= x1 or y0 >= y1:
        raise PlanError(f"{what} {list(box)} is empty: need x0 < x1 and y0 < y1 (xyxy order).")
    return (x0, y0, x1, y1)


def head_noun(phrase: str) -> str:
    """The phrase's last word, lower case: 'the red circle' -> 'circle'."""
    words = "".join(c if c.isalnum() else " " for c in phrase.lower()).split()
    return words[-1] if words else ""


@dataclass(frozen=True)
class Subtask:
    """One object-level edit: `source` in the image becomes `target`, inside `box` (or `mask`).

    `intensity` scales this subtask's gradient (0 disables it). `preserve_form` adds the
    contrastive shape-keeping term. `penalty` forces the null-text penalty on (True) or off
    (False); None lets the NullTextPenalty callback decide from the box area. `mask` (a PNG
    path or a PNG data URI) replaces the box as the region the gradient acts on; the box stays
    for grounding, pictures and the area rules. `mask_label` reads the mask as a label map: the
    pixels of that value are this subtask's.
    """

    source: str
    target: str
    box: Box | None = None
    preserve_form: bool = False
    intensity: float = 1.0
    penalty: bool | None = None
    mask: str | None = None
    mask_label: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _check_phrase(self.source, "source phrase"))
        object.__setattr__(self, "target", _check_phrase(self.target, f"target phrase for '{self.source}'"))
        if self.box is not None:
            object.__setattr__(self, "box", check_box(self.box, f"box of '{self.source}'"))
        if not isinstance(self.preserve_form, bool):
            if self.preserve_form in (0, 1):
                object.__setattr__(self, "preserve_form", bool(self.preserve_form))
            else:
                raise PlanError(
                    f"preserve_form of '{self.source}' must be true/false (or 0/1), got {self.preserve_form!r}"
                )
        try:
            intensity = float(self.intensity)
        except (TypeError, ValueError):
            raise PlanError(f"intensity of '{self.source}' must be a number, got {self.intensity!r}") from None
        if not (math.isfinite(intensity) and 0.0 <= intensity <= 10.0):
            raise PlanError(f"intensity of '{self.source}' must be in [0, 10], got {self.intensity!r}")
        object.__setattr__(self, "intensity", intensity)
        if self.penalty is not None and not isinstance(self.penalty, bool):
            raise PlanError(f"penalty of '{self.source}' must be true, false or null, got {self.penalty!r}")
        if self.mask is not None and (not isinstance(self.mask, str) or not self.mask.strip()):
            raise PlanError(f"mask of '{self.source}' must be a PNG path (or a PNG data URI), got {self.mask!r}")
        if self.mask_label is not None:
            if (
                isinstance(self.mask_label, bool)
                or not isinstance(self.mask_label, int)
                or not 1 <= self.mask_label <= 65535
            ):
                raise PlanError(
                    f"mask_label of '{self.source}' must be an integer in 1..65535 (the pixel value that "
                    f"marks it in a label map; 0 marks no subtask), got {self.mask_label!r}"
                )
            if self.mask is None:
                raise PlanError(f"mask_label of '{self.source}' needs a mask: the label map's path")

    @property
    def keep(self) -> bool:
        """A keep subtask names an object that must stay as it is (source == target).

        Its DDS direction is zero at the source and pulls the region back when neighbouring
        edits (a background change) drag it along; its box also claims its area under the
        overlap rule, so the larger edit around it is damped there.
        """
        return self.source.strip().lower() == self.target.strip().lower()

    @property
    def keeps_outline(self) -> bool:
        """A kept object, a preserve-form swap or a recolour ('the red circle' -> 'a blue circle'): the
        edit belongs inside the object's old outline. A shape change needs room beyond it."""
        return self.keep or self.preserve_form or head_noun(self.source) == head_noun(self.target)

    @property
    def area(self) -> float:
        """Box area as a fraction of the image (1.0 without a box)."""
        if self.box is None:
            return 1.0
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)


@dataclass(frozen=True)
class EditPlan:
    """Subtasks plus the whole-scene sentence pair that drives the down-weighted global term."""

    source_prompt: str
    target_prompt: str
    subtasks: tuple[Subtask, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_prompt", _check_phrase(self.source_prompt, "whole-scene source sentence"))
        object.__setattr__(self, "target_prompt", _check_phrase(self.target_prompt, "whole-scene target sentence"))
        subtasks = tuple(self.subtasks)
        if len(subtasks) > MAX_SUBTASKS:
            raise PlanError(f"the plan has {len(subtasks)} subtasks; at most {MAX_SUBTASKS} are supported.")
        for s in subtasks:
            if not isinstance(s, Subtask):
                raise PlanError(f"subtasks must be Subtask objects, got {type(s).__name__}")
        object.__setattr__(self, "subtasks", subtasks)

    # construction helpers -------------------------------------------------------------
    @classmethod
    def from_lists(
        cls,
        sources: Sequence[str],
        targets: Sequence[str],
        source_prompt: str | None = None,
        target_prompt: str | None = None,
        boxes: Sequence[Sequence[float]] | None = None,
        preserve_form: Sequence[bool | int] | None = None,
        intensities: Sequence[float] | None = None,
    ) -> EditPlan:
        """Build a plan from parallel lists, the form configs and LLM replies use."""
        for name, values in (("sources", sources), ("targets", targets), ("preserve_form", preserve_form)):
            if isinstance(values, str):
                raise PlanError(f"{name} must be a list (one entry per subtask), got the string {values!r}")
        n = len(sources)
        for name, values in (
            ("targets", targets),
            ("boxes", boxes),
            ("preserve_form", preserve_form),
            ("intensities", intensities),
        ):
            if values is not None and len(values) != n:
                raise PlanError(
                    f"{len(values)} {name} for {n} source phrases: give one per subtask, in the same order."
                )
        subtasks = tuple(
            Subtask(
                source=sources[i],
                target=targets[i],
                box=None if boxes is None else boxes[i],
                preserve_form=False if preserve_form is None else preserve_form[i],
                intensity=1.0 if intensities is None else intensities[i],
            )
            for i in range(n)
        )
        src = source_prompt if source_prompt is not None else join_phrases([s.source for s in subtasks])
        tgt = target_prompt if target_prompt is not None else join_phrases([s.target for s in subtasks])
        return cls(source_prompt=src, target_prompt=tgt, subtasks=subtasks)

    def with_boxes(self, boxes: Sequence[Sequence[float] | None]) -> EditPlan:
        """Return a copy whose subtasks carry `boxes` (one per subtask, in order)."""
        if len(boxes) != len(self.subtasks):
            raise PlanError(
                f"{len(boxes)} boxes for {len(self.subtasks)} subtasks "
                f"({', '.join(repr(s.source) for s in self.subtasks)}): give one box per subtask, in order."
            )
        return replace(self, subtasks=tuple(replace(s, box=b) for s, b in zip(self.subtasks, boxes)))

    def with_keep(self, phrases: Sequence[str], boxes: Sequence[Sequence[float] | None] | None = None) -> EditPlan:
        """Append one keep subtask (phrase -> itself, no null-text penalty) per phrase."""
        if isinstance(phrases, str):
            raise PlanError(f"keep must be a list of phrases, got the string {phrases!r}")
        if boxes is not None and len(boxes) != len(phrases):
            raise PlanError(f"{len(boxes)} boxes for {len(phrases)} keep phrases: give one per phrase, in order.")
        keep = [
            Subtask(source=p, target=p, box=None if boxes is None else boxes[i], penalty=False)
            for i, p in enumerate(phrases)
        ]
        return self.replace_subtasks(list(self.subtasks) + keep)

    def with_masks(self, masks: Sequence[str | None], labels: Sequence[int | None] | None = None) -> EditPlan:
        """Return a copy whose subtasks carry `masks` (PNG paths, in order); None keeps a subtask's region."""
        if isinstance(masks, str):
            raise PlanError(f"masks must be a list (one PNG per subtask), got the string {masks!r}")
        if len(masks) != len(self.subtasks):
            raise PlanError(
                f"{len(masks)} masks for {len(self.subtasks)} subtasks "
                f"({', '.join(repr(s.source) for s in self.subtasks)}): give one PNG per subtask, in order "
                "(null for a subtask that keeps its box), or one label-map PNG."
            )
        labels = labels if labels is not None else [None] * len(masks)
        return replace(
            self,
            subtasks=tuple(
                s if m is None else replace(s, mask=m, mask_label=lab)
                for s, m, lab in zip(self.subtasks, masks, labels)
            ),
        )

    def replace_subtasks(self, subtasks: Sequence[Subtask]) -> EditPlan:
        return replace(self, subtasks=tuple(subtasks))

    @property
    def grounded(self) -> bool:
        """True when every subtask has a box (a mask's box is filled in when masks are checked)."""
        return all(s.box is not None for s in self.subtasks)

    # serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; `mask`/`mask_label` appear only when set, so box plans read as before."""
        out = asdict(self)
        out["subtasks"] = []
        for s in self.subtasks:
            d = {**asdict(s), "box": None if s.box is None else [round(v, 6) for v in s.box]}
            out["subtasks"].append({k: v for k, v in d.items() if v is not None or k not in _OPTIONAL_KEYS})
        return out

    @classmethod
    def from_dict(cls, data: Any) -> EditPlan:
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"source_prompt", "target_prompt", "subtasks"}
        if unknown:
            raise PlanError(f"unknown plan keys {sorted(unknown)}; expected source_prompt, target_prompt, subtasks.")
        if "subtasks" not in data:
            raise PlanError(
                "the plan has no 'subtasks' list; give one object per edited object "
                '({"source": ..., "target": ..., "box": ...}), or [] for a whole-image edit.'
            )
        raw = data["subtasks"]
        if not isinstance(raw, list):
            raise PlanError("plan 'subtasks' must be a list of objects")
        fields = {"source", "target", "box", "preserve_form", "intensity", "penalty", *_OPTIONAL_KEYS}
        subtasks = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise PlanError(f"subtask {i} must be an object, got {type(item).__name__}")
            bad = set(item) - fields
            if bad:
                raise PlanError(f"subtask {i} has unknown keys {sorted(bad)}; allowed: {sorted(fields)}")
            if "source" not in item or "target" not in item:
                raise PlanError(f"subtask {i} needs both 'source' and 'target'")
            subtasks.append(Subtask(**item))
        src = data.get("source_prompt") or join_phrases([s.source for s in subtasks])
        tgt = data.get("target_prompt") or join_phrases([s.target for s in subtasks])
        return cls(source_prompt=src, target_prompt=tgt, subtasks=tuple(subtasks))

    def save(self, path: str | Path) -> None:
        from gas_lightning.io import atomic_write  # a kill mid-write leaves the old plan.json whole

        with atomic_write(path, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EditPlan:
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file {str(p)!r} " + ("is a directory" if p.is_dir() else "does not exist"))
        try:
            data = json.loads(p.read_text(), parse_constant=_refuse_constant)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {str(p)!r} is not valid JSON: {e}") from None
        except UnicodeDecodeError:
            raise PlanError(
                f"plan file {str(p)!r} is not text (UTF-8 JSON); pass the plan.json an edit wrote"
            ) from None
        except PlanError as e:
            raise PlanError(f"plan file {str(p)!r}: {e}") from None
        plan = cls.from_dict(data)
        # a relative mask path means "beside the plan file", wherever the edit is run from
        return plan.replace_subtasks(
            [
                s
                if s.mask is None or s.mask.startswith("data:") or Path(s.mask).is_absolute()
                else replace(s, mask=str(p.parent / s.mask))
                for s in plan.subtasks
            ]
        )


def _refuse_constant(name: str) -> float:
    """Python's json reads NaN and Infinity, which JSON itself does not allow; a plan never needs them."""
    raise PlanError(f"{name} is not a number a plan may hold (JSON numbers are finite); give a finite value.")


def join_phrases(phrases: Sequence[str]) -> str:
    """'a', 'b', 'c' -> 'a, b and c': the derived whole-scene sentence."""
    phrases = [p for p in phrases if p]
    if not phrases:
        return ""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]
