"""From a grounded plan and an image to a ready GroundedFlowEdit (SD3 / FLUX): pipeline.py's flow twin.

The same stages as the DDS edit, read from pipeline.py so they cannot drift apart: the working size, the
source latent, the regions with the overlap rule, one prompt embedding per phrase (the text encoders then
go back to the CPU, before the first step), the terms. Then the model's time grid and the flow guidance.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from gas_lightning.errors import GasError
from gas_lightning.flow_backbone import FlowBackbone
from gas_lightning.flow_module import GroundedFlowEdit
from gas_lightning.guidance import GuidanceConfig
from gas_lightning.guidance.flow import FlowConfig, GroundedFlowGuidance
from gas_lightning.masks import EditMasks, MaskLike
from gas_lightning.pipeline import build_terms, image_to_tensor, working_size
from gas_lightning.plan import EditPlan


def build_flow_edit(
    backbone: FlowBackbone,
    image: Image.Image,
    plan: EditPlan,
    guidance_config: GuidanceConfig | None = None,
    flow_config: FlowConfig | None = None,
    resolution: int | None = None,
    schedule: str = "batched",
    seed: int = 0,
    masks: Sequence[MaskLike | None] | None = None,
) -> GroundedFlowEdit:
    """Everything the Trainer needs for one flow edit. Of `guidance_config` it reads the overlap rule and the
    whole-scene term (full_prompt, full_prompt_weights); its DDS settings (CFG scale, t range, CDS) do not apply."""
    shared = guidance_config or GuidanceConfig()
    cfg = (flow_config or FlowConfig()).resolved(backbone)
    if cfg.n_max > cfg.steps:
        raise GasError(f"flow.n_max ({cfg.n_max}) cannot exceed flow.steps ({cfg.steps})")
    flagged = [s.source for s in plan.subtasks if s.preserve_form]
    if flagged:
        raise GasError(
            f"preserve_form ({', '.join(flagged)}) is the DDS solver's CDS loss on UNet self-attention; the flow "
            "solver has no such term: drop preserve_form for an SD3/FLUX edit"
        )
    if not 0.0 <= shared.overlap_weight <= 1.0:
        raise GasError(f"guidance.overlap_weight must be in [0, 1], got {shared.overlap_weight}")
    size = working_size(*image.size, resolution or backbone.default_resolution, backbone.size_multiple)
    z_src = backbone.codec.encode(image_to_tensor(image, size).to(backbone.device))
    h, w = z_src.shape[-2:]
    regions = EditMasks.from_plan(plan, h, w, overlap_weight=shared.overlap_weight, masks=masks, image_size=image.size)
    terms = build_terms(backbone, plan, regions, config=shared)  # type: ignore[arg-type]
    guidance = GroundedFlowGuidance(
        backbone, cfg, shared, backbone.time_grid(cfg.steps, (h, w)), null_embedding=backbone.null_embeddings()
    )
    module = GroundedFlowEdit(guidance, z_src, terms, plan, schedule=schedule, seed=seed)
    module.masks = regions
    return module
