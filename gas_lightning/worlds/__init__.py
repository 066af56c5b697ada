"""The bundled shapes world: scenes, edit cases, an exact scorer, a grounder and a tiny model.

Importing this package is cheap (numpy and PIL only); torch, diffusers and transformers are
imported by the functions that need them.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS_DIR / "shapes-model"
EXAMPLE_IMAGE = ASSETS_DIR / "example.png"
EXAMPLE_REQUEST = ASSETS_DIR / "example_request.txt"

from gas_lightning.worlds.cases import Change, EditCase, held_out_cases, make_case, sample_case  # noqa: E402
from gas_lightning.worlds.scenes import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Scene,
    SceneObject,
    caption_of,
    render,
    render_pil,
    sample_scene,
)
from gas_lightning.worlds.scorer import aggregate, score  # noqa: E402

__all__ = [
    "ASSETS_DIR",
    "MODEL_DIR",
    "EXAMPLE_IMAGE",
    "EXAMPLE_REQUEST",
    "BACKGROUNDS",
    "COLOURS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "caption_of",
    "render",
    "render_pil",
    "sample_scene",
    "Change",
    "EditCase",
    "held_out_cases",
    "make_case",
    "sample_case",
    "aggregate",
    "score",
]
