"""Procedural scenes of coloured shapes on named backgrounds.

The world is small enough that a tiny diffusion model can learn it on a CPU, and exact enough
that every edit can be scored: each object carries its true pixel mask and box. Geometry is
stored in normalised coordinates, so the same scene renders at 32x32 for the model and at
256x256 for people. Edges are anti-aliased by supersampling (smooth edges are easier for the
model to learn than jagged ones); masks are the pixels an object covers by at least half.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Saturated object colours, far from each other and from every background (min RGB distance ~100).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (20, 200, 60),
    "blue": (30, 50, 220),
    "yellow": (250, 230, 20),
    "purple": (140, 30, 180),
    "orange": (250, 130, 10),
}

# Flat background colours: flat fields are learnt fast and make background PSNR meaningful.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grass": (60, 110, 40),
    "snow": (240, 245, 250),
    "sand": (205, 180, 130),
    "sky": (120, 180, 240),
}

DEFAULT_SIZE = 32
SUPERSAMPLE = 4
MIN_SIDE, MAX_SIDE = 9, 14  # object box side in pixels at 32x32
GAP = 1  # free pixels kept between object boxes


@dataclass(frozen=True)
class SceneObject:
    """One shape. `geom` is its square footprint, normalised xyxy."""

    shape: str
    colour: str
    geom: tuple[float, float, float, float]

    @property
    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects on a background, rendered at `size` x `size`."""

    objects: tuple[SceneObject, ...]
    background: str
    size: int = DEFAULT_SIZE

    # geometry at the scene's own size -------------------------------------------------
    @cached_property
    def coverage(self) -> np.ndarray:
        """(n_objects, H, W) float coverage in [0, 1] of each object."""
        return coverages(self.objects, self.size)

    def mask(self, i: int) -> np.ndarray:
        """Boolean pixel mask of object i (pixels it covers by at least half)."""
        return self.coverage[i] >= 0.5

    def pixel_box(self, i: int) -> tuple[int, int, int, int]:
        """Exact pixel box (x0, y0, x1, y1) of object i's mask, x1/y1 exclusive."""
        return mask_box(self.mask(i))

    def box(self, i: int) -> tuple[float, float, float, float]:
        """Normalised xyxy box of object i's mask, the form EditPlan boxes use."""
        x0, y0, x1, y1 = self.pixel_box(i)
        s = float(self.size)
        return (x0 / s, y0 / s, x1 / s, y1 / s)

    @property
    def object_union(self) -> np.ndarray:
        if not self.objects:
            return np.zeros((self.size, self.size), dtype=bool)
        return np.any(self.coverage >= 0.5, axis=0)

    # text -----------------------------------------------------------------------------
    @property
    def phrases(self) -> list[str]:
        return [o.phrase for o in self.objects]

    @property
    def caption(self) -> str:
        return caption_of(self.phrases, self.background)

    def with_size(self, size: int) -> Scene:
        return replace(self, size=int(size))


