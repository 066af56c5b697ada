"""Rectified-flow text-to-image models (SD3 / SD3.5, FLUX.1) as the flow solver sees them.

The flow solver needs three things from a model: its velocity v(z_t, t, c) at a noise level t in [0, 1]
(z_t = (1 - t) x + t n), its own descending time grid, and prompts turned into conditioning once per
edit. SD3 and FLUX differ in all three (text encoders, how the transformer takes the latent, how guidance
works), so each family is one class here and guidance/flow.py never branches on the family. The latent
stays (B, C, h, w) outside this module: FLUX's 2x2 token packing happens inside `velocity`, so regions,
checkpoints and the codec are the same as for Stable Diffusion. Loading is in flow_loading.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gas_lightning.backbone import LatentCodec, PromptEmbeddings, apply_tuning, visiting
from gas_lightning.errors import GasError

log = logging.getLogger(__name__)

FLOW_FAMILIES = ("sd3", "flux")


def token_ids(tokenizer: Any, prompts: Sequence[str], limit: int, device: torch.device) -> torch.Tensor:
    """Token ids padded to `limit` (or the tokenizer's own maximum, if smaller); warns when a prompt is cut."""
    n = min(int(tokenizer.model_max_length), int(limit))
    for p in prompts:
        length = len(tokenizer(p, truncation=False).input_ids)
        if length > n:
            log.warning("prompt %r is %d tokens; the text encoder keeps only %d", p, length, n)
    out = tokenizer(list(prompts), padding="max_length", max_length=n, truncation=True, return_tensors="pt")
    return out.input_ids.to(device)


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FLUX's tokens, one per 2x2 latent patch, row-major."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for a (h, w) latent grid."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@dataclass(frozen=True)
class FlowDefaults:
    """FlowEdit's published settings for a family (fallenshock/FlowEdit, SD3_exp.yaml and FLUX_exp.yaml)."""

    steps: int
    n_max: int
    source_guidance_scale: float | None
    target_guidance_scale: float | None


@dataclass
class FlowBackbone:
    """The frozen networks of a rectified-flow model: a transformer, a VAE codec, text encoders, a time grid.

    `offload_text` (the default) keeps the text encoders on the CPU; they visit the transformer's device
    only while an edit embeds its prompts (once per edit), so the steps run with the transformer and the
    VAE alone on the accelerator (T5-XXL is most of FLUX's text side, 9.5 GB in 16 bits).
    """

    transformer: nn.Module
    codec: LatentCodec
    scheduler: Any  # a FlowMatchEulerDiscreteScheduler: only its config is read (time grid and shift)
    source: str
    attention: str = "sdpa"
    config_source: str | None = None
    micro_batch: int | None = None
    offload: bool = False  # low_memory: the VAE waits on the CPU too
    offload_text: bool = True
    compiled: str | None = None

    family = "flow"
    solver = "flow"  # the family's natural solver (solvers.natural_solver)
    defaults: ClassVar[FlowDefaults]

    # what the family adds ------------------------------------------------------------------------
    def text_encoders(self) -> list[nn.Module]:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:  # pragma: no cover - interface
        raise NotImplementedError

    def null_embeddings(self) -> PromptEmbeddings | None:
        """The unconditional text of classifier-free guidance; None for a model that has no CFG branch."""
        return None

    def check_guidance_scales(self, source: float | None, target: float | None) -> None:  # pragma: no cover
        raise NotImplementedError

    def _call(self, z_t: torch.Tensor, t: torch.Tensor, cond: PromptEmbeddings, guidance: torch.Tensor | None):
        raise NotImplementedError  # pragma: no cover - interface

    # shared ----------------------------------------------------------------------------------------
    @property
    def patch(self) -> int:
        return int(getattr(self.transformer.config, "patch_size", 2) or 2)

    @property
    def default_resolution(self) -> int:
        """The VAE's sample size in pixels: 1024 for SD3, SD3.5 and FLUX.1."""
        return int(self.codec.vae.config.sample_size)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downscale times the 2x2 patches."""
        return self.codec.downscale * 2

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def frozen_networks(self) -> list[nn.Module]:
        return [self.transformer, self.codec, *self.text_encoders()]

    def to(self, device: torch.device | str) -> FlowBackbone:
        self.transformer.to(device)
        self.codec.to("cpu" if self.offload else device)
        for encoder in self.text_encoders():
            encoder.to("cpu" if self.offload_text else device)
        return self

    def tune(
        self,
        compile: bool | str = False,
        low_memory: bool = False,
        micro_batch: int | None = None,
        channels_last: bool = False,
    ) -> FlowBackbone:
        """`Backbone.tune`'s switches for a transformer (channels_last has no meaning for tokens and is ignored)."""
        apply_tuning(self, self.transformer, compile, low_memory, micro_batch)
        return self

    def time_grid(self, steps: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The model's t_N > ... > t_1 > 0 for `steps` Euler steps (steps + 1 values), as its pipeline sets them.

        SD3 shifts a uniform grid by the scheduler's `shift`; FLUX shifts 1 ... 1/steps by mu, which grows with
        the number of image tokens (resolution-dependent shifting). diffusers' scheduler computes both.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        if scheduler.config.use_dynamic_shifting:
            cfg = scheduler.config
            tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
            slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
            mu = cfg.base_shift + slope * (tokens - cfg.base_image_seq_len)
            scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist(), mu=mu)
        else:
            scheduler.set_timesteps(steps)
        return scheduler.sigmas.float().cpu()

    def velocity(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        cond: PromptEmbeddings,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """v(z_t, t, cond) in float32 for latents (B, C, h, w) at noise levels t (B,) in [0, 1].

        `guidance` (B,): FLUX-dev's distilled guidance strength per sample. With `micro_batch` the batch goes
        through the transformer in slices (each sample's prediction depends on that sample alone).
        """
        k = self.micro_batch or z_t.shape[0]
        parts = []
        for s in range(0, z_t.shape[0], k):
            g = None if guidance is None else guidance[s : s + k]
            parts.append(self._call(z_t[s : s + k], t[s : s + k], cond[s : s + k], g).float())
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class SD3Backbone(FlowBackbone):
    """SD3 / SD3.5 (StableDiffusion3Pipeline's conventions): two CLIP encoders with projection and T5.

    Token conditioning is both CLIPs' penultimate hidden states joined on the last axis, zero-padded to T5's
    width and followed by T5's tokens; the pooled embedding is both CLIPs' projections joined. Guidance is
    classifier-free with the empty prompt encoded (not zeros), as the pipeline does for negative_prompt="".
    """

    text_encoder: nn.Module = None  # type: ignore[assignment]
    tokenizer: Any = None
    text_encoder_2: nn.Module = None  # type: ignore[assignment]
    tokenizer_2: Any = None
    text_encoder_3: nn.Module = None  # type: ignore[assignment]
    tokenizer_3: Any = None
    t5_length: int = 256  # the pipeline's max_sequence_length

    family = "sd3"
    defaults = FlowDefaults(steps=50, n_max=33, source_guidance_scale=3.5, target_guidance_scale=13.5)

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.text_encoder_2, self.text_encoder_3]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        ids = [
            token_ids(tokenizer, prompts, limit, self.device)
            for tokenizer, limit in (
                (self.tokenizer, self.text_encoder.config.max_position_embeddings),
                (self.tokenizer_2, self.text_encoder_2.config.max_position_embeddings),
                (self.tokenizer_3, self.t5_length),
            )
        ]
        return self.embed_ids(*ids)

    @torch.no_grad()
    def embed_ids(self, clip_ids: torch.Tensor, clip_2_ids: torch.Tensor, t5_ids: torch.Tensor) -> PromptEmbeddings:
        """The conditioning of token ids already made (a training loop's batches come as ids)."""
        clip, pooled = [], []
        for ids, encoder in ((clip_ids, self.text_encoder), (clip_2_ids, self.text_encoder_2)):
            with visiting(encoder, self.device, self.offload_text):
                out = encoder(ids.to(self.device), output_hidden_states=True)
            clip.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        with visiting(self.text_encoder_3, self.device, self.offload_text):
            t5 = self.text_encoder_3(t5_ids.to(self.device))[0]
        joined = torch.cat(clip, dim=-1)
        joined = F.pad(joined, (0, t5.shape[-1] - joined.shape[-1]))
        hidden = torch.cat([joined, t5.to(joined.dtype)], dim=-2)
        return PromptEmbeddings(hidden.to(self.dtype), torch.cat(pooled, dim=-1).to(self.dtype))

    def null_embeddings(self) -> PromptEmbeddings:
        return self.encode_prompts([""])

    def check_guidance_scales(self, source: float | None, target: float | None) -> None:
        if source is None or target is None:
            raise GasError(
                "SD3 edits use classifier-free guidance: set --flow.source_guidance_scale and "
                "--flow.target_guidance_scale (FlowEdit's: 3.5 and 13.5, configs/sd3.yaml)"
            )

    def _call(self, z_t, t, cond, guidance):
        return self.transformer(
            hidden_states=z_t.to(self.dtype),
            timestep=(t * 1000).to(self.dtype),
            encoder_hidden_states=cond.hidden,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]


@dataclass
class FluxBackbone(FlowBackbone):
    """FLUX.1 (FluxPipeline's conventions): CLIP's pooled output and T5's tokens, 2x2-packed latent tokens.

    FLUX-dev is guidance-distilled: the guidance strength is an input of the transformer (one call per
    branch, no unconditional branch); FLUX-schnell has no guidance input at all.
    """

    text_encoder: nn.Module = None  # type: ignore[assignment]
    tokenizer: Any = None
    text_encoder_2: nn.Module = None  # type: ignore[assignment]
    tokenizer_2: Any = None

    family = "flux"

    @property
    def defaults(self) -> FlowDefaults:  # type: ignore[override]
        """FlowEdit's FLUX settings (published for dev); schnell keeps its grid and takes no guidance scales."""
        scales = (1.5, 5.5) if self.guidance_embeds else (None, None)
        return FlowDefaults(28, 24, *scales)

    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def t5_length(self) -> int:
        return 512 if self.guidance_embeds else 256  # FluxPipeline's max_sequence_length (schnell allows 256)

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        with visiting(self.text_encoder, self.device, self.offload_text):
            limit = self.text_encoder.config.max_position_embeddings
            pooled = self.text_encoder(token_ids(self.tokenizer, prompts, limit, self.device)).pooler_output
        with visiting(self.text_encoder_2, self.device, self.offload_text):
            hidden = self.text_encoder_2(token_ids(self.tokenizer_2, prompts, self.t5_length, self.device))[0]
        return PromptEmbeddings(hidden.to(self.dtype), pooled.to(self.dtype))

    def check_guidance_scales(self, source: float | None, target: float | None) -> None:
        if not self.guidance_embeds:
            if source is not None or target is not None:
                raise GasError(
                    f"{self.source!r} is a FLUX model without a guidance input (schnell): it cannot use guidance "
                    f"scales ({source}, {target}); set --flow.source_guidance_scale null --flow.target_guidance_scale null"
                )
            return
        bad = [s for s in (source, target) if s is None or not math.isfinite(s) or s < 1.0]
        if bad:
            raise GasError(
                f"FLUX-dev takes its guidance as a distilled strength of at least 1 (one call per branch, no "
                f"unconditional branch to extrapolate from), got source {source} and target {target}; "
                "use FlowEdit's 1.5 and 5.5 (configs/flux.yaml)"
            )

    def image_ids(self, h: int, w: int) -> torch.Tensor:
        """(h/2 * w/2, 3) positions (0, row, col) of the packed tokens, as FluxPipeline makes them."""
        rows = torch.arange(h // 2, device=self.device).repeat_interleave(w // 2)
        cols = torch.arange(w // 2, device=self.device).repeat(h // 2)
        return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(self.dtype)

    def _call(self, z_t, t, cond, guidance):
        h, w = z_t.shape[-2:]
        out = self.transformer(
            hidden_states=pack(z_t).to(self.dtype),
            timestep=t.to(self.dtype),
            guidance=None if guidance is None else guidance.to(self.dtype),
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.hidden,
            txt_ids=torch.zeros(cond.hidden.shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=self.image_ids(h, w),
            return_dict=False,
        )[0]
        return unpack(out, h, w)
