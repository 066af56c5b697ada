"""Checking an edit: a verdict per subtask from the edited image, the source image and the plan only.

The checker is chosen like the box source: the bundled world's weight-free reading for world
images, the configured detector and/or a CLIP folder for photos. It is built before the edit, so a
model that cannot load, or `--refine` without any checker, stops the run before any step is spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gas_lightning.checking.verdict import DONE, NOT_DONE, UNSURE, Checker, Verdict, counts
from gas_lightning.errors import GasError

__all__ = ["CheckSpec", "Checker", "Verdict", "DONE", "NOT_DONE", "UNSURE", "counts", "make_checker"]

NO_CHECKER = (
    "a photo edit has no checker configured: pass --detector ID_OR_FOLDER (a GroundingDINO) or "
    "--check_clip CLIP_FOLDER (a local transformers CLIP folder); docs/guide/checking.md"
)


@dataclass
class CheckSpec:
    """Checking the edit and running the failed subtasks again.

    Args:
        check: auto (on for the bundled world, or with --check_clip or --refine), on, or off
        check_clip: a local CLIP folder (transformers CLIPModel + CLIPProcessor) for photo verdicts
        check_lpips: torchvision's LPIPS backbone file (alexnet-owt-7be5be79.pth) or its folder; default: the torch hub cache
        refine: up to N extra passes that run only the subtasks not judged done, from the edited latent
        refine_steps: steps of each extra pass (default: half of --trainer.max_steps)
        refine_boost: a failed subtask's intensity is multiplied by this once per pass it failed
    """

    check: Literal["auto", "on", "off"] = "auto"
    check_clip: str | None = None
    check_lpips: str | None = None
    refine: int = 0
    refine_steps: int | None = None
    refine_boost: float = 1.5

    def __post_init__(self) -> None:
        if self.refine < 0 or (self.refine_steps is not None and self.refine_steps < 1):
            raise GasError(f"--refine must be >= 0 and --refine_steps >= 1, got {self.refine} and {self.refine_steps}")
        if not 1.0 <= self.refine_boost <= 10.0:
            raise GasError(f"--refine_boost must be in [1, 10], got {self.refine_boost}")
        if self.refine and self.check == "off":
            raise GasError("--refine needs the checker: drop --check off (or --refine 0)")


def wanted(spec: CheckSpec, world: bool) -> bool:
    """Whether this edit is checked at all."""
    if spec.check == "auto":
        return world or spec.check_clip is not None or spec.refine > 0
    return spec.check == "on"


def make_checker(spec: CheckSpec, world: bool, detector=None, device: str = "cpu") -> Checker | None:
    """The checker for this edit, or None when it is not checked.

    `world`: the image is the bundled world's (its detector or model); `detector`: the grounder the
    edit was configured with (used when it exposes GroundingDINO's processor and model).

    Raises:
        GasError: checking is asked for (--check on, --refine) but nothing can judge a photo.
        ModelLoadError: the CLIP folder cannot be loaded.
    """
    if not wanted(spec, world):
        return None
    if world and spec.check_clip is None:
        from gas_lightning.checking.world import WorldChecker

        return WorldChecker()
    usable = detector if hasattr(detector, "processor") and hasattr(detector, "model") else None
    if usable is None and spec.check_clip is None:
        flag = "--refine" if spec.refine else "--check on"
        raise GasError(f"{flag}: {NO_CHECKER}")
    from gas_lightning.checking.photo import PhotoChecker

    return PhotoChecker(detector=usable, clip=spec.check_clip, device=device)
