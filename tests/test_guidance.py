"""The guidance terms: batched == sum of per-term, masking, penalty scaling, wide guidance scale.

The formulas themselves (penalty gamma, beta(t), v-prediction, the DDS term) are checked against
independently computed values in tests/test_fidelity_units.py."""

import pytest
import torch

from gas_lightning.guidance import GroundedScoreGuidance, GuidanceConfig
from gas_lightning.masks import EditMasks
from gas_lightning.pipeline import build_terms
from gas_lightning.plan import EditPlan

PLAN = EditPlan.from_lists(
    ["a dog", "grass", "a red ball"],
    ["a cat", "snow", "a blue ball"],
    boxes=[[0.1, 0.1, 0.6, 0.6], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.75, 0.9]],
    preserve_form=[1, 0, 1],
)


def _setup(backbone, plan=PLAN, penalty=(True, False, True)):
    torch.manual_seed(0)
    z_src = torch.randn(1, 4, 16, 16)
    z = z_src + 0.3 * torch.randn_like(z_src)
    masks = EditMasks.from_plan(plan, 16, 16)
    terms = build_terms(backbone, plan, masks)
    terms = [
        t if t.is_full else type(t)(**{**t.__dict__, "penalty": p}) for t, p in zip(terms, list(penalty) + [False])
    ]
    return GroundedScoreGuidance(backbone, GuidanceConfig()), z, z_src, terms


