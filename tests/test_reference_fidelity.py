"""The `sequential` schedule against one reference iteration written out from DESIGN.md.

Nothing here calls the package's guidance, masks or penalty code: the reference step is
computed with the UNet, text encoder and VAE called directly, the masks, penalty, beta(t),
classifier-free guidance and the CDS PatchNCE loss written from DESIGN.md's formulas. The
package runs the same edit through `build_edit` and a real Trainer with the `NullTextPenalty`
callback; timesteps and noise are fixed by replacing the module's draw, so both sides see the
same (t, eps) for every term of every step.

The plan has: a small box with the null-text penalty (area < 15%), a large box overlapping it
(lowered to 0.3 where the small one sits), a preserve-form subtask, and the whole-scene term.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gas_lightning.backbone import load_backbone
from gas_lightning.callbacks import NullTextPenalty
from gas_lightning.guidance import GuidanceConfig
from gas_lightning.module import GroundAScoreEdit
from gas_lightning.pipeline import build_edit, image_to_tensor
from gas_lightning.plan import EditPlan

BOXES = [(0.125, 0.125, 0.375, 0.375), (0.0, 0.0, 0.75, 0.75), (0.5, 0.625, 1.0, 1.0)]
SOURCES, TARGETS = ["a dog", "grass", "a red ball"], ["a cat", "snow", "a blue ball"]
SOURCE_PROMPT, TARGET_PROMPT = "a dog on grass, a red ball", "a cat on snow, a blue ball"
# (step, term) -> t: every beta(t) bucket of the whole-scene term appears (buckets 0, 1, 3, 4).
TIMESTEPS = [[120, 640, 930, 455], [877, 63, 301, 250], [512, 777, 199, 880]]
LR, LOSS_SCALE, W, C_PENALTY = 0.1, 2000.0, 7.5, 5.0


def _image() -> Image.Image:
    im = Image.new("RGB", (32, 32), (90, 160, 60))
    im.paste((200, 40, 40), (4, 4, 12, 12))
    im.paste((40, 40, 200), (18, 20, 32, 32))
    return im


def _box_cells(box, h, w):
    """Rows and columns of the latent cells a normalised box touches (partly covered cells included)."""
    x0, y0, x1, y1 = box
    return slice(math.floor(y0 * h), math.ceil(y1 * h)), slice(math.floor(x0 * w), math.ceil(x1 * w))


def _reference_masks(h, w):
    """DESIGN.md: M_k = 1 in b_k; 0.3 on an overlap that is a larger share of b_j than of b_k; union for the whole scene."""
    binary = []
    for box in BOXES:
        m = torch.zeros(h, w)
        rows, cols = _box_cells(box, h, w)
        m[rows, cols] = 1
        binary.append(m)
    masks = [m.clone() for m in binary]
    for k in range(len(binary)):
        for j in range(len(binary)):
            inter = (binary[k] * binary[j]).sum()
            if j != k and inter > 0 and inter / binary[j].sum() > inter / binary[k].sum():
                masks[k][(binary[k] * binary[j]) > 0] = 0.3
    full = (torch.stack(binary).sum(0) > 0).float()
    return masks, full


class _Reference:
    """One reference iteration: for each term in turn, its own t and eps, one SGD step."""

    def __init__(self, model_dir: str):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
        self.vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
        self.text = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
        self.tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        self.alphabar = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler").alphas_cumprod
        self.attn1 = [m for n, m in self.unet.named_modules() if n.startswith("up_blocks") and n.endswith("attn1")]
        assert self.attn1, "the tiny UNet must have self-attention in its up blocks"

    @torch.no_grad()
    def embed(self, text: str) -> torch.Tensor:
        ids = self.tok([text], padding="max_length", max_length=self.tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        return self.text(ids)[0]

    def eps(self, z_t, t, emb):
        return self.unet(z_t, torch.tensor([t]), encoder_hidden_states=emb).sample

    def attn_features(self, z_t, t, emb):
        feats = []
        hooks = [m.register_forward_hook(lambda mod, a, out: feats.append(out)) for m in self.attn1]
        try:
            self.unet(z_t, torch.tensor([t]), encoder_hidden_states=emb)
        finally:
            for hk in hooks:
                hk.remove()
        return feats

    def patch_nce(self, q_tokens, k_tokens, box, h, w):
        """PatchNCE, patch sizes 1 and 2 (average pooling), temperature 0.07, every position in the box
        (fewer than 256 here, so the reference's random 256 are all of them), summed over sizes."""
        n = q_tokens.shape[1]
        side_h = round(h / math.sqrt(h * w / n))
        side_w = n // side_h
        q = q_tokens[0].T.reshape(-1, side_h, side_w)
        k = k_tokens[0].T.reshape(-1, side_h, side_w)
        total = 0.0
        for size in (1, 2):
            qs = F.avg_pool2d(q[None], size)[0] if size > 1 else q
            ks = F.avg_pool2d(k[None], size)[0] if size > 1 else k
            rows, cols = _box_cells(box, qs.shape[1], qs.shape[2])
            qf = F.normalize(qs[:, rows, cols].reshape(qs.shape[0], -1).T, dim=1)
            kf = F.normalize(ks[:, rows, cols].reshape(ks.shape[0], -1).T, dim=1)
            logits = kf @ qf.T / 0.07  # the reference's PatchNCELoss: source patches anchor, softmax over edited ones
            total = total + F.cross_entropy(logits, torch.arange(len(qf)))
        return total

    def run(self, z_src, z0, draws, masks, full, penalty, preserve):
        h, w = z_src.shape[-2:]
        null = self.embed("")
        terms = [(self.embed(s), self.embed(t), masks[i], penalty[i], preserve[i], BOXES[i], False)
                 for i, (s, t) in enumerate(zip(SOURCES, TARGETS))]
        terms.append((self.embed(SOURCE_PROMPT), self.embed(TARGET_PROMPT), full, False, False, None, True))
        z = z0.clone()
        for step in range(len(TIMESTEPS)):
            for k, (src, tgt, m, pen, pres, box, is_full) in enumerate(terms):
                t, eps = draws[step][k]
                a, s = self.alphabar[t].sqrt(), (1 - self.alphabar[t]).sqrt()
                zt_src, zt_tgt = a * z_src + s * eps, a * z + s * eps
                with torch.no_grad():
                    e0_src, e0_tgt = self.eps(zt_src, t, null), self.eps(zt_tgt, t, null)
                    ex_src, ey_tgt = self.eps(zt_src, t, src), self.eps(zt_tgt, t, tgt)
                g = (e0_tgt + W * (ey_tgt - e0_tgt)) - (e0_src + W * (ex_src - e0_src))
                gamma = (C_PENALTY * ((e0_tgt - ey_tgt).abs() * m).mean()).clamp(0, 1) if pen else 1.0
                beta = [0.5, 0.4, 0.3, 0.2, 0.1][t // 200] if is_full else 1.0
                grad = LOSS_SCALE * beta * gamma * m * g / (h * w)
                if pres:
                    with torch.no_grad():
                        ref = self.attn_features(zt_src, t, src)
                    zg = z.detach().requires_grad_(True)
                    cur = self.attn_features(a * zg + s * eps, t, tgt)
                    loss = sum(self.patch_nce(q, kk, box, h, w) for q, kk in zip(cur, ref))
                    (g_cds,) = torch.autograd.grad(loss, zg)
                    grad = grad + m * g_cds  # after the x2000 scale, weight 1
                z = z - LR * grad
        return z


@pytest.fixture(scope="module")
def setting(tiny_sd):
    plan = EditPlan.from_lists(SOURCES, TARGETS, boxes=[list(b) for b in BOXES], preserve_form=[0, 0, 1],
                               source_prompt=SOURCE_PROMPT, target_prompt=TARGET_PROMPT)
    return plan, _Reference(tiny_sd)


def _fixed_draws(shape, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [[(t, torch.randn(shape, generator=gen)) for t in row] for row in TIMESTEPS]


def test_sequential_schedule_matches_the_reference_iteration(tiny_sd, setting, monkeypatch):
    plan, ref = setting
    backbone = load_backbone(tiny_sd, attention="sdpa")
    module = build_edit(backbone, _image(), plan, guidance_config=GuidanceConfig(), schedule="sequential",
                        loss_scale=LOSS_SCALE, optimizer=lambda p: torch.optim.SGD(p, lr=LR))
    draws = _fixed_draws(module.latent.shape)
    queue = iter([d for row in draws for d in row])
    monkeypatch.setattr(GroundAScoreEdit, "_draw", lambda self, gen, term=None: next(queue))
    trainer = L.Trainer(max_steps=len(TIMESTEPS), accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[NullTextPenalty()])
    trainer.fit(module)

    with torch.no_grad():  # z_src = VAE mean x scaling factor, computed here from the VAE itself
        pixels = image_to_tensor(_image(), (32, 32))
        z_src = ref.vae.encode(pixels).latent_dist.mean * ref.vae.config.scaling_factor
    torch.testing.assert_close(module.z_src, z_src, rtol=1e-5, atol=1e-5)
    masks, full = _reference_masks(*z_src.shape[-2:])
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in BOXES]
    penalty = [a < 0.15 for a in areas]
    assert penalty == [True, False, False] and bool((masks[1] == 0.3).any())  # the case covers what it claims
    expected = ref.run(z_src, z_src.clone(), draws, masks, full, penalty, preserve=[False, False, True])

    got = module.latent.detach()
    moved = (expected - z_src).abs().max()
    assert moved > 1e-3, "the reference edit must move the latent for the comparison to mean anything"
    # float summation order (the PatchNCE patches are permuted) leaves ~2e-5 of the movement
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(moved))


def test_the_comparison_notices_a_wrong_cds_scale(tiny_sd, setting, monkeypatch):
    """The earlier CDS scaling (mean over layers/sizes, x3, inside the loss scale) is far from the reference."""
    from gas_lightning.guidance import CDSConfig

    plan, ref = setting
    backbone = load_backbone(tiny_sd, attention="sdpa")
    legacy = GuidanceConfig(cds=CDSConfig(weight=3.0, reduction="mean", loss_scaled=True))
    module = build_edit(backbone, _image(), plan, guidance_config=legacy, schedule="sequential",
                        loss_scale=LOSS_SCALE, optimizer=lambda p: torch.optim.SGD(p, lr=LR))
    draws = _fixed_draws(module.latent.shape)
    queue = iter([d for row in draws for d in row])
    monkeypatch.setattr(GroundAScoreEdit, "_draw", lambda self, gen, term=None: next(queue))
    L.Trainer(max_steps=len(TIMESTEPS), accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[NullTextPenalty()]).fit(module)
    z_src = module.z_src
    masks, full = _reference_masks(*z_src.shape[-2:])
    expected = ref.run(z_src, z_src.clone(), draws, masks, full, [True, False, False], preserve=[False, False, True])
    assert not torch.allclose(module.latent.detach(), expected, rtol=1e-3, atol=1e-4)
