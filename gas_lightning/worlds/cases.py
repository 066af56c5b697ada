"""Seeded edit cases: a source scene, the requested changes, and the ideal result.

Because the world is procedural, every case comes with its exact answer: the target scene
(same layout, changed attributes), rendered pixel-perfectly, plus the EditPlan and the request
text a user would type. Cases are drawn from seed sequences salted apart from the training
stream, so held-out cases are never the images the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from gas_lightning.plan import WHOLE_IMAGE, EditPlan, Subtask
from gas_lightning.worlds.scenes import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_SIZE,
    SHAPES,
    Scene,
    caption_of,
    render,
    sample_scene,
)

CASE_SALT = 0x6A5  # keeps case seeds apart from the training stream (default_rng(seed))
KINDS = ("colour", "shape", "background")


@dataclass(frozen=True)
class Change:
    """One requested attribute change. `index` is the object (None for the background)."""

    kind: str  # "colour" | "shape" | "background"
    index: int | None
    before: str
    after: str


@dataclass(frozen=True)
class EditCase:
    source: Scene
    target: Scene
    changes: tuple[Change, ...]
    seed: int | None = None

    @property
    def size(self) -> int:
        return self.source.size

    @cached_property
    def source_image(self) -> np.ndarray:
        return render(self.source)

    @cached_property
    def target_image(self) -> np.ndarray:
        return render(self.target)

    @property
    def edited_objects(self) -> list[int]:
        return sorted({c.index for c in self.changes if c.index is not None})

    @property
    def background_changed(self) -> bool:
        return any(c.kind == "background" for c in self.changes)

    def object_box(self, i: int) -> tuple[float, float, float, float]:
        """Normalised box covering object i before and after the edit."""
        a, b = self.source.box(i), self.target.box(i)
        return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))

    @property
    def kept_objects(self) -> list[int]:
        return [i for i in range(len(self.source.objects)) if i not in self.edited_objects]

    @property
    def plan(self) -> EditPlan:
        return self.edit_plan(keep=True)

    def edit_plan(self, keep: bool = True) -> EditPlan:
        """One subtask per edited object (phrase -> phrase, exact box), one for the background,
        and with `keep` one keep subtask (phrase -> itself) per object that must not change."""
        subtasks = [
            Subtask(source=self.source.objects[i].phrase, target=self.target.objects[i].phrase, box=self.object_box(i))
            for i in self.edited_objects
        ]
        if self.background_changed:
            subtasks.append(Subtask(source=self.source.background, target=self.target.background, box=WHOLE_IMAGE))
        plan = EditPlan(source_prompt=self.source.caption, target_prompt=self.target.caption, subtasks=tuple(subtasks))
        if keep and self.kept_objects:
            plan = plan.with_keep(
                [self.source.objects[i].phrase for i in self.kept_objects],
                [self.source.box(i) for i in self.kept_objects],
            )
        return plan

    @property
    def request(self) -> str:
        return self.request_text(keep=True)

    def request_text(self, keep: bool = True) -> str:
        """The request a user would type: "change the red circle into a yellow circle. change the
        snow into sand. keep the blue square." """
        parts = [
            f"change the {self.source.objects[i].colour} {self.source.objects[i].shape} into {self.target.objects[i].phrase}."
            for i in self.edited_objects
        ]
        if self.background_changed:
            parts.append(f"change the {self.source.background} into {self.target.background}.")
        if keep:
            parts += [
                f"keep the {self.source.objects[i].colour} {self.source.objects[i].shape}." for i in self.kept_objects
            ]
        return " ".join(parts)


def _distinct(scene: Scene) -> bool:
    kinds = [(o.shape, o.colour) for o in scene.objects]
    return len(set(kinds)) == len(kinds)


def make_case(source: Scene, changes: list[Change] | tuple[Change, ...], seed: int | None = None) -> EditCase:
    """Apply `changes` to `source`; the layout (footprints) stays, attributes change."""
    objects = list(source.objects)
    background = source.background
    for c in changes:
        if c.kind == "background":
            background = c.after
        elif c.kind == "colour":
            objects[c.index] = replace(objects[c.index], colour=c.after)
        elif c.kind == "shape":
            objects[c.index] = replace(objects[c.index], shape=c.after)
        else:
            raise ValueError(f"unknown change kind {c.kind!r}; known: {', '.join(KINDS)}")
    target = replace(source, objects=tuple(objects), background=background)
    return EditCase(source=source, target=target, changes=tuple(changes), seed=seed)


