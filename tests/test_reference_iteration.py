"""The `sequential` schedule against one iteration of the reference implementation, re-written here.

The reference is Ground-A-Score/Ground-A-Score, `groundascore/groundascore.py` (`image_optimization`,
`DDSLoss.get_dds_loss`) and `groundascore/loss.py` (`CutLoss`). `_Reference` below follows that code
step by step, as read, without calling anything of this package but the tiny model's folder:

- boxes to latent cells with Python's `round()` on both edges; a subtask's mask 1 in its cells and
  0.3 where another box's intersection ratio (intersection over that box's cells) is higher; the
  whole-scene mask `torch.any` of the subtask masks; the null-text penalty for boxes under 15%;
- for every term in turn its own t (the reference's `randint(50, 949)`) and noise, one UNet call on
  [z_src_t, z_t, z_src_t, z_t] with [null, null, source, target], CFG 7.5, gamma from the raw target
  prediction, the loss `sum(z * grad * mask) / (h w)`, times beta(t) for the whole scene, `(2000 *
  loss).backward()`, then the CDS gradient masked and added, and one SGD(lr 0.1) step;
- CDS: the up-block self-attention outputs of the DDS call's third sample (source latent, source
  text) as reference, a second UNet call on z_t with the target text with gradient; each map cropped
  to the box at its resolution (latent cells / downscale, `round()`, an empty side widened by one),
  then pooled (sizes 1 and 2), normalised, up to 256 patches, PatchNCE with the *source* patch as
  anchor and the softmax over the target patches, the diagonal of the negatives filled with -10,
  temperature 0.07, mean over patches, summed over sizes and layers.

The reference's `attn.hs` is the attention processor's output after `to_out`, before the residual;
diffusers' `attn1` has no residual connection and a rescale factor of 1, so a forward hook on the
`attn1` module returns the same tensor. The UNet here hooks self-attention at two resolutions (the
latent's and half of it), the boxes are not multiples of 1/8, a small box (penalty) sits inside a
large one, and the preserve-form box overlaps the large one and starts on an odd cell at each
resolution, so cropping before or after pooling differ.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gas_lightning.callbacks import NullTextPenalty
from gas_lightning.guidance import GuidanceConfig
from gas_lightning.loading import load_backbone
from gas_lightning.module import GroundAScoreEdit
from gas_lightning.pipeline import build_edit
from gas_lightning.plan import EditPlan
from gas_lightning.testing import build_tiny_sd

SOURCES, TARGETS = ["a dog", "grass", "a red ball"], ["a cat", "snow", "a blue ball"]
SOURCE_PROMPT, TARGET_PROMPT = "a dog on grass, a red ball", "a cat on snow, a blue ball"
BOXES = [[0.09, 0.13, 0.41, 0.44], [0.03, 0.06, 0.78, 0.72], [0.38, 0.44, 0.94, 0.97]]
PRESERVE = [False, False, True]
# (iteration, term) -> t; the whole scene (last) meets beta buckets 2, 1 and 4
TIMESTEPS = [[120, 640, 931, 455], [877, 63, 301, 250], [512, 777, 199, 880]]


def _image() -> Image.Image:
    im = Image.new("RGB", (32, 32), (90, 160, 60))
    im.paste((200, 40, 40), (4, 5, 13, 14))
    im.paste((40, 40, 200), (14, 15, 30, 31))
    return im


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """The tiny SD folder with a UNet that has self-attention in both up blocks (16 x 16 and 8 x 8)."""
    from diffusers import UNet2DConditionModel

    folder = build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_two_levels"))
    torch.manual_seed(3)
    UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).save_pretrained(folder / "unet")
    return str(folder)


class _Reference:
    """groundascore.py's image_optimization, one iteration at a time, on the CPU in float32."""

    def __init__(self, model_dir: str):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
        self.vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
        self.text = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
        self.tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        ab = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler").alphas_cumprod
        self.alphas, self.sigmas = ab.sqrt(), (1 - ab).sqrt()
        self.attn1 = {
            n: m for n, m in self.unet.named_modules() if type(m).__name__ == "Attention" and "attn1" in n and "up" in n
        }
        self.hs = {}
        for name, module in self.attn1.items():
            module.register_forward_hook(lambda mod, args, out, name=name: self.hs.__setitem__(name, out))

    @torch.no_grad()
    def embed(self, text: str) -> torch.Tensor:
        ids = self.tok(
            [text], padding="max_length", max_length=self.tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text(ids).last_hidden_state

    @torch.no_grad()
    def z_source(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image)).float().permute(2, 0, 1)[None] / 127.5 - 1
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    @staticmethod
    def masks(boxes, h, w):
        """The reference's bboxes_int and masks; the last box is the whole image [0, 0, 1, 1]."""
        ints = [[round(b[0] * w), round(b[1] * h), round(b[2] * w), round(b[3] * h)] for b in boxes]
        whole = [0, 0, w, h]
        out = []
        for i, box in enumerate(ints):
            mask = torch.zeros(1, 4, h, w)
            if i < len(ints) - 1:
                mask[:, :, box[1] : box[3], box[0] : box[2]] = 1
                for other in ints:
                    if other == box or other == whole:
                        continue
                    xa, ya, xb, yb = (
                        max(box[0], other[0]),
                        max(box[1], other[1]),
                        min(box[2], other[2]),
                        min(box[3], other[3]),
                    )
                    inter = max(0, xb - xa) * max(0, yb - ya)
                    if inter == 0:
                        continue
                    ratio_box = inter / ((box[2] - box[0]) * (box[3] - box[1]))
                    ratio_other = inter / ((other[2] - other[0]) * (other[3] - other[1]))
                    if int(np.argmax([ratio_box, ratio_other])) == 1:
                        mask[:, :, ya:yb, xa:xb] = 0.3
            else:
                mask = torch.any(torch.stack(out), dim=0).float() if i > 0 else torch.ones(1, 4, h, w)
            out.append(mask)
        return ints, out

    @staticmethod
    def cut_loss(ref: torch.Tensor, trg: torch.Tensor) -> torch.Tensor:
        """CutLoss(256, [1, 2]).get_attn_cut_loss on (1, a, b, C) crops."""
        ref, trg = ref.permute(0, 3, 1, 2), trg.permute(0, 3, 1, 2)
        a, b = ref.shape[-2:]
        loss = 0
        for ps in (1, 2):
            if ps > 1 and not (a == 1 and b == 1):
                kernel = (1, ps) if a == 1 else (ps, 1) if b == 1 else (ps, ps)
                rp, tp = F.avg_pool2d(ref, kernel), F.avg_pool2d(trg, kernel)
            else:
                rp, tp = ref, trg
            rp, tp = F.normalize(rp, dim=1), F.normalize(tp, dim=1)
            rp, tp = rp.permute(0, 2, 3, 1).flatten(1, 2), tp.permute(0, 2, 3, 1).flatten(1, 2)
            ids = torch.from_numpy(np.random.permutation(rp.shape[1])[:256])
            rs, ts = rp[0, ids].detach(), tp[0, ids]  # PatchNCELoss: the reference patches are detached
            n = rs.shape[0]
            l_pos = (rs * ts).sum(dim=1, keepdim=True)
            l_neg = rs @ ts.T
            l_neg = l_neg.masked_fill(torch.eye(n, dtype=torch.bool), -10.0)
            out = torch.cat([l_pos, l_neg], dim=1) / 0.07
            loss = loss + F.cross_entropy(out, torch.zeros(n, dtype=torch.long), reduction="none").mean()
        return loss

    def run(self, z_src, draws, loss_scale=2000.0, lr=0.1):
        h, w = z_src.shape[-2:]
        boxes = BOXES + [[0, 0, 1, 1]]
        ints, masks = self.masks(boxes, h, w)
        null = self.embed("")
        sources, targets = [*SOURCES, SOURCE_PROMPT], [*TARGETS, TARGET_PROMPT]
        reweight = [(b[3] - b[1]) * (b[2] - b[0]) < 0.15 for b in boxes]
        cds = [*PRESERVE, False]
        z = z_src.clone().requires_grad_(True)
        opt = torch.optim.SGD([z], lr=lr)
        for row in draws:
            for j, ((t, eps), src, tgt) in enumerate(zip(row, sources, targets)):
                emb_src, emb_tgt, mask, box = self.embed(src), self.embed(tgt), masks[j], ints[j]
                a, s = self.alphas[t], self.sigmas[t]
                tt = torch.tensor([t])
                with torch.no_grad():
                    zs_t, zt_t = a * z_src + s * eps, a * z + s * eps
                    lat = torch.cat([zs_t, zt_t] * 2)
                    e = self.unet(lat, torch.cat([tt] * 4), torch.cat([null, null, emb_src, emb_tgt])).sample
                    ref_feats = {n: v[2:3].detach() for n, v in self.hs.items()}
                    e_unc, e_c = e.chunk(2)
                    e_cfg = e_unc + 7.5 * (e_c - e_unc)
                    eps_src, eps_tgt = e_cfg.chunk(2)
                    gamma = ((e_unc[1:] - e_c[1:]) * 5).abs().mul(mask).mean().clamp(0, 1) if reweight[j] else 1
                    grad = (eps_tgt - eps_src) * gamma
                cutloss = 0
                if cds[j]:
                    with torch.enable_grad():
                        self.unet(a * z + s * eps, tt, emb_tgt)
                        for name in self.attn1:
                            curr, ref = self.hs[name], ref_feats[name]
                            side = int(curr.size(1) ** 0.5)
                            scale = h // side
                            scaled = list(box) if scale == 1 else [round(v / scale) for v in box]
                            if scaled[1] == scaled[3]:
                                scaled[3] += 1
                            if scaled[0] == scaled[2]:
                                scaled[2] += 1
                            ref = ref.reshape(1, side, side, -1)[:, scaled[1] : scaled[3], scaled[0] : scaled[2]]
                            curr = curr.reshape(1, side, side, -1)[:, scaled[1] : scaled[3], scaled[0] : scaled[2]]
                            cutloss = cutloss + self.cut_loss(ref.float(), curr.float())
                loss = (z * grad * mask).sum() / (h * w)
                if j == len(boxes) - 1:
                    loss = loss * [0.5, 0.4, 0.3, 0.2, 0.1][t // 200]
                opt.zero_grad()
                (loss_scale * loss).backward()
                if cds[j]:
                    z.grad += torch.autograd.grad(cutloss, z)[0] * mask
                opt.step()
        return z.detach()


def _draws(shape, seed=11):
    gen = torch.Generator().manual_seed(seed)
    return [[(t, torch.randn(shape, generator=gen)) for t in row] for row in TIMESTEPS]


def _package_run(model_dir, draws, monkeypatch, config=None):
    plan = EditPlan.from_lists(
        SOURCES,
        TARGETS,
        boxes=BOXES,
        preserve_form=[int(p) for p in PRESERVE],
        source_prompt=SOURCE_PROMPT,
        target_prompt=TARGET_PROMPT,
    )
    backbone = load_backbone(model_dir, attention="sdpa")
    module = build_edit(backbone, _image(), plan, guidance_config=config or GuidanceConfig(), schedule="sequential")
    queue = iter([d for row in draws for d in row])
    monkeypatch.setattr(GroundAScoreEdit, "_draw", lambda self, gen, term=None: next(queue))
    L.Trainer(
        max_steps=len(draws),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NullTextPenalty()],
    ).fit(module)
    return module


