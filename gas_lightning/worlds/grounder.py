"""A weight-free grounder for world images: finds "the red circle" by colour and shape.

Each pixel takes its nearest named colour; the pixels of the phrase's colour split into
connected components; a component's fill ratio (area over its bounding box area) tells the
shape apart: a square fills ~1, a circle ~pi/4, a triangle ~1/2. Background phrases
("snow", "the background") get the whole image. Works at any image size.
"""

from __future__ import annotations

import re
from collections import deque

import numpy as np
from PIL import Image

from gas_lightning.errors import GroundingError
from gas_lightning.grounding.base import GroundingMiss
from gas_lightning.plan import WHOLE_IMAGE, Box
from gas_lightning.worlds.scenes import BACKGROUNDS, COLOURS, PALETTE, SHAPES, nearest_colour_names

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
        raise GroundingError(_help(phrase, f"unknown word{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"))
    if backgrounds and not (colours or shapes):
        return ("background", None, None)
    if backgrounds or len(colours) > 1 or len(shapes) > 1:
        raise GroundingError(_help(phrase, "it names more than one thing; give one object or the background per phrase"))
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


class WorldGrounder:
    """Grounder protocol implementation for shapes-world images (no weights, any size)."""

    def __init__(self, min_area: float = 0.004):
        self.min_area = min_area  # components smaller than this fraction of the image are noise

    def find_objects(self, image: Image.Image) -> list[tuple[str, str, Box]]:
        """All objects in the image as (colour, shape, normalised box)."""
        arr = np.asarray(image.convert("RGB"))
        h, w = arr.shape[:2]
        labels = nearest_colour_names(arr, PALETTE)
        found = []
        for k, colour in enumerate(COLOURS):
            for pix in components(labels == k):
                if len(pix) < max(2, self.min_area * h * w):
                    continue
                ys, xs = pix[:, 0], pix[:, 1]
                box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
                found.append((colour, classify_shape(pix), tuple(float(v) for v in box), len(pix)))
        found.sort(key=lambda f: -f[3])
        return [f[:3] for f in found]

    def background(self, image: Image.Image) -> str:
        labels = nearest_colour_names(np.asarray(image.convert("RGB")), PALETTE)
        counts = np.bincount(labels.ravel(), minlength=len(NAMES))[len(COLOURS):]
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