@pytest.mark.parametrize("t", [120, 640, 930])
def test_batched_gradient_equals_sum_of_per_term_gradients(backbone, t):
    guidance, z, z_src, terms = _setup(backbone)
    eps = torch.randn_like(z)
    batched, logs = guidance.batched_gradient(z, z_src, terms, t, eps, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    parts = [guidance.term_gradient(z, z_src, term, t, eps, gen) for term in terms]
    summed = sum(g for g, _ in parts)
    assert batched.abs().max() > 0
    torch.testing.assert_close(batched, summed, rtol=1e-4, atol=1e-6)
    for lb, (_, lp) in zip(logs, parts):
        assert lb.gamma == pytest.approx(lp.gamma, rel=1e-4, abs=1e-6)
        assert (lb.cds_loss is None) == (lp.cds_loss is None)
        if lb.cds_loss is not None:
            assert lb.cds_loss == pytest.approx(lp.cds_loss, rel=1e-4)


def test_each_term_gradient_stays_inside_its_box(backbone):
    guidance, z, z_src, terms = _setup(backbone)
    eps = torch.randn_like(z)
    assert any((term.mask == 0).any() for term in terms)
    for term in terms:
        g, _ = guidance.term_gradient(z, z_src, term, 500, eps, torch.Generator().manual_seed(0))
        if (term.mask == 0).any():
            assert g[..., term.mask == 0].abs().max() == 0, term.name
        assert g[..., term.mask > 0].abs().max() > 0, term.name


def test_penalty_saturates_at_one(backbone):
    """gamma is clamped to [0, 1]; its value against the formula is in tests/test_fidelity_units.py."""
    guidance, z, z_src, terms = _setup(backbone, penalty=(True, True, True))
    eps = torch.randn_like(z)
    assert 0 < guidance.term_gradient(z, z_src, terms[0], 400, eps)[1].gamma < 1
    guidance.penalty_coefficient = 1e9
    assert guidance.term_gradient(z, z_src, terms[0], 400, eps)[1].gamma == 1.0


def test_penalty_scales_the_gradient(backbone):
    guidance, z, z_src, terms = _setup(backbone, penalty=(True, False, False))
    eps = torch.randn_like(z)
    g_on, log_on = guidance.term_gradient(z, z_src, terms[0], 300, eps)
    off = type(terms[0])(**{**terms[0].__dict__, "penalty": False})
    g_off, log_off = guidance.term_gradient(z, z_src, off, 300, eps)
    assert log_off.gamma == 1.0 and 0 < log_on.gamma < 1
    torch.testing.assert_close(g_on, log_on.gamma * g_off, rtol=1e-4, atol=1e-7)


def test_wide_guidance_scale_applies_to_wide_boxes_only(backbone):
    """A background-sized box takes wide_guidance_scale; its gradient is the one a global scale of
    that value gives, and the batched schedule still equals the sum of the per-term gradients."""
    masks = EditMasks.from_plan(PLAN, 16, 16)
    cfg = GuidanceConfig(wide_guidance_scale=3.0)
    terms = build_terms(backbone, PLAN, masks, config=cfg)
    assert [t.guidance_scale for t in terms] == [None, 3.0, None, None]  # dog, grass (whole image), ball, full
    _, z, z_src, plain = _setup(backbone, penalty=(False, False, False))
    eps = torch.randn_like(z)
    wide = GroundedScoreGuidance(backbone, cfg)
    g_wide, _ = wide.term_gradient(z, z_src, terms[1], 500, eps)
    g_global, _ = GroundedScoreGuidance(backbone, GuidanceConfig(guidance_scale=3.0)).term_gradient(
        z, z_src, plain[1], 500, eps
    )
    g_default, _ = wide.term_gradient(z, z_src, plain[1], 500, eps)
    torch.testing.assert_close(g_wide, g_global)
    assert not torch.allclose(g_wide, g_default)
    batched, _ = wide.batched_gradient(z, z_src, terms, 500, eps)
    torch.testing.assert_close(
        batched, sum(wide.term_gradient(z, z_src, t, 500, eps)[0] for t in terms), rtol=1e-4, atol=1e-6
    )


def test_keep_guidance_scale_is_the_keep_terms_cfg_by_hand(backbone):
    """A keep subtask (source == target) takes keep_guidance_scale; its gradient is DDS's formula at that
    scale, written out here from the four predictions; edit subtasks keep the config's scale."""
    from dataclasses import replace

    from gas_lightning.backbone import PromptEmbeddings, alpha_sigma

    plan = EditPlan.from_lists(["a dog"], ["a cat"], boxes=[[0.1, 0.1, 0.6, 0.6]]).with_keep(
        ["a red ball"], [[0.5, 0.5, 0.75, 0.9]]
    )
    masks = EditMasks.from_plan(plan, 16, 16)
    cfg = GuidanceConfig(keep_guidance_scale=1.0, wide_guidance_scale=3.0, wide_area=0.2, full_prompt=False)
    terms = build_terms(backbone, plan, masks, config=cfg)
    assert [t.keep for t in terms] == [False, True]
    # the dog's box is wide here; the keep scale wins for the ball
    assert [t.guidance_scale for t in terms] == [3.0, 1.0]
    guidance = GroundedScoreGuidance(backbone, cfg)
    torch.manual_seed(1)
    z_src = torch.randn(1, 4, 16, 16)
    z, eps, t = z_src + 0.3 * torch.randn_like(z_src), torch.randn_like(z_src), 400
    tt = torch.tensor([t])
    a, s = alpha_sigma(backbone.alphas_cumprod, tt, 4)
    zt_src, zt = a * z_src + s * eps, a * z + s * eps
    null, ball = backbone.null_embeddings(), backbone.encode_prompts(["a red ball"])
    e = [
        backbone.predict_eps(x, tt, PromptEmbeddings.of(c))
        for x, c in ((zt_src, null), (zt, null), (zt_src, ball), (zt, ball))
    ]
    at_config_scale = replace(terms[1], guidance_scale=None)  # the config's guidance_scale, 7.5
    grads = {}
    for scale, term in ((1.0, terms[1]), (7.5, at_config_scale)):
        grads[scale] = guidance.term_gradient(z, z_src, term, t, eps)[0]
        want = ((e[1] + scale * (e[3] - e[1])) - (e[0] + scale * (e[2] - e[0]))) * term.mask / (16 * 16)
        torch.testing.assert_close(grads[scale], want, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grads[1.0], grads[7.5])


def test_null_text_penalty_callback_defaults_and_refusal():
    from gas_lightning.callbacks import NullTextPenalty

    assert NullTextPenalty().coefficient == 5.0 and NullTextPenalty().area_threshold == 0.15  # the reference's
    with pytest.raises(ValueError, match="coefficient must be > 0"):
        NullTextPenalty(coefficient=0)


def test_a_preserve_form_box_under_one_coarsest_cell_is_refused_naming_the_smallest_box(tiny_sd):
    """The tiny UNet hooks self-attention only in up_blocks.0, at 1/2 of the 16 x 16 latent (8 x 8), and its
    VAE halves the 32 px image: one coarsest cell is 4 px, 1/8 of the image."""
    from PIL import Image

    from gas_lightning.errors import PlanError
    from gas_lightning.loading import load_backbone
    from gas_lightning.pipeline import build_edit

    bb = load_backbone(tiny_sd, attention="sdpa")
    image = Image.new("RGB", (32, 32), (90, 160, 60))
    narrow = EditPlan.from_lists(["a dog"], ["a cat"], boxes=[[0.5, 0.25, 0.59, 0.75]], preserve_form=[1])  # 2.9 px
    with pytest.raises(
        PlanError,
        match=r"has a box of 3 x 16 px.*the smallest box that works is 4 x 4 px "
        r"\(0.125 x 0.125 of the image\)",
    ):
        build_edit(bb, image, narrow)
    build_edit(
        bb, image, EditPlan.from_lists(["a dog"], ["a cat"], boxes=[[0.5, 0.25, 0.625, 0.75]], preserve_form=[1])
    )
    build_edit(bb, image, EditPlan.from_lists(["a dog"], ["a cat"], boxes=[[0.5, 0.25, 0.59, 0.75]]))  # no CDS: fine