def sample_case(
    seed: int,
    size: int = DEFAULT_SIZE,
    n_objects: tuple[int, int] = (2, 3),
    n_changes: tuple[int, int] = (2, 3),
    kinds: tuple[str, ...] = KINDS,
    kind_weights: dict[str, float] | None = None,
) -> EditCase:
    """A random case: a scene with n_objects, and n_changes distinct attribute changes.

    Each edited object changes one attribute (colour or shape); the background counts as one
    change. Cases where two objects would be identical (same colour and shape) before or after
    the edit are skipped, so every source phrase names exactly one object; so are cases where an
    edited object would take the colour and shape of an object in the source scene.
    """
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown change kind {k!r}; known: {', '.join(KINDS)}")
    weights = {"colour": 2.0, "shape": 1.0, "background": 1.0, **(kind_weights or {})}
    rng = np.random.default_rng([CASE_SALT, int(seed)])
    while True:
        scene = sample_scene(rng, size=size, n_objects=int(rng.integers(n_objects[0], n_objects[1] + 1)))
        want = int(rng.integers(n_changes[0], n_changes[1] + 1))
        slots = [("background", None)] if "background" in kinds else []
        object_kinds = [k for k in kinds if k != "background"]
        if object_kinds:
            slots += [("object", i) for i in range(len(scene.objects))]
        if len(slots) < want:
            continue
        changes = []
        for s in rng.permutation(len(slots))[:want]:
            what, i = slots[s]
            if what == "background":
                after = _other(rng, list(BACKGROUNDS), scene.background)
                changes.append(Change("background", None, scene.background, after))
                continue
            p = np.array([weights[k] for k in object_kinds], dtype=float)
            kind = object_kinds[int(rng.choice(len(object_kinds), p=p / p.sum()))]
            o = scene.objects[i]
            if kind == "colour":
                changes.append(Change("colour", i, o.colour, _other(rng, list(COLOURS), o.colour)))
            else:
                changes.append(Change("shape", i, o.shape, _other(rng, list(SHAPES), o.shape)))
        changes.sort(key=lambda c: (c.index is None, c.index if c.index is not None else 0))
        case = make_case(scene, changes, seed=seed)
        if _distinct(case.source) and _distinct(case.target) and not _chained(case):
            return case


def _chained(case: EditCase) -> bool:
    """True when an edited object becomes what another object was ("red square" -> "yellow
    square" while a yellow square exists): legal, but such requests read ambiguously."""
    before = {(o.shape, o.colour) for o in case.source.objects}
    return any((case.target.objects[i].shape, case.target.objects[i].colour) in before for i in case.edited_objects)


def _other(rng: np.random.Generator, names: list[str], current: str) -> str:
    choices = [n for n in names if n != current]
    return choices[int(rng.integers(len(choices)))]


def held_out_cases(n: int, seed: int = 0, **kwargs) -> list[EditCase]:
    """The evaluation set: n cases from seeds seed*100000 + 0..n-1 (salted apart from training)."""
    return [sample_case(seed * 100_000 + i, **kwargs) for i in range(n)]


__all__ = ["Change", "EditCase", "make_case", "sample_case", "held_out_cases", "example_case", "caption_of"]


def example_case(size: int = DEFAULT_SIZE) -> EditCase:
    """The README example (assets/example.png and example_request.txt) as a scorable case."""
    from gas_lightning.worlds.scenes import SceneObject

    def geom(x: int, y: int, s: int) -> tuple[float, float, float, float]:
        return (x / 32, y / 32, (x + s) / 32, (y + s) / 32)

    source = Scene(
        objects=(
            SceneObject("circle", "red", geom(3, 4, 12)),
            SceneObject("square", "blue", geom(18, 4, 11)),
            SceneObject("triangle", "orange", geom(10, 18, 12)),
        ),
        background="snow",
        size=size,
    )
    return make_case(
        source,
        [
            Change("colour", 0, "red", "yellow"),
            Change("colour", 1, "blue", "green"),
            Change("background", None, "snow", "sand"),
        ],
    )
