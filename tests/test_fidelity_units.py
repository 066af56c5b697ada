"""Independent checks of the method's constants and formulas (DESIGN.md section 1).

Every expected value here is computed without the expression under test: written out by hand
on a tiny grid, taken from diffusers' own scheduler (add_noise / get_velocity /
alphas_cumprod), or computed from DESIGN.md's formula with the raw UNet called directly.
"""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch
from PIL import Image

from gas_lightning.masks import EditMasks, subtask_masks, union_mask
from gas_lightning.plan import EditPlan


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a busy 2-core machine spin-wait
    (about 2 s instead of 10 ms per tiny UNet call)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


W = 7.5  # classifier-free guidance scale (DESIGN.md)
C = 5.0  # null-text penalty coefficient
LR, LOSS_SCALE = 0.1, 2000.0


# ---------------------------------------------------------------------------------------------
# hand-computed pieces: raw UNet, raw text encoder, diffusers' scheduler
# ---------------------------------------------------------------------------------------------


def _scheduler(model: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(model, subfolder="scheduler")


def _embed(bb, prompt: str) -> torch.Tensor:
    """The text encoder called directly (padding to the encoder's 16 positions, as the tiny model has)."""
    ids = bb.tokenizer([prompt], padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return bb.text_encoder(ids)[0]


def _eps(bb, z_t: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
    """The UNet called directly (an epsilon model: its output is the noise prediction)."""
    with torch.no_grad():
        return bb.unet(z_t, torch.tensor([t]), encoder_hidden_states=emb).sample.float()


def _hand_term_grad(
    bb, sched, z, z_src, t, eps, src_emb, tgt_emb, null, mask, *, penalty=False, beta=1.0, target_balance=False
):
    """DESIGN.md: gamma * M * [cfg(e(z_t^tgt, y)) - cfg(e(z_t^src, x))] / (h w), times beta for the whole scene.
    target_balance: the target branch's scale is W * max(1, sum|e0_src - e_x| M / sum|e0_tgt - e_y| M)."""
    ab = sched.alphas_cumprod[t].double()
    a, s = float(ab.sqrt()), float((1 - ab).sqrt())
    zt_src, zt_tgt = a * z_src + s * eps, a * z + s * eps
    e0_src, e0_tgt = _eps(bb, zt_src, t, null), _eps(bb, zt_tgt, t, null)
    ex, ey = _eps(bb, zt_src, t, src_emb), _eps(bb, zt_tgt, t, tgt_emb)
    gamma = 1.0
    if penalty:
        # mean over the WHOLE latent tensor (all channels, all positions), then clamp to [0, 1]
        gamma = min(max(C * float(((e0_tgt - ey).abs() * mask).mean()), 0.0), 1.0)
    w_src = W
    w_tgt = W
    if target_balance:
        w_tgt = W * max(1.0, float(((e0_src - ex).abs() * mask).sum()) / float(((e0_tgt - ey).abs() * mask).sum()))
    direction = (e0_tgt + w_tgt * (ey - e0_tgt)) - (e0_src + w_src * (ex - e0_src))
    h, w = z.shape[-2:]
    return beta * gamma * mask * direction / (h * w), gamma


# ---------------------------------------------------------------------------------------------
# 1. the null-text penalty inside a real Trainer run
# ---------------------------------------------------------------------------------------------

T_FIXED = 450  # beta(450) = 0.3 (DESIGN.md: [0.5, 0.4, 0.3, 0.2, 0.1][t // 200])
SMALL, WIDE = [0.25, 0.25, 0.5, 0.5], [0.5, 0.0, 1.0, 1.0]  # areas 0.0625 (< 0.15) and 0.5: disjoint


def _grid_masks():
    """The two boxes on the 16x16 latent grid of a 32x32 image, written with explicit slices."""
    m_small = torch.zeros(16, 16)
    m_small[4:8, 4:8] = 1
    m_wide = torch.zeros(16, 16)
    m_wide[:, 8:16] = 1
    m_full = torch.zeros(16, 16)
    m_full[4:8, 4:8] = 1
    m_full[:, 8:16] = 1
    return m_small, m_wide, m_full


@pytest.mark.parametrize("schedule", ["batched", "sequential"])
def test_null_text_penalty_in_a_trainer_run_matches_the_hand_computed_gamma(backbone, tiny_sd, monkeypatch, schedule):
    from gas_lightning.callbacks import NullTextPenalty
    from gas_lightning.module import GroundAScoreEdit
    from gas_lightning.pipeline import build_edit

    bb, sched = backbone, _scheduler(tiny_sd)
    plan = EditPlan.from_lists(["a dog", "grass"], ["a cat", "snow"], boxes=[SMALL, WIDE])
    image = Image.new("RGB", (32, 32), (90, 160, 60))
    image.paste((200, 40, 40), (8, 8, 16, 16))
    module = build_edit(bb, image, plan, schedule=schedule)
    eps = torch.randn(module.latent.shape, generator=torch.Generator().manual_seed(123))
    monkeypatch.setattr(GroundAScoreEdit, "_draw", lambda self, gen, term=None: (T_FIXED, eps.to(self.device)))
    z_src = module.z_src.detach().clone()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NullTextPenalty()],
    )
    trainer.fit(module)

    # the same two steps by hand
    m_small, m_wide, m_full = _grid_masks()
    null = _embed(bb, "")
    specs = [  # (source, target, mask, penalty, beta)
        (_embed(bb, "a dog"), _embed(bb, "a cat"), m_small, True, 1.0),
        (_embed(bb, "grass"), _embed(bb, "snow"), m_wide, False, 1.0),  # area 0.5: no penalty
        (_embed(bb, plan.source_prompt), _embed(bb, plan.target_prompt), m_full, False, 0.3),
    ]
    z = z_src.clone()
    for _ in range(2):
        if schedule == "batched":  # every term at the same z, one SGD step with the summed gradient
            parts = [
                _hand_term_grad(bb, sched, z, z_src, T_FIXED, eps, x, y, null, m, penalty=p, beta=b)
                for x, y, m, p, b in specs
            ]
            z = z - LR * LOSS_SCALE * sum(g for g, _ in parts)
            gammas = [g for _, g in parts]
        else:  # one SGD step per term, each at the latent the previous term left
            gammas = []
            for x, y, m, p, b in specs:
                g, gamma = _hand_term_grad(bb, sched, z, z_src, T_FIXED, eps, x, y, null, m, penalty=p, beta=b)
                z = z - LR * LOSS_SCALE * g
                gammas.append(gamma)

    logged = [tl.gamma for tl in module.last_logs]
    assert 0.0 < gammas[0] < 1.0  # not clamped: c and the mean both show in the value
    assert logged[0] == pytest.approx(gammas[0], rel=1e-4)
    assert logged[1] == 1.0 and logged[2] == 1.0
    moved, want = module.latent.detach() - z_src, z - z_src
    scale = float(want.abs().max())
    assert scale > 1e-3
    # float32 noise of a batched vs a single UNet call, times w * lr * 2000: compare relative to the move
    torch.testing.assert_close(moved, want, rtol=0, atol=1e-3 * scale)


# ---------------------------------------------------------------------------------------------
# 2. v-prediction against diffusers' get_velocity
# ---------------------------------------------------------------------------------------------


class _FakeOutput:
    def __init__(self, sample):
        self.sample = sample


def test_v_prediction_recovers_the_noise_from_the_true_velocity(tiny_sd_v, monkeypatch):
    """If the UNet returned the exact velocity v = get_velocity(x0, eps, t), predict_eps must return eps."""
    from gas_lightning.loading import load_backbone

    bb = load_backbone(tiny_sd_v, attention="sdpa")
    sched = _scheduler(tiny_sd_v)
    assert sched.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([60, 500, 940])  # one batch, three noise levels
    z_t = sched.add_noise(x0, eps, t)
    v = sched.get_velocity(x0, eps, t)
    monkeypatch.setattr(bb.unet, "forward", lambda sample, timestep, encoder_hidden_states=None, **kw: _FakeOutput(v))
    emb = torch.zeros(3, 16, 32)
    torch.testing.assert_close(bb.predict_eps(z_t, t, emb), eps, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(v, eps, atol=1e-2)  # the conversion did something


def test_epsilon_prediction_is_passed_through(backbone, monkeypatch):
    out = torch.randn(2, 4, 16, 16)
    monkeypatch.setattr(
        backbone.unet, "forward", lambda sample, timestep, encoder_hidden_states=None, **kw: _FakeOutput(out)
    )
    z_t = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(backbone.predict_eps(z_t, torch.tensor([100, 900]), torch.zeros(2, 16, 32)), out)


# ---------------------------------------------------------------------------------------------
# 3. the overlap rule: 0.3 on the overlap of the box that holds most of another, on an 8x8 grid
# ---------------------------------------------------------------------------------------------


def _box_mask(rows: slice, cols: slice, value: float = 1.0) -> torch.Tensor:
    m = torch.zeros(8, 8)
    m[rows, cols] = value
    return m


def test_overlap_nested_box_lowers_the_outer_one_to_0_3():
    outer, inner = (0.0, 0.0, 1.0, 1.0), (0.25, 0.25, 0.5, 0.5)  # inner: rows 2:4, cols 2:4
    m = subtask_masks([outer, inner], 8, 8)
    expected_outer = torch.ones(8, 8)
    expected_outer[2:4, 2:4] = 0.3
    torch.testing.assert_close(m[0], expected_outer)
    torch.testing.assert_close(m[1], _box_mask(slice(2, 4), slice(2, 4)))
    # the list order does not decide who is lowered
    m_rev = subtask_masks([inner, outer], 8, 8)
    torch.testing.assert_close(m_rev[0], _box_mask(slice(2, 4), slice(2, 4)))
    torch.testing.assert_close(m_rev[1], expected_outer)


def test_overlap_partial_lowers_the_box_holding_the_larger_share_of_the_other():
    # A: rows 0:4, cols 0:4 (16 cells). B: rows 0:2, cols 3:8 (10 cells). Overlap: rows 0:2, col 3 (2 cells)
    # = 2/16 of A but 2/10 of B: a larger share of B, so A is lowered to 0.3 there and B keeps 1.
    a, b = (0.0, 0.0, 0.5, 0.5), (0.375, 0.0, 1.0, 0.25)
    expected_a = _box_mask(slice(0, 4), slice(0, 4))
    expected_a[0:2, 3] = 0.3
    expected_b = _box_mask(slice(0, 2), slice(3, 8))
    m = subtask_masks([a, b], 8, 8)
    torch.testing.assert_close(m[0], expected_a)
    torch.testing.assert_close(m[1], expected_b)
    m_rev = subtask_masks([b, a], 8, 8)
    torch.testing.assert_close(m_rev[0], expected_b)
    torch.testing.assert_close(m_rev[1], expected_a)


def test_overlap_partial_other_direction():
    # A: rows 0:2, cols 0:3 (6 cells). B: rows 0:8, cols 2:8 (48 cells). Overlap rows 0:2, col 2 (2 cells)
    # = 2/6 of A, 2/48 of B: the overlap is a larger share of A, so B is lowered on it, A keeps 1.
    a, b = (0.0, 0.0, 0.375, 0.25), (0.25, 0.0, 1.0, 1.0)
    expected_a = _box_mask(slice(0, 2), slice(0, 3))
    expected_b = _box_mask(slice(0, 8), slice(2, 8))
    expected_b[0:2, 2] = 0.3
    m = subtask_masks([a, b], 8, 8)
    torch.testing.assert_close(m[0], expected_a)
    torch.testing.assert_close(m[1], expected_b)


@pytest.mark.parametrize(
    "a, b, rows_a, cols_a, rows_b, cols_b",
    [
        # identical boxes
        ((0.0, 0.0, 0.5, 0.5), (0.0, 0.0, 0.5, 0.5), slice(0, 4), slice(0, 4), slice(0, 4), slice(0, 4)),
        # two 4x4 boxes shifted by two columns: the overlap is half of each
        ((0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5), slice(0, 4), slice(0, 4), slice(0, 4), slice(2, 6)),
        # disjoint
        ((0.0, 0.0, 0.25, 0.25), (0.5, 0.5, 1.0, 1.0), slice(0, 2), slice(0, 2), slice(4, 8), slice(4, 8)),
    ],
)
def test_overlap_equal_shares_or_no_overlap_lower_nothing(a, b, rows_a, cols_a, rows_b, cols_b):
    m = subtask_masks([a, b], 8, 8)
    torch.testing.assert_close(m[0], _box_mask(rows_a, cols_a))
    torch.testing.assert_close(m[1], _box_mask(rows_b, cols_b))


def test_overlap_three_boxes_background_table_cup():
    background, table, cup = (0.0, 0.0, 1.0, 1.0), (0.0, 0.5, 1.0, 1.0), (0.25, 0.5, 0.5, 0.75)
    m = subtask_masks([background, table, cup], 8, 8)
    expected = torch.tensor(
        [
            # background: 1 above the table, 0.3 wherever the table (and the cup on it) is
            [[1.0] * 8] * 4 + [[0.3] * 8] * 4,
            # table: rows 4:8, 0.3 under the cup (rows 4:6, cols 2:4); lowered once, not 0.3 * 0.3
            [[0.0] * 8] * 4 + [[1.0, 1.0, 0.3, 0.3, 1.0, 1.0, 1.0, 1.0]] * 2 + [[1.0] * 8] * 2,
            # cup: its own cells at full weight
            [[0.0] * 8] * 4 + [[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]] * 2 + [[0.0] * 8] * 2,
        ]
    )
    torch.testing.assert_close(m, expected)


def test_overlap_weight_option_is_the_value_used():
    m = subtask_masks([(0.0, 0.0, 1.0, 1.0), (0.25, 0.25, 0.5, 0.5)], 8, 8, overlap_weight=0.1)
    expected = torch.ones(8, 8)
    expected[2:4, 2:4] = 0.1
    torch.testing.assert_close(m[0], expected)


def test_union_mask_is_binary_over_the_subtask_regions():
    table, cup = (0.0, 0.5, 1.0, 1.0), (0.25, 0.5, 0.5, 0.75)
    far = (0.75, 0.0, 1.0, 0.25)  # rows 0:2, cols 6:8
    m = subtask_masks([table, cup, far], 8, 8)
    expected = torch.zeros(8, 8)
    expected[4:8, :] = 1  # 1, not 0.3, under the cup
    expected[0:2, 6:8] = 1
    torch.testing.assert_close(union_mask(m, 8, 8), expected)
    plan = EditPlan.from_lists(
        ["a table", "a cup", "a bird"], ["x", "y", "z"], boxes=[list(table), list(cup), list(far)]
    )
    em = EditMasks.from_plan(plan, 8, 8)
    torch.testing.assert_close(em.full, expected)
    torch.testing.assert_close(em.subtasks[1], _box_mask(slice(4, 6), slice(2, 4)))
    torch.testing.assert_close(union_mask(torch.zeros(0, 8, 8), 8, 8), torch.ones(8, 8))


# ---------------------------------------------------------------------------------------------
# 6. beta(t) applied to the whole-scene gradient, and the DDS term, against the raw UNet
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t, beta", [(0, 0.5), (50, 0.5), (199, 0.5), (200, 0.4), (450, 0.3), (799, 0.2), (800, 0.1), (949, 0.1)]
)
def test_beta_buckets_by_hand(t, beta):
    from gas_lightning.guidance import GuidanceConfig

    assert GuidanceConfig().beta(t) == pytest.approx(beta)


def _dog_to_cat(bb, seed):
    """One small-box subtask and the whole-scene term, a source latent, a drifted latent and noise."""
    from gas_lightning.pipeline import build_terms

    plan = EditPlan.from_lists(["a dog"], ["a cat"], boxes=[SMALL])
    sub, full = build_terms(bb, plan, EditMasks.from_plan(plan, 16, 16))
    g = torch.Generator().manual_seed(seed)
    z_src = torch.randn(1, 4, 16, 16, generator=g)
    z = z_src + 0.3 * torch.randn(1, 4, 16, 16, generator=g)
    return plan, sub, full, z_src, z, torch.randn(1, 4, 16, 16, generator=g)


@pytest.mark.parametrize("t, beta", [(199, 0.5), (200, 0.4), (949, 0.1)])
def test_term_gradients_match_the_formula_with_the_raw_unet(backbone, tiny_sd, t, beta):
    """term_gradient of a subtask and of the whole scene at a known (t, eps), against DESIGN.md written out."""
    from gas_lightning.guidance import GroundedScoreGuidance

    bb, sched = backbone, _scheduler(tiny_sd)
    plan, sub, full, z_src, z, eps = _dog_to_cat(bb, seed=1)
    guidance = GroundedScoreGuidance(bb)
    m_small, _, _ = _grid_masks()
    null = _embed(bb, "")
    got_sub, _ = guidance.term_gradient(z, z_src, sub, t, eps)
    want_sub, _ = _hand_term_grad(bb, sched, z, z_src, t, eps, _embed(bb, "a dog"), _embed(bb, "a cat"), null, m_small)
    torch.testing.assert_close(got_sub, want_sub, rtol=1e-4, atol=1e-7)
    got_full, _ = guidance.term_gradient(z, z_src, full, t, eps)
    want_full, _ = _hand_term_grad(
        bb,
        sched,
        z,
        z_src,
        t,
        eps,
        _embed(bb, plan.source_prompt),
        _embed(bb, plan.target_prompt),
        null,
        m_small,
        beta=beta,
    )
    assert want_full.abs().max() > 0
    torch.testing.assert_close(got_full, want_full, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("t", [150, 450, 800])
def test_target_balance_matches_the_formula_with_the_raw_unet(backbone, tiny_sd, t):
    """guidance.target_balance: an edit subtask's target branch at W * max(1, source gap / target gap), the
    source branch at W; keep and whole-scene terms as DESIGN.md has them; written out with the raw UNet."""
    from gas_lightning.guidance import GroundedScoreGuidance, GuidanceConfig

    bb, sched = backbone, _scheduler(tiny_sd)
    plan, sub, full, z_src, z, eps = _dog_to_cat(bb, seed=2)
    guidance = GroundedScoreGuidance(bb, GuidanceConfig(target_balance=True))
    m_small, _, _ = _grid_masks()
    null, dog, cat = _embed(bb, ""), _embed(bb, "a dog"), _embed(bb, "a cat")
    directions = ((dog, cat, sub), (cat, dog, replace(sub, src_emb=sub.tgt_emb, tgt_emb=sub.src_emb)))
    for src_emb, tgt_emb, term in directions:
        got, _ = guidance.term_gradient(z, z_src, term, t, eps)
        want, _ = _hand_term_grad(bb, sched, z, z_src, t, eps, src_emb, tgt_emb, null, m_small, target_balance=True)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        # the batched call (one term, per-term draw) computes the same gradient
        got_b, _ = guidance.batched_gradient(z, z_src, [term], [t], [eps])
        torch.testing.assert_close(got_b, want, rtol=1e-4, atol=1e-7)
    plain = [_hand_term_grad(bb, sched, z, z_src, t, eps, a, b, null, m_small)[0] for a, b, _ in directions]
    scaled = [
        _hand_term_grad(bb, sched, z, z_src, t, eps, a, b, null, m_small, target_balance=True)[0]
        for a, b, _ in directions
    ]
    assert any(not torch.allclose(p, q) for p, q in zip(plain, scaled))  # the ratio is below 1 for one direction
    keep = replace(sub, tgt_emb=sub.src_emb, keep=True)  # a keep term is never balanced
    got_keep, _ = guidance.term_gradient(z, z_src, keep, t, eps)
    want_keep, _ = _hand_term_grad(bb, sched, z, z_src, t, eps, dog, dog, null, m_small)
    torch.testing.assert_close(got_keep, want_keep, rtol=1e-4, atol=1e-7)
    got_full, _ = guidance.term_gradient(z, z_src, full, t, eps)  # nor is the whole-scene term
    want_full, _ = _hand_term_grad(
        bb,
        sched,
        z,
        z_src,
        t,
        eps,
        _embed(bb, plan.source_prompt),
        _embed(bb, plan.target_prompt),
        null,
        m_small,
        beta=GuidanceConfig().beta(t),
    )
    torch.testing.assert_close(got_full, want_full, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 5. bfloat16 on the CPU, end to end through the command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", [[], ["--trainer.precision", "bf16-true"]], ids=["dtype-only", "bf16-true"])
def test_bfloat16_edit_on_cpu_end_to_end(tiny_sd, image_file, tmp_path, precision):
    from pathlib import Path

    from PIL import Image as PILImage

    from gas_lightning.cli import main

    repo = Path(__file__).resolve().parents[1]
    out, probe = tmp_path / "out", tmp_path / "probe"
    argv = [
        "--config",
        str(repo / "configs" / "tiny.yaml"),
        "--model",
        tiny_sd,
        "--image",
        image_file,
        "--request",
        "change the red block into a yellow block. change the grass into snow.",
        "--boxes",
        "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]]",
        "--output_dir",
        str(out),
        "--dtype",
        "bfloat16",
        "--trainer.max_steps",
        "2",
        *precision,
        "--trainer.callbacks+=ddp_probe.SaveLatentAndSource",
        f"--trainer.callbacks.dirpath={probe}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert (out / "edited.png").is_file()
    assert PILImage.open(out / "edited.png").size == (40, 32)
    saved = torch.load(probe / "rank0.pt")
    latent, z_src = saved["latent"].float(), saved["z_src"].float()
    assert saved["step"] == 2
    assert torch.isfinite(latent).all() and torch.isfinite(z_src).all()
    assert (latent - z_src).abs().max() > 1e-3  # the edit moved the latent
