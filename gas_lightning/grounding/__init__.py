"""Grounding: give each subtask a box (see DESIGN.md, "Grounding").

Box sources: explicit user boxes, GroundingDINO through transformers (default), and the
original GroundingDINO checkpoints through groundingdino-py. Detector modules import their
heavy libraries only when a detector is built.
"""

from __future__ import annotations

from pathlib import Path

from gas_lightning.errors import GroundingError
from gas_lightning.grounding.base import WHOLE_IMAGE, Grounder, GroundingMiss, draw_grounding, ground_plan
from gas_lightning.grounding.explicit import ExplicitGrounder, apply_boxes, parse_boxes
from gas_lightning.grounding.gdino_hf import (
    BOX_THRESHOLD,
    DEFAULT_DETECTOR,
    TEXT_THRESHOLD,
    GroundingDinoGrounder,
    assign_boxes,
    build_caption,
    cxcywh_to_xyxy,
)
from gas_lightning.grounding.gdino_py import GroundingDinoPyGrounder

BACKENDS = ("transformers", "groundingdino-py")
FALLBACKS = ("error", "whole_image")


def build_grounder(
    backend: str = "transformers",
    detector: str = DEFAULT_DETECTOR,
    config: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    box_threshold: float = BOX_THRESHOLD,
    text_threshold: float = TEXT_THRESHOLD,
    text_encoder: str | None = None,
) -> Grounder:
    """One entry point for the CLI flags --detector_backend/--detector/--detector_config/..."""
    if backend == "transformers":
        return GroundingDinoGrounder(detector, device, box_threshold, text_threshold)
    if backend == "groundingdino-py":
        if config is None or checkpoint is None:
            raise GroundingError(
                "--detector_backend groundingdino-py needs --detector_config (the .py) and "
                "--detector_checkpoint (the .pth) of an original GroundingDINO release."
            )
        return GroundingDinoPyGrounder(config, checkpoint, device, box_threshold, text_threshold, text_encoder)
    raise GroundingError(f"unknown --detector_backend {backend!r}; choose one of {', '.join(BACKENDS)}.")


def fallback_whole_image(choice: str) -> bool:
    """--grounding_fallback error|whole_image -> the flag ground_plan takes."""
    if choice not in FALLBACKS:
        raise GroundingError(f"unknown --grounding_fallback {choice!r}; choose one of {', '.join(FALLBACKS)}.")
    return choice == "whole_image"


__all__ = [
    "Grounder",
    "GroundingMiss",
    "WHOLE_IMAGE",
    "ground_plan",
    "draw_grounding",
    "parse_boxes",
    "apply_boxes",
    "ExplicitGrounder",
    "GroundingDinoGrounder",
    "GroundingDinoPyGrounder",
    "assign_boxes",
    "build_caption",
    "cxcywh_to_xyxy",
    "build_grounder",
    "fallback_whole_image",
    "BACKENDS",
    "FALLBACKS",
    "DEFAULT_DETECTOR",
    "BOX_THRESHOLD",
    "TEXT_THRESHOLD",
]