def caption_of(phrases: Sequence[str], background: str | None) -> str:
    """'a red circle', 'a blue square' + 'snow' -> 'a red circle and a blue square on snow'."""
    phrases = list(phrases)
    if len(phrases) > 1:
        head = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    else:
        head = phrases[0] if phrases else ""
    if background:
        return f"{head} on {background}".strip()
    return head


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the footprint's unit square (u right, v down)."""
    if shape == "square":
        return (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex at top centre, base along the bottom edge
        return (v >= 0) & (v < 1) & (np.abs(u - 0.5) <= 0.5 * v)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def coverages(objects: Sequence[SceneObject], size: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Per-object pixel coverage, by averaging a supersampled inside test."""
    n = size * supersample
    centres = (np.arange(n) + 0.5) / n
    out = np.zeros((len(objects), size, size), dtype=np.float32)
    for k, o in enumerate(objects):
        x0, y0, x1, y1 = o.geom
        u = (centres[None, :] - x0) / (x1 - x0)
        v = (centres[:, None] - y0) / (y1 - y0)
        inside = _shape_inside(o.shape, u, v).astype(np.float32)
        out[k] = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return out


def render(scene: Scene, size: int | None = None) -> np.ndarray:
    """uint8 HxWx3 image of the scene (at `size` if given, else the scene's own size)."""
    if size is not None and size != scene.size:
        scene = scene.with_size(size)
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    img = np.broadcast_to(bg, (scene.size, scene.size, 3)).copy()
    for o, cov in zip(scene.objects, scene.coverage):
        col = np.asarray(COLOURS[o.colour], dtype=np.float32)
        a = cov[..., None]
        img = img * (1 - a) + col * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_pil(scene: Scene, size: int | None = None) -> Image.Image:
    return Image.fromarray(render(scene, size))


def _place(rng: np.random.Generator, n: int, size: int, tries: int = 200) -> list[tuple[int, int, int]] | None:
    """n non-overlapping squares (x, y, side) on the pixel grid, with a gap between them."""
    scale = size / DEFAULT_SIZE
    lo, hi = max(3, round(MIN_SIDE * scale)), max(4, round(MAX_SIDE * scale))
    gap = max(1, round(GAP * scale))
    placed: list[tuple[int, int, int]] = []
    for _ in range(tries):
        if len(placed) == n:
            break
        s = int(rng.integers(lo, hi + 1))
        x, y = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
        if all(
            x + s + gap <= px or px + ps + gap <= x or y + s + gap <= py or py + ps + gap <= y for px, py, ps in placed
        ):
            placed.append((x, y, s))
    return placed if len(placed) == n else None


def sample_scene(
    rng: np.random.Generator,
    size: int = DEFAULT_SIZE,
    n_objects: int | None = None,
    distinct: bool = True,
) -> Scene:
    """A random scene: 1-3 objects (or `n_objects`), no two identical when `distinct`."""
    while True:
        n = int(rng.integers(1, 4)) if n_objects is None else int(n_objects)
        boxes = _place(rng, n, size)
        if boxes is None:
            continue
        kinds: list[tuple[str, str]] = []
        while len(kinds) < n:
            k = (SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))])
            if distinct and k in kinds:
                continue
            kinds.append(k)
        objects = tuple(
            SceneObject(shape=sh, colour=co, geom=(x / size, y / size, (x + s) / size, (y + s) / size))
            for (sh, co), (x, y, s) in zip(kinds, boxes)
        )
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        return Scene(objects=objects, background=background, size=size)


def nearest_colour_names(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index into `palette` of the nearest colour (RGB distance) for every pixel (..., 3)."""
    cols = np.asarray(list(palette.values()), dtype=np.float32)
    d = ((pixels[..., None, :].astype(np.float32) - cols) ** 2).sum(-1)
    return d.argmin(-1)


PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, **BACKGROUNDS}
"""Every named colour of the world: object colours first, then backgrounds."""


def training_caption(
    scene: Scene,
    rng: np.random.Generator,
    p_empty: float = 0.10,
    p_partial: float = 0.20,
    p_background_only: float = 0.4,
    p_the: float = 0.25,
) -> str:
    """A caption for training: empty (for classifier-free guidance), partial, or full.

    Partial captions teach the model the short phrases that the editor sends per subtask:
    one object ("a red circle", "a red circle on snow") or the background alone ("snow",
    "on snow", "the snow"). Requests are written "change the red circle into ...", so objects
    are sometimes "the red circle" and the background sometimes "and the snow". Objects in
    full captions come in random order, so order carries no meaning.
    """
    r = rng.random()
    if r < p_empty:
        return ""

    def obj(o: SceneObject) -> str:
        return f"the {o.colour} {o.shape}" if rng.random() < p_the else o.phrase

    bg = scene.background
    if r < p_empty + p_partial:
        if rng.random() < p_background_only:
            return [bg, f"on {bg}", f"the {bg}", f"on the {bg}"][int(rng.integers(4))]
        one = obj(scene.objects[int(rng.integers(len(scene.objects)))])
        return one if rng.random() < 0.5 else caption_of([one], bg)
    order = rng.permutation(len(scene.objects))
    phrases = [obj(scene.objects[i]) for i in order]
    if rng.random() < 0.15:  # the joined form that request parsers produce
        return caption_of([*phrases, f"the {bg}" if rng.random() < 0.5 else bg], None)
    return caption_of(phrases, bg)
