"""`solver: flow | dds`: which guidance moves an edit's latent, chosen by one config key.

dds is grounded Delta Denoising Score (pipeline.py), the natural solver of the noise-predicting UNets
(SD 1.x/2.x, SDXL); flow is grounded FlowEdit (flow_pipeline.py), natural for the rectified-flow SD3 and
FLUX. Left unset, the model's family decides. A solver that cannot run on the family is refused here with
one message, before any step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from gas_lightning.errors import GasError
from gas_lightning.flow_backbone import FlowBackbone
from gas_lightning.flow_pipeline import build_flow_edit
from gas_lightning.guidance import GuidanceConfig
from gas_lightning.guidance.flow import FlowConfig
from gas_lightning.masks import MaskLike
from gas_lightning.module import GroundAScoreEdit
from gas_lightning.pipeline import build_edit
from gas_lightning.plan import EditPlan

SOLVERS = ("dds", "flow")


def natural_solver(backbone: Any) -> str:
    """The family's own solver: flow for SD3/FLUX, dds for every UNet model."""
    return "flow" if isinstance(backbone, FlowBackbone) else "dds"


def check_solver(solver: str | None, backbone: Any) -> str:
    """The solver to run (`solver`, or the family's), refusing one the model cannot run."""
    if solver is None:
        return natural_solver(backbone)
    if solver not in SOLVERS:
        raise GasError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    family = getattr(backbone, "family", "sd")
    if solver == "flow" and natural_solver(backbone) != "flow":
        raise GasError(
            f"solver flow needs a rectified-flow model (SD3/SD3.5 or FLUX.1), but {backbone.source!r} is a {family} "
            "UNet model: use its own config (configs/sd15.yaml, sd21.yaml, sdxl.yaml; solver dds) or an SD3/FLUX model"
        )
    if solver == "dds" and natural_solver(backbone) != "dds":
        raise GasError(
            f"solver dds needs a noise-predicting UNet model (SD 1.x/2.x, SDXL), but {backbone.source!r} is a "
            f"{family} rectified-flow model: use configs/{family}.yaml (solver flow), or --solver flow"
        )
    return solver


def build_solver_edit(
    backbone: Any,
    image: Image.Image,
    plan: EditPlan,
    solver: str | None = None,
    guidance_config: GuidanceConfig | None = None,
    flow_config: FlowConfig | None = None,
    resolution: int | None = None,
    schedule: str = "batched",
    seed: int = 0,
    loss_scale: float = 2000.0,
    optimizer: Any = None,
    lr_scheduler: Any = None,
    masks: Sequence[MaskLike | None] | None = None,
) -> GroundAScoreEdit:
    """The ready module of an edit under its solver. The flow solver's optimiser is its own (SGD with the time
    grid's steps as learning rates): an lr_scheduler given for it is refused, the optimizer and loss scale unused."""
    chosen = check_solver(solver, backbone)
    if chosen == "flow":
        if lr_scheduler is not None:
            raise GasError(
                "the flow solver's learning rates are its time grid's steps (FlowEdit's Euler steps); "
                "drop --lr_scheduler for an SD3/FLUX edit"
            )
        return build_flow_edit(
            backbone, image, plan, guidance_config, flow_config, resolution, schedule=schedule, seed=seed, masks=masks
        )
    return build_edit(
        backbone,
        image,
        plan,
        guidance_config=guidance_config,
        resolution=resolution,
        schedule=schedule,
        seed=seed,
        loss_scale=loss_scale,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        masks=masks,
    )
