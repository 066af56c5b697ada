"""Verdicts for shapes-world edits without weights: read each subtask's box in the edited image.

An object subtask is done when an object of the target phrase fills its box about as much as it
should (`target`: its area over the source object's, or for a shape change over the target shape's
area drawn in the source object's footprint) and no object of the source phrase is left there
(`source`: its area over the source object's). A recolour matches objects by colour alone. Shrunk
objects (erased into the ground half-way) score between the bands and come out unsure. A shape
change is also held to its outline: the edited object pixels around the source object must overlap
the target shape drawn in that footprint by IoU >= 0.5, and more than they overlap the source
shape, or a half-changed shape passes by its fill ratio alone. A recolour is held to its place: at
least half of the source object's own pixels must now carry the target colour (`in_place`), or an
object shrunk or moved inside its box would pass by its area. A background subtask compares the
share of ground pixels of the target and of the source background. Built on the same colour naming
and fill-ratio shapes as the WorldGrounder, so it needs the source image and the plan only.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from gas_lightning.checking.verdict import DONE, NOT_DONE, UNSURE, Verdict, by_threshold
from gas_lightning.plan import WHOLE_IMAGE, EditPlan, Subtask
from gas_lightning.worlds.grounder import classify_shape, components, parse_phrase
from gas_lightning.worlds.scenes import (
    BACKGROUNDS,
    COLOURS,
    PALETTE,
    SceneObject,
    coverages,
    mask_iou,
    nearest_colour_names,
)

NAMES = list(PALETTE)
# An object is there when its area is at least half the source object's; gone below a fifth.
# Between the two the object is half-erased or half-changed, which the exact scorer can count either way.
PRESENT, ABSENT = 0.5, 0.2
# A background is changed when most ground pixels are the target's and few the source's.
GROUND_DONE, GROUND_FAILED = 0.6, 0.4
MIN_PIXELS = 3  # smaller components are anti-aliasing specks
OUTLINE_IOU = 0.5  # a changed shape's outline against the target shape drawn in the source footprint


def _labels(image: Image.Image) -> np.ndarray:
    return nearest_colour_names(np.asarray(image.convert("RGB")), PALETTE)


def filled(pix: np.ndarray) -> np.ndarray:
    """The component with its holes filled: a few noisy pixels inside a square must not make it a
    circle by fill ratio. A hole is a run of other pixels that does not reach the component's box edge."""
    y0, x0 = pix.min(axis=0)
    h, w = pix.max(axis=0) - (y0, x0) + 1
    inside = np.zeros((h + 2, w + 2), dtype=bool)
    inside[pix[:, 0] - y0 + 1, pix[:, 1] - x0 + 1] = True
    for hole in components(~inside):
        if not (hole == 0).any() and not (hole[:, 0] == h + 1).any() and not (hole[:, 1] == w + 1).any():
            inside[hole[:, 0], hole[:, 1]] = True
    ys, xs = np.nonzero(inside)
    return np.stack([ys + y0 - 1, xs + x0 - 1], axis=1)


