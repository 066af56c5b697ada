"""Grounded FlowEdit: the flow solver's per-term moves, beside the grounded DDS terms of dds.py.

FlowEdit (Kulikov et al., ICCV 2025) edits with a rectified-flow model without inversion: at a noise level
t_i of the model's descending grid, with noise n shared by both branches,

    zs = (1 - t_i) x_src + t_i n              the source, noised
    zt = zs + (z - x_src)                     the edit, noised with the same n
    dv = v(zt, t_i, target) - v(zs, t_i, source)     (each with its own guidance scale)

averaged over `n_avg` draws, and z moves by (t_{i+1} - t_i) dv. Grounded, each term (a subtask's phrases, or
the whole-scene sentences) gives its own dv_k, and the move is that of

    d = sum_k w_k M_k dv_k

with M_k the term's region after the overlap rule and w_k its intensity, or for the whole-scene term
beta(1000 t_i) (GuidanceConfig.full_prompt_weights, the DDS buckets on the 0..1000 scale). The module
(flow_module.py) hands d to plain SGD as the gradient with learning rate t_i - t_{i+1} > 0: SGD's
z - lr * d is exactly FlowEdit's Euler step z + (t_{i+1} - t_i) d. Keep terms need nothing special: a keep
subtask's target equals its source, so its dv is zero at the source and pulls its region back when z drifts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gas_lightning.backbone import PromptEmbeddings
from gas_lightning.errors import GasError
from gas_lightning.flow_backbone import FlowBackbone
from gas_lightning.guidance.dds import GuidanceConfig, Term, TermLog


@dataclass
class FlowConfig:
    """FlowEdit's settings; None takes the family's published value (FlowBackbone.defaults).

    `steps` is FlowEdit's T_steps (the time grid), `n_max` how many of its lowest-noise steps run (the
    edit starts at t_{n_max}), `n_avg` the noise draws averaged per step. The guidance scales are CFG
    scales for SD3 and the distilled guidance strength for FLUX-dev (FLUX-schnell takes none).
    """

    steps: int | None = None
    n_max: int | None = None
    n_avg: int = 1
    source_guidance_scale: float | None = None
    target_guidance_scale: float | None = None
    family: str | None = None  # the family these settings are for (sd3, flux); an edit of another is refused

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise GasError(f"flow.steps must be at least 1, got {self.steps}")
        if self.n_max is not None and self.n_max < 1:
            raise GasError(f"flow.n_max must be at least 1, got {self.n_max}")
        if self.steps is not None and self.n_max is not None and self.n_max > self.steps:
            raise GasError(f"flow.n_max ({self.n_max}) cannot exceed flow.steps ({self.steps})")
        if self.n_avg < 1:
            raise GasError(f"flow.n_avg must be at least 1, got {self.n_avg}")

    def resolved(self, backbone: FlowBackbone) -> FlowConfig:
        """Every None filled in from the family's FlowEdit settings, and the scales checked against the model."""
        if self.family is not None and self.family != backbone.family:
            raise GasError(
                f"these flow settings are for {self.family} models (flow.family) but {backbone.source!r} is a "
                f"{backbone.family} model: use configs/{backbone.family}.yaml, or set --flow.family {backbone.family}"
            )
        d = backbone.defaults
        out = FlowConfig(
            steps=self.steps if self.steps is not None else d.steps,
            n_max=self.n_max if self.n_max is not None else min(d.n_max, self.steps or d.steps),
            n_avg=self.n_avg,
            source_guidance_scale=self.source_guidance_scale
            if self.source_guidance_scale is not None
            else d.source_guidance_scale,
            target_guidance_scale=self.target_guidance_scale
            if self.target_guidance_scale is not None
            else d.target_guidance_scale,
            family=backbone.family,
        )
        backbone.check_guidance_scales(out.source_guidance_scale, out.target_guidance_scale)
        return out


def check_term_masks(terms: Sequence[Term], latent_hw: tuple[int, int]) -> None:
    """Every region must be a weight per latent cell: one made for another size would land on the wrong tokens."""
    for tm in terms:
        if tuple(tm.mask.shape) != tuple(latent_hw):
            raise GasError(
                f"the region of term {tm.name!r} is {tuple(tm.mask.shape)} but the latent is {tuple(latent_hw)}; "
                "regions are weights on the (unpacked) latent grid: build them with EditMasks.from_plan at the "
                "latent's size (FLUX packs them into tokens together with the latent)"
            )


