"""A weight-free grounder for world images: finds "the red circle" by colour and shape.

Each pixel takes its nearest named colour; the pixels of the phrase's colour split into
connected components; a component's fill ratio (area over its bounding box area) tells the
shape apart: a square fills ~1, a circle ~pi/4, a triangle ~1/2. Background phrases
("snow", "the background") get the whole image. Works at any image size.

It is also a segmenter (`--segmenter world`): the world's images are objects alpha-blended
onto a flat ground, so an object's exact soft mask is its component plus the one-pixel rim
around it, each pixel weighted by how far its colour lies from the ground's towards the object's.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Sequence

import numpy as np
from PIL import Image

from gas_lightning.errors import GroundingError
from gas_lightning.grounding.base import GroundingMiss
from gas_lightning.plan import WHOLE_IMAGE, Box
from gas_lightning.worlds.scenes import BACKGROUNDS, COLOURS, PALETTE, SHAPES, nearest_colour_names

log = logging.getLogger(__name__)

FILLER = {"a", "an", "the", "on", "of", "in", "with", "and", "to", "colour", "color", "shape", "object"}
BACKGROUND_WORDS = {*BACKGROUNDS, "background", "ground", "scene", "image"}
NAMES = list(PALETTE)


def parse_phrase(phrase: str) -> tuple[str, str | None, str | None]:
    """-> ("background", None, None) or ("object", colour or None, shape or None).

    Raises GroundingError for words outside the world's vocabulary.
    """
    words = [w for w in re.findall(r"[a-z]+", phrase.lower()) if w not in FILLER]
    words = [w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w for w in words]  # "circles"
    if not words:
        raise GroundingError(_help(phrase, "it names nothing"))
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    backgrounds = [w for w in words if w in BACKGROUND_WORDS]
    unknown = [w for w in words if w not in COLOURS and w not in SHAPES and w not in BACKGROUND_WORDS]
    if unknown:
        raise GroundingError(
            _help(phrase, f"unknown word{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}")
        )
    if backgrounds and not (colours or shapes):
        return ("background", None, None)
    if backgrounds or len(colours) > 1 or len(shapes) > 1:
        raise GroundingError(
            _help(phrase, "it names more than one thing; give one object or the background per phrase")
        )
    return ("object", colours[0] if colours else None, shapes[0] if shapes else None)


def _help(phrase: str, why: str) -> str:
    return (
        f"the world grounder cannot read {phrase!r}: {why}. It understands phrases like "
        f"'a red circle', 'the snow' or 'the background', with colours {', '.join(COLOURS)}; "
        f"shapes {', '.join(SHAPES)}; backgrounds {', '.join(BACKGROUNDS)}. "
        "For other images use a detector (--detector ID_OR_PATH) or give --boxes."
    )


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as lists of (y, x) pixel coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pix = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pix.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.asarray(pix))
    return out


def classify_shape(pix: np.ndarray) -> str:
    """Shape from fill ratio: square ~1.0, circle ~0.79, triangle ~0.5."""
    ys, xs = pix[:, 0], pix[:, 1]
    fill = len(pix) / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    if fill >= 0.9:
        return "square"
    if fill >= 0.64:
        return "circle"
    return "triangle"


def _soft_mask(
    arr: np.ndarray, others: np.ndarray, pix: np.ndarray, colour: np.ndarray, ground: np.ndarray
) -> np.ndarray:
    """Alpha of `colour` over `ground` on the component and the pixels up to two steps around it
    (a triangle's apex blends over two rows) inside its box grown by two, except other objects'.
    A rim pixel's nearest named colour can be a third one (red over sky reads purple), so the
    rim is not chosen by colour name."""
    core = np.zeros(others.shape, dtype=bool)
    core[pix[:, 0], pix[:, 1]] = True
    grown = core.copy()
    for _ in range(2):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    near = np.zeros_like(core)
    y0, x0 = pix.min(axis=0)
    y1, x1 = pix.max(axis=0)
    near[max(0, y0 - 2) : y1 + 3, max(0, x0 - 2) : x1 + 3] = True
    region = core | (grown & near & ~others)
    d = colour - ground
    alpha = np.clip(((arr - ground) @ d) / float(d @ d), 0.0, 1.0)
    return np.where(region, alpha, 0.0).astype(np.float32)


class WorldGrounder:
    """Grounder protocol implementation for shapes-world images (no weights, any size)."""

    def __init__(self, min_area: float = 0.004):
        self.min_area = min_area  # components smaller than this fraction of the image are noise

    def _objects(self, labels: np.ndarray) -> list[tuple[str, str, Box, np.ndarray]]:
        """(colour, shape, normalised box, pixels) of every object, largest first."""
        h, w = labels.shape
        found = []
        for k, colour in enumerate(COLOURS):
            for pix in components(labels == k):
                if len(pix) < max(2, self.min_area * h * w):
                    continue
                ys, xs = pix[:, 0], pix[:, 1]
                box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
                found.append((colour, classify_shape(pix), tuple(float(v) for v in box), pix))
        found.sort(key=lambda f: -len(f[3]))
        return found

    def find_objects(self, image: Image.Image) -> list[tuple[str, str, Box]]:
        """All objects in the image as (colour, shape, normalised box)."""
        return [f[:3] for f in self._objects(nearest_colour_names(np.asarray(image.convert("RGB")), PALETTE))]

    def objects(self, image: Image.Image) -> list[tuple[str, Box]]:
        """Every object as (phrase, box), e.g. ("an orange triangle", box): what keep_unmentioned keeps."""
        return [(f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}", b) for c, s, b in self.find_objects(image)]

    def segment(self, image: Image.Image, boxes: Sequence[Box], phrases: Sequence[str]) -> list[np.ndarray]:
        """Segmenter protocol: the soft mask of the object each phrase names, the one most inside its box.

        A background phrase, or an object not found in its box, gets the box itself.
        """
        from gas_lightning.grounding.segmenter import inside_box

        arr = np.asarray(image.convert("RGB")).astype(np.float32)
        labels = nearest_colour_names(arr, PALETTE)
        objects = self._objects(labels)
        ground = np.asarray(BACKGROUNDS[self.background(image)], dtype=np.float32)
        out = []
        for box, phrase in zip(boxes, phrases):
            what, colour, shape = parse_phrase(phrase)
            whole = inside_box(np.ones(labels.shape, dtype=np.float32), box)
            fits = [
                (c, pix) for c, s, _, pix in objects if what == "object" and colour in (None, c) and shape in (None, s)
            ]
            scored = [(float(whole[pix[:, 0], pix[:, 1]].sum()), c, pix) for c, pix in fits]
            scored = [t for t in scored if t[0] > 0]
            if not scored:
                if what == "object":
                    log.warning("the world segmenter found no %r in its box; that subtask keeps the box", phrase)
                out.append(whole)
                continue
            _, c, pix = max(scored, key=lambda t: t[0])
            others = np.zeros(labels.shape, dtype=bool)
            for *_, p in objects:
                if p is not pix:
                    others[p[:, 0], p[:, 1]] = True
            out.append(_soft_mask(arr, others, pix, np.asarray(COLOURS[c], dtype=np.float32), ground))
        return out

    def background(self, image: Image.Image) -> str:
        labels = nearest_colour_names(np.asarray(image.convert("RGB")), PALETTE)
        counts = np.bincount(labels.ravel(), minlength=len(NAMES))[len(COLOURS) :]
        return list(BACKGROUNDS)[int(counts.argmax())]

    def ground(self, image: Image.Image, phrases: list[str]) -> list[Box]:
        parsed = [parse_phrase(p) for p in phrases]  # unknown words fail before any work
        objects = self.find_objects(image) if any(p[0] == "object" for p in parsed) else []
        boxes: list[Box | None] = []
        missing = []
        for phrase, (what, colour, shape) in zip(phrases, parsed):
            if what == "background":
                boxes.append(WHOLE_IMAGE)
                continue
            match = [b for c, s, b in objects if (colour is None or c == colour) and (shape is None or s == shape)]
            # largest match first; a phrase asked again gets the next match, not the same object twice
            fresh = [b for b in match if b not in boxes]
            boxes.append(fresh[0] if fresh else (match[0] if match else None))
            if not match:
                missing.append(phrase)
        if missing:
            seen = ", ".join(f"{c} {s}" for c, s, _ in objects) or "no objects"
            raise GroundingMiss(
                f"the world grounder found no {', no '.join(map(repr, missing))} in the image "
                f"(it sees: {seen}; background {self.background(image)}). Name an object that is in "
                "the image by its colour and shape, or give --boxes.",
                boxes,
                missing,
            )
        return boxes  # type: ignore[return-value]