def _objects(labels: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """(colour, shape, pixels) of every object-coloured component, holes filled."""
    found = []
    for k, colour in enumerate(COLOURS):
        for pix in components(labels == k):
            if len(pix) >= MIN_PIXELS:
                whole = filled(pix)
                found.append((colour, classify_shape(whole), whole))
    return found


def _region(box, height: int, width: int) -> np.ndarray:
    """The box's pixels, grown by one pixel: a new shape may reach a little past the old one's box."""
    x0, y0, x1, y1 = box or WHOLE_IMAGE
    m = np.zeros((height, width), dtype=bool)
    m[
        max(0, int(np.floor(y0 * height)) - 1) : int(np.ceil(y1 * height)) + 1,
        max(0, int(np.floor(x0 * width)) - 1) : int(np.ceil(x1 * width)) + 1,
    ] = True
    return m


def _inside(objects, region: np.ndarray):
    """The objects with at least half their pixels in the region."""
    return [(c, s, p) for c, s, p in objects if region[p[:, 0], p[:, 1]].mean() >= 0.5]


def _silhouette(shape: str, pix: np.ndarray, size: int) -> np.ndarray:
    """`shape` drawn as the world draws it, in the footprint (pixel box) of the component `pix`."""
    (y0, x0), (y1, x1) = pix.min(axis=0), pix.max(axis=0) + 1
    return coverages([SceneObject(shape, NAMES[0], (x0 / size, y0 / size, x1 / size, y1 / size))], size)[0] >= 0.5


def _outline(target: np.ndarray, source: np.ndarray, pix: np.ndarray, after: np.ndarray, others) -> tuple[float, float]:
    """IoU of the edited object pixels around the source object `pix` (its box grown by one, other source
    objects left out) with the target and the source shape's silhouettes drawn in its footprint."""
    (y0, x0), (y1, x1) = pix.min(axis=0), pix.max(axis=0) + 1
    near = np.zeros(after.shape, dtype=bool)
    near[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = True
    for p in others:
        near[p[:, 0], p[:, 1]] = False
    edited = near & (after < len(COLOURS))
    return mask_iou(edited, target), mask_iou(edited, source)


def _fits(phrase: tuple[str, str | None, str | None], colour: str, shape: str) -> bool:
    _, want_colour, want_shape = phrase
    return want_colour in (None, colour) and want_shape in (None, shape)


def _ground_name(phrase: str) -> str | None:
    names = [w for w in re.findall(r"[a-z]+", phrase.lower()) if w in BACKGROUNDS]
    return names[0] if names else None


class WorldChecker:
    """Checker protocol for shapes-world images (any size, no weights)."""

    name = "world"

    def __call__(self, source: Image.Image, edited: Image.Image, plan: EditPlan) -> list[Verdict]:
        if source.size != edited.size:
            source = source.convert("RGB").resize(edited.size, Image.Resampling.BOX)
        before, after = _labels(source), _labels(edited)
        objs_before, objs_after = _objects(before), _objects(after)
        return [self._judge(k, s, before, after, objs_before, objs_after) for k, s in enumerate(plan.subtasks)]

    def _judge(self, k: int, s: Subtask, before, after, objs_before, objs_after) -> Verdict:
        src, tgt = parse_phrase(s.source), parse_phrase(s.target)
        if tgt[0] == "background":
            return self._ground(k, s, after)
        region = _region(s.box, *after.shape)
        ref = [p for c, sh, p in _inside(objs_before, region) if _fits(src, c, sh)]
        if not ref:  # the source phrase's object is not in its box: nothing to compare with
            ref = [p for _, _, p in _inside(objs_before, region)]
        if not ref:
            return Verdict(k, s.source, s.target, s.keep, UNSURE, {}, "no object in the box of the source image")
        own = max(ref, key=len)
        area = float(len(own))
        here = _inside(objs_after, region)
        if s.keep or src == tgt:
            target = min(1.0, max((len(p) for c, sh, p in here if _fits(tgt, c, sh)), default=0) / area)
            verdict = by_threshold(target, PRESENT, ABSENT)
            return Verdict(
                k, s.source, s.target, s.keep, verdict, {"target": target}, "the kept object's area over its own"
            )
        reshaped = after.shape[0] == after.shape[1] and None not in (src[2], tgt[2]) and src[2] != tgt[2]
        if reshaped:  # the target shape's own area in the source footprint (a triangle is half its square)
            drawn = _silhouette(tgt[2], own, after.shape[0])
            expected, want, was = float(drawn.sum()), tgt, src
        else:  # a recolour is judged by colour: a shape read off a few blurred pixels must not fail it
            expected = area
            want, was = (tgt[0], tgt[1], None) if tgt[1] else tgt, (src[0], src[1], None) if src[1] else src
        target = min(1.0, max((len(p) for c, sh, p in here if _fits(want, c, sh)), default=0) / max(expected, 1.0))
        source = min(1.0, max((len(p) for c, sh, p in here if _fits(was, c, sh)), default=0) / area)
        scores = {"target": target, "source": source}
        if target >= PRESENT and source < ABSENT:
            verdict, why = DONE, "the target object is there and the source object gone"
        elif target < ABSENT or source >= PRESENT:
            verdict, why = NOT_DONE, "the target object is missing or the source object is still there"
        else:
            verdict, why = UNSURE, "the target object is smaller than it should be (half-erased)"
        if verdict == DONE and not reshaped and tgt[1] is not None:
            # a recolour in place: most of the source object's own pixels now carry the target colour
            scores["in_place"] = float((after[own[:, 0], own[:, 1]] == NAMES.index(tgt[1])).mean())
            if scores["in_place"] < PRESENT:
                verdict = NOT_DONE if scores["in_place"] < ABSENT else UNSURE
                why = "the target colour covers too little of where the source object was (shrunk or moved)"
        elif verdict == DONE and reshaped:
            others = [p for _, _, p in objs_before if p is not own]
            was_drawn = _silhouette(src[2], own, after.shape[0])
            scores["outline_target"], scores["outline_source"] = _outline(drawn, was_drawn, own, after, others)
            if scores["outline_target"] <= scores["outline_source"]:
                verdict, why = NOT_DONE, "the new outline is closer to the source shape than to the target shape"
            elif scores["outline_target"] < OUTLINE_IOU:
                verdict, why = UNSURE, "the new outline is only part of the target shape (half-changed)"
        return Verdict(k, s.source, s.target, s.keep, verdict, scores, why)

    def _ground(self, k: int, s: Subtask, after: np.ndarray) -> Verdict:
        ground = after >= len(COLOURS)
        want, was = _ground_name(s.target), _ground_name(s.source)
        if want is None or not ground.any():
            return Verdict(k, s.source, s.target, s.keep, UNSURE, {}, "no background named, or no ground visible")
        share = {name: float((after[ground] == NAMES.index(name)).mean()) for name in {want, was} - {None}}
        scores = {"target": share[want]}
        verdict = by_threshold(share[want], GROUND_DONE, GROUND_FAILED)
        if was is not None and was != want:
            scores["source"] = share[was]
            if verdict == DONE and share[was] >= 1 - GROUND_DONE:
                verdict = UNSURE
        return Verdict(k, s.source, s.target, s.keep, verdict, scores, "the share of ground pixels of each background")
