"""Grounded Delta Denoising Score: the per-term gradients of Ground-A-Score.

A *term* is one subtask (source phrase -> target phrase, masked to its box) or the
whole-scene sentence pair (masked to the union, weighted by beta(t)). Each term's gradient on
the latent z is

    weight * gamma * M * [cfg(e(z_t, y)) - cfg(e(z_t^src, x))] / (h w)

Two ways to evaluate them share this file so that they cannot drift apart:
`term_gradient` (one term alone, 4 UNet samples: the reference's sequential schedule) and
`batched_gradient` (all terms in one UNet call). The batched call either shares one t and
noise between all terms (`batched_noise="shared"`: 2n conditional samples and two null-text
samples shared by every term) or gives each term its own t and noise as the sequential schedule
does (`"per_term"`: 4n samples, still one call), which keeps the terms' noise independent; with
`"keep_aware"` a keep term shares a draw, and so its two null-text samples, with an edit term.

The preserve-form (CDS) gradient is returned in the same units as the DDS gradient, i.e.
divided by the DDS loss scale unless `cds.loss_scaled`: the optimiser step multiplies the sum by
the loss scale, so the CDS part enters unscaled, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gas_lightning.backbone import Backbone, PromptEmbeddings, alpha_sigma, to_device
from gas_lightning.guidance.cds import CDSConfig, SelfAttentionCapture, crop_at, patch_nce, to_maps
from gas_lightning.masks import OVERLAP_WEIGHT
from gas_lightning.plan import WHOLE_IMAGE, Box

FULL_PROMPT_WEIGHTS = (0.5, 0.4, 0.3, 0.2, 0.1)
# The CDS loss's factor before its backward pass through half-precision weights (SDXL), divided out after: a
# power of two, so the scaling itself is exact. It lifts gradients down to 6e-8 / 1024 = 6e-11 out of float16's
# underflow; entries it pushes past 65504 / 1024 = 64 overflow and are counted as non-finite (module: nonfinite).
CDS_HALF_LOSS_SCALE = 1024.0
BATCHED_NOISE = ("shared", "per_term", "keep_aware")


@dataclass
class GuidanceConfig:
    """Constants of the method (DESIGN.md); defaults are the reference's."""

    guidance_scale: float = 7.5
    # CFG scale of subtasks whose box covers at least `wide_area` of the image (backgrounds);
    # None = guidance_scale. Wide uniform regions saturate at the scale small objects need.
    wide_guidance_scale: float | None = None
    wide_area: float = 0.5
    # CFG scale of keep subtasks (source == target); None = guidance_scale, the reference. Both predictions of
    # a keep term carry the same text, so CFG only multiplies how that text's pull differs between the edited
    # and the source latent; on the latent world's snapshot the multiplied part points away from the source
    # (docs/latent_world.md). Under study for configs/shapes-latent.yaml: removed if the study drops it.
    keep_guidance_scale: float | None = None
    t_min: int = 50
    t_max: int = 948  # inclusive: the reference's torch.randint(50, 949) never draws 949
    # an edit subtask's target-text guidance raised, per step, to the source text's strength in its region:
    # w * max(1, sum|e0_src - e_x| M / sum|e0 - e_y| M) on the target branch, the source branch at w. Where the
    # target text barely moves the prediction, plain DDS is mostly minus the source text's pull, which erases the
    # object into the ground; the text part's size in the region is then the source text's, so a weak target text
    # is scaled up to it, not without bound. False: the reference (configs/shapes.yaml turns it on).
    target_balance: bool = False
    full_prompt: bool = True
    full_prompt_weights: tuple[float, ...] = FULL_PROMPT_WEIGHTS
    overlap_weight: float = OVERLAP_WEIGHT  # a larger region's mask where a smaller one sits inside it
    # batched schedule: one t and noise for all terms ("shared", DESIGN.md), one per term ("per_term",
    # the sequential schedule's sampling inside the one UNet call), or one per term except that a keep
    # term takes the draw of the edit it overlaps most ("keep_aware"; see shielded_term)
    batched_noise: str = "shared"
    cds: CDSConfig = field(default_factory=CDSConfig)

    def __post_init__(self) -> None:
        from gas_lightning.errors import GasError

        if self.batched_noise not in BATCHED_NOISE:
            raise GasError(
                f"guidance.batched_noise must be one of {', '.join(BATCHED_NOISE)}, got {self.batched_noise!r}"
            )

    def beta(self, t: int) -> float:
        """Whole-scene weight beta(t): 0.5 at low noise down to 0.1 at high noise, in buckets of 200 steps."""
        return float(self.full_prompt_weights[min(int(t) // 200, len(self.full_prompt_weights) - 1)])


@dataclass(frozen=True)
class Term:
    """One guidance term, resolved to tensors on the model's device."""

    name: str
    src_emb: PromptEmbeddings  # one prompt's conditioning, as the backbone made it
    tgt_emb: PromptEmbeddings
    mask: torch.Tensor  # (h, w)
    weight: float  # intensity, or the whole-scene weight (times beta(t) at use)
    is_full: bool = False
    penalty: bool = False
    preserve_form: bool = False
    keep: bool = False  # a keep subtask (source == target): it shields its object from the edits around it
    box: Box | None = None
    guidance_scale: float | None = None  # None: the config's guidance_scale
    region: torch.Tensor | None = None  # a masked subtask's own (h, w) weight (the CDS region); None: the box


def _first_of(keys: Sequence) -> tuple[list[int], list[int]]:
    """The index of each distinct key's first occurrence, and for every position the slot of its key."""
    slots: dict = {}
    first = []
    for i, key in enumerate(keys):
        if key not in slots:
            slots[key] = len(first)
            first.append(i)
    return first, [slots[key] for key in keys]


def _rows(x: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
    """x[index] from slices: a list index would be copied to the accelerator, and this stays on it."""
    if list(index) == list(range(x.shape[0])):
        return x
    return torch.cat([x[i : i + 1] for i in index])


def shielded_term(terms: Sequence[Term], k: int) -> int:
    """The edit term a keep term protects its object from: the one whose mask overlaps it most.

    Under per-term sampling a keep term's pull back and the background edit's push on the same
    pixels come from independent timesteps, and a high-noise background step can outweigh a
    low-noise keep step; sharing the draw makes them cancel as under one shared t. Returns k when
    no edit term overlaps it.
    """
    overlaps = [(float((terms[k].mask * tm.mask).sum()), i) for i, tm in enumerate(terms) if not tm.keep]
    best = max(overlaps, default=(0.0, k))
    return best[1] if best[0] > 0 else k


@dataclass
class TermLog:
    """One term's diagnostics of a step, kept as tensors: turning one into a number waits for the
    accelerator to finish the step, so the module reads them on logging steps only."""

    t: int
    gamma_tensor: torch.Tensor
    grad_norm_tensor: torch.Tensor  # of the finite entries
    cds_loss_tensor: torch.Tensor | None = None
    nonfinite_tensor: torch.Tensor | None = None  # how many entries of the term's gradient are NaN or infinite

    @property
    def gamma(self) -> float:
        return float(self.gamma_tensor)

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_tensor)

    @property
    def cds_loss(self) -> float | None:
        return None if self.cds_loss_tensor is None else float(self.cds_loss_tensor)

    @property
    def nonfinite(self) -> int:
        return 0 if self.nonfinite_tensor is None else int(self.nonfinite_tensor)

    def add_nonfinite(self, grad: torch.Tensor) -> None:
        """Count a further part of the term's gradient (its CDS gradient)."""
        bad = (~torch.isfinite(grad)).sum()
        self.nonfinite_tensor = bad if self.nonfinite_tensor is None else self.nonfinite_tensor + bad


class GroundedScoreGuidance:
    """Frozen-model side of the edit: turns (z, z_src, terms, t, eps) into a gradient on z.

    Deliberately not an nn.Module: it must never become a child of the LightningModule, so
    the frozen networks stay out of state_dict, checkpoints and DDP.
    """

    def __init__(
        self,
        backbone: Backbone,
        config: GuidanceConfig | None = None,
        null_embedding: PromptEmbeddings | torch.Tensor | None = None,
        loss_scale: float = 2000.0,
    ):
        self.backbone = backbone
        self.config = config or GuidanceConfig()
        self.loss_scale = float(loss_scale)  # the optimiser step's; the CDS gradient is divided by it
        self.null = PromptEmbeddings.of(null_embedding) if null_embedding is not None else backbone.null_embeddings()
        self._capture: SelfAttentionCapture | None = None
        self.penalty_coefficient = 5.0

    @property
    def capture(self) -> SelfAttentionCapture:
        if self._capture is None:
            self._capture = SelfAttentionCapture(self.backbone.unet)
        return self._capture

    def to(self, device: torch.device) -> GroundedScoreGuidance:
        self.backbone.to(device)
        self.null = self.null.to(device)
        return self

    # helpers --------------------------------------------------------------------------------
    def _noisy(self, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a, s = alpha_sigma(self.backbone.alphas_cumprod, t, z.ndim)
        return a * z + s * eps

    def _cfg(self, e0: torch.Tensor, ec: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        return e0 + (self.config.guidance_scale if scale is None else scale) * (ec - e0)

    def _weight(self, term: Term, t: int) -> float:
        return term.weight * (self.config.beta(t) if term.is_full else 1.0)

    def _gamma(self, term: Term, e0_tgt: torch.Tensor, ec_tgt: torch.Tensor) -> torch.Tensor:
        """Null-text penalty: small when the target text barely changes the prediction in the box
        (c times the target gap's mean over the whole tensor, as the reference)."""
        if not term.penalty:
            return torch.ones((), device=e0_tgt.device)
        return (self.penalty_coefficient * ((e0_tgt - ec_tgt).abs() * term.mask).mean()).clamp(0.0, 1.0)

    @staticmethod
    def _gap(e0: torch.Tensor, ec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """How far the text moves the prediction inside a region (summed; compared only as ratios)."""
        return ((e0 - ec).abs() * mask).sum()

    def _gap_ratio(self, term: Term, e0_src, e0_tgt, ec_src, ec_tgt) -> torch.Tensor:
        """The target text's gap on the current latent over the source text's gap on the source, in the term's region."""
        return self._gap(e0_tgt, ec_tgt, term.mask) / self._gap(e0_src, ec_src, term.mask).clamp_min(1e-12)

    def _dds(self, term: Term, t: int, e0_src, e0_tgt, ec_src, ec_tgt) -> tuple[torch.Tensor, TermLog]:
        h, w = e0_src.shape[-2:]
        gamma = self._gamma(term, e0_tgt, ec_tgt)
        source_scale = target_scale = self.config.guidance_scale if term.guidance_scale is None else term.guidance_scale
        if self.config.target_balance and not (term.keep or term.is_full):
            ratio = self._gap_ratio(term, e0_src, e0_tgt, ec_src, ec_tgt)
            # a zero target gap leaves nothing to scale up: the 1e-6 floor only keeps 0 * inf out
            target_scale = target_scale / ratio.clamp(min=1e-6, max=1.0)
        direction = self._cfg(e0_tgt, ec_tgt, target_scale) - self._cfg(e0_src, ec_src, source_scale)
        grad = self._weight(term, t) * gamma * term.mask * direction / (h * w)
        finite = torch.isfinite(grad)  # non-finite entries are counted here and left to the module (see nonfinite)
        return grad, TermLog(
            t=t,
            gamma_tensor=gamma,
            grad_norm_tensor=torch.where(finite, grad, 0).norm(),
            nonfinite_tensor=(~finite).sum(),
        )

    def _cds(
        self,
        z: torch.Tensor,
        z_src: torch.Tensor,
        terms: Sequence[Term],
        t: torch.Tensor,
        eps: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Gradient of the PatchNCE losses of `terms` on z, each masked to its term's region.

        `t` (n,) and `eps` (n, C, h, w) give each term its own timestep and noise (or one shared,
        expanded). Reference branch: source latent and source text; edited branch: z with the
        target text. Returned in DDS-gradient units (see the module docstring).
        """
        cfg = self.config.cds
        bb = self.backbone
        n = len(terms)
        h, w = z.shape[-2:]
        tt = t.expand(n)
        src_emb = PromptEmbeddings.cat([tm.src_emb for tm in terms])
        tgt_emb = PromptEmbeddings.cat([tm.tgt_emb for tm in terms])
        # Autocast off: with float32 weights (SD 1.x/2.x) both passes run in float32, as the reference's CDS.
        # With half weights (SDXL) the loss is scaled before the backward pass and the gradient unscaled after.
        half = bb.dtype in (torch.float16, torch.bfloat16)
        scale = CDS_HALF_LOSS_SCALE if half else 1.0
        with torch.autocast(z.device.type, enabled=False), torch.no_grad(), self.capture.capture() as ref:
            bb.denoise(self._noisy(z_src.expand(n, -1, -1, -1), tt, eps), tt, src_emb)
        with torch.autocast(z.device.type, enabled=False), torch.enable_grad():
            z_leaf = z.detach().requires_grad_(True)
            # z*M + (z*(1-M)).detach(): the same value, a gradient that stays inside the mask.
            masks = torch.stack([tm.mask for tm in terms])[:, None]
            z_masked = z_leaf * masks + (z_leaf * (1 - masks)).detach()
            with self.capture.capture() as cur:
                bb.denoise(self._noisy(z_masked, tt, eps), tt, tgt_emb)
            losses = []
            for i, tm in enumerate(terms):
                region = tm.region if tm.region is not None else (tm.box or WHOLE_IMAGE)
                per_layer = []
                for q, k in zip(cur, ref):
                    qm, km = to_maps(q, h, w)[i], to_maps(k, h, w)[i]
                    rows, cols, weights = crop_at(region, (h, w), tuple(qm.shape[-2:]))
                    per_layer.append(patch_nce(qm, km, rows, cols, weights, cfg, generator))
                loss = sum(per_layer) if cfg.reduction == "sum" else sum(per_layer) / max(len(per_layer), 1)
                losses.append(loss)
            total = cfg.weight * torch.stack(losses).sum()
            (grad,) = torch.autograd.grad(total * scale, z_leaf)
        grad = grad.float() / scale
        if not cfg.loss_scaled:
            grad = grad / self.loss_scale
        return grad, [v.detach() for v in losses]

    # the two schedules ------------------------------------------------------------------------
    @torch.no_grad()
    def term_gradient(
        self,
        z: torch.Tensor,
        z_src: torch.Tensor,
        term: Term,
        t: int,
        eps: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, TermLog]:
        """One term alone: [null src, null tgt, x src, y tgt] in one UNet call."""
        tt = to_device(torch.tensor([t]), z.device)
        z_t_src, z_t_tgt = self._noisy(z_src, tt, eps), self._noisy(z, tt, eps)
        lat = torch.cat([z_t_src, z_t_tgt, z_t_src, z_t_tgt])
        emb = PromptEmbeddings.cat([self.null, self.null, term.src_emb, term.tgt_emb])
        e = self.backbone.predict_eps(lat, tt.expand(4), emb)
        grad, tlog = self._dds(term, t, e[0:1], e[1:2], e[2:3], e[3:4])
        if term.preserve_form and generator is not None:
            g, (loss,) = self._cds(z, z_src, [term], tt, eps, generator)
            grad = grad + g
            tlog.cds_loss_tensor = loss
            tlog.add_nonfinite(g)
        return grad, tlog

    @torch.no_grad()
    def batched_gradient(
        self,
        z: torch.Tensor,
        z_src: torch.Tensor,
        terms: Sequence[Term],
        t: int | Sequence[int],
        eps: torch.Tensor | Sequence[torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, list[TermLog]]:
        """All terms in one UNet call.

        One `t` and `eps`: shared by every term, 2n + 2 conditional and 2 shared null-text samples.
        A sequence of n of each: term k at (t[k], eps[k]), 4n samples (its own null-text pair each),
        the same noise structure as the sequential schedule; terms handed the same noise tensor (keep_aware)
        share their null-text samples.
        """
        n = len(terms)
        per_term = not isinstance(t, int)
        ts = [int(v) for v in t] if per_term else [int(t)] * n
        if per_term and (len(ts) != n or len(eps) != n):
            raise ValueError(f"per-term sampling needs {n} timesteps and noises, got {len(ts)} and {len(eps)}")
        tt = to_device(torch.tensor(ts), z.device)
        noise = torch.cat(list(eps)) if per_term else eps.expand(n, -1, -1, -1)
        z_t_src, z_t_tgt = (
            self._noisy(z_src.expand(n, -1, -1, -1), tt, noise),
            self._noisy(z.expand(n, -1, -1, -1), tt, noise),
        )
        cond = [tm.src_emb for tm in terms] + [tm.tgt_emb for tm in terms]
        if per_term:  # [null src x a, null tgt x a, x src x n, y tgt x n], a <= n
            # Terms given the same draw (keep_aware: the same eps object) noise the same z and z_src, so their
            # null-text predictions are the same samples: each is computed once. Without shared draws a = n,
            # the sequential schedule's 4n samples.
            first, slot = _first_of([(ts[i], id(eps[i])) for i in range(n)])
            a = len(first)
            lat = torch.cat([_rows(z_t_src, first), _rows(z_t_tgt, first), z_t_src, z_t_tgt])
            emb = PromptEmbeddings.cat([self.null.expand(2 * a)] + cond)
            e = self.backbone.predict_eps(lat, torch.cat([_rows(tt, first), _rows(tt, first), tt, tt]), emb)
            e0_src, e0_tgt = _rows(e[:a], slot), _rows(e[a : 2 * a], slot)
            ec_src, ec_tgt = e[2 * a : 2 * a + n], e[2 * a + n :]
        else:  # [null src, null tgt, x src x n, y tgt x n]
            lat = torch.cat([z_t_src[:1], z_t_tgt[:1], z_t_src, z_t_tgt])
            emb = PromptEmbeddings.cat([self.null, self.null] + cond)
            e = self.backbone.predict_eps(lat, torch.cat([tt[:1].expand(2), tt, tt]), emb)
            e0_src, e0_tgt = e[0:1].expand(n, -1, -1, -1), e[1:2].expand(n, -1, -1, -1)
            ec_src, ec_tgt = e[2 : 2 + n], e[2 + n :]
        total = torch.zeros_like(z, dtype=torch.float32)
        logs = []
        for i, tm in enumerate(terms):
            grad, tlog = self._dds(
                tm, ts[i], e0_src[i : i + 1], e0_tgt[i : i + 1], ec_src[i : i + 1], ec_tgt[i : i + 1]
            )
            total += grad
            logs.append(tlog)
        preserve = [i for i, tm in enumerate(terms) if tm.preserve_form]
        k = self.backbone.micro_batch or max(len(preserve), 1)  # the CDS calls keep activations for a backward pass
        for chunk in [preserve[j : j + k] for j in range(0, len(preserve), k)] if generator is not None else []:
            idx = to_device(torch.tensor(chunk), z.device)
            g, losses = self._cds(
                z, z_src, [terms[i] for i in chunk], tt.index_select(0, idx), noise.index_select(0, idx), generator
            )
            total += g
            for i, loss in zip(chunk, losses):  # a chunk's CDS gradient is one: each of its terms counts it
                logs[i].cds_loss_tensor = loss
                logs[i].add_nonfinite(g)
        return total, logs