class GroundedFlowGuidance:
    """Frozen-model side of a flow edit: (z, x_src, terms, step, noises) -> the step's move d.

    Not an nn.Module, for the reason GroundedScoreGuidance is not: the frozen networks stay out of the
    LightningModule's state_dict, checkpoints and DDP.
    """

    def __init__(
        self,
        backbone: FlowBackbone,
        config: FlowConfig,
        shared: GuidanceConfig,
        grid: torch.Tensor,
        null_embedding: PromptEmbeddings | None = None,
    ):
        if len(grid) != config.steps + 1:
            raise ValueError(f"a grid of {len(grid)} times for {config.steps} steps")
        self.backbone = backbone
        self.config = config
        self.shared = shared  # the overlap rule and whole-scene weights, as the DDS solver reads them
        self.grid = grid.float().cpu()
        self.null = null_embedding

    @property
    def first(self) -> int:
        """The grid index of the first step: FlowEdit skips the grid's first steps - n_max (noisiest) times."""
        return self.config.steps - self.config.n_max

    def times(self, step: int) -> tuple[float, float]:
        """(t_i, t_{i+1}) of the edit's `step`-th step (0-based)."""
        i = self.first + int(step)
        return float(self.grid[i]), float(self.grid[i + 1])

    def step_sizes(self) -> list[float]:
        """t_i - t_{i+1} for each step: the SGD learning rates that make each step FlowEdit's Euler step."""
        return [a - b for a, b in (self.times(s) for s in range(self.config.n_max))]

    def to(self, device: torch.device) -> GroundedFlowGuidance:
        self.backbone.to(device)
        if self.null is not None:
            self.null = self.null.to(device)
        return self

    def _weight(self, term: Term, t: float) -> float:
        return term.weight * (self.shared.beta(round(t * 1000)) if term.is_full else 1.0)

    def _velocities(
        self, zs: torch.Tensor, zt: torch.Tensor, terms: Sequence[Term], t: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each term's source velocity at zs and target velocity at zt, (n, C, h, w) each, in one model call.

        With CFG (SD3): [null at zs, null at zt, sources at zs, targets at zt], 2n + 2 samples, the two null
        predictions shared by every term. FLUX: [sources at zs, targets at zt], 2n samples, the guidance
        strength an input of each sample.
        """
        cfg, bb, n = self.config, self.backbone, len(terms)
        src = PromptEmbeddings.cat([tm.src_emb for tm in terms])
        tgt = PromptEmbeddings.cat([tm.tgt_emb for tm in terms])
        if self.null is not None:
            lat = torch.cat([zs, zt, zs.expand(n, -1, -1, -1), zt.expand(n, -1, -1, -1)])
            emb = PromptEmbeddings.cat([self.null, self.null, src, tgt])
            v = bb.velocity(lat, torch.full((2 * n + 2,), t, device=zs.device), emb)
            v0s, v0t = v[0:1], v[1:2]
            return (
                v0s + cfg.source_guidance_scale * (v[2 : 2 + n] - v0s),
                v0t + cfg.target_guidance_scale * (v[2 + n :] - v0t),
            )
        lat = torch.cat([zs.expand(n, -1, -1, -1), zt.expand(n, -1, -1, -1)])
        strength = None
        if cfg.source_guidance_scale is not None:
            scales = [cfg.source_guidance_scale] * n + [cfg.target_guidance_scale] * n
            strength = torch.tensor(scales, device=zs.device)
        v = bb.velocity(lat, torch.full((2 * n,), t, device=zs.device), PromptEmbeddings.cat([src, tgt]), strength)
        return v[:n], v[n:]

    @torch.no_grad()
    def gradient(
        self,
        z: torch.Tensor,
        z_src: torch.Tensor,
        terms: Sequence[Term],
        step: int,
        noises: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, list[TermLog]]:
        """The move d of `terms` at the edit's `step`, every term at the same noises (one per n_avg draw).

        The batched schedule passes all terms; the sequential one passes one term at a time, each with
        its own noises. Returned in float32, shaped like z.
        """
        t, _ = self.times(step)
        n = len(terms)
        dv = torch.zeros((n, *z.shape[1:]), device=z.device, dtype=torch.float32)
        for noise in noises:
            zs = (1 - t) * z_src + t * noise
            zt = zs + (z - z_src)
            v_src, v_tgt = self._velocities(zs, zt, terms, t)
            dv += (v_tgt - v_src) / len(noises)
        total = torch.zeros_like(z, dtype=torch.float32)
        logs = []
        for k, tm in enumerate(terms):
            grad = self._weight(tm, t) * tm.mask * dv[k : k + 1]
            finite = torch.isfinite(grad)
            total += grad
            logs.append(
                TermLog(
                    t=round(t * 1000),
                    gamma_tensor=torch.ones((), device=z.device),
                    grad_norm_tensor=torch.where(finite, grad, 0).norm(),
                    nonfinite_tensor=(~finite).sum(),
                )
            )
        return total, logs