@pytest.fixture(scope="module")
def reference(model_dir):
    ref = _Reference(model_dir)
    z_src = ref.z_source(_image())
    draws = _draws(z_src.shape)
    np.random.seed(0)
    return z_src, draws, ref.run(z_src, draws)


def test_the_case_covers_what_it_claims(model_dir):
    h = w = 16
    ints, masks = _Reference.masks(BOXES + [[0, 0, 1, 1]], h, w)
    assert ints[:3] == [[1, 2, 7, 7], [0, 1, 12, 12], [6, 7, 15, 16]]  # edges rounded, 15.52 -> 16
    assert any(abs(v * 8 - round(v * 8)) > 1e-9 for b in BOXES for v in b)  # not multiples of 1/8
    assert bool((masks[1] == 0.3).any()) and not bool((masks[0] == 0.3).any())  # the large box is lowered
    assert [(b[3] - b[1]) * (b[2] - b[0]) < 0.15 for b in BOXES] == [True, False, False]
    assert {t // 200 for t in (row[-1] for row in TIMESTEPS)} == {1, 2, 4} and max(map(max, TIMESTEPS)) <= 948
    # the preserve box starts on an odd cell at each hooked resolution: row 7 at 16 x 16, column round(6 / 2) = 3
    # at 8 x 8, so size-2 pooling of the crop and of the whole map fall on different cells
    assert ints[2][1] % 2 == 1 and round(ints[2][0] / 2) % 2 == 1


def test_sequential_schedule_matches_the_reference_implementation(model_dir, reference, monkeypatch):
    z_src, draws, expected = reference
    module = _package_run(model_dir, draws, monkeypatch)
    torch.testing.assert_close(module.z_src, z_src, rtol=1e-5, atol=1e-5)
    moved = (expected - z_src).abs().max()
    assert moved > 1e-3, "the reference iteration must move the latent for the comparison to mean anything"
    # float summation order (the patches are drawn in another order) leaves ~1e-6 of the movement
    torch.testing.assert_close(module.latent.detach(), expected, rtol=1e-4, atol=1e-4 * float(moved))


def test_the_comparison_notices_the_earlier_cds_scale(model_dir, reference, monkeypatch):
    """The earlier CDS scaling (mean over layers and sizes, x3, inside the x2000 loss scale) is far from it."""
    from gas_lightning.guidance import CDSConfig

    z_src, draws, expected = reference
    legacy = GuidanceConfig(cds=CDSConfig(weight=3.0, reduction="mean", loss_scaled=True))
    module = _package_run(model_dir, draws, monkeypatch, legacy)
    assert not torch.allclose(module.latent.detach(), expected, rtol=1e-3, atol=1e-4)
