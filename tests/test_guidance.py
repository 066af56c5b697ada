"""The guidance terms: batched == sum of per-term, masking, penalty scaling, wide guidance scale.

The formulas themselves (penalty gamma, beta(t), v-prediction, the DDS term) are checked against
independently computed values in tests/test_fidelity_units.py."""

import pytest
import torch

from gas_lightning.errors import GasError
from gas_lightning.guidance import GroundedScoreGuidance, GuidanceConfig
from gas_lightning.masks import EditMasks
from gas_lightning.pipeline import build_terms
from gas_lightning.plan import EditPlan

PLAN = EditPlan.from_lists(
    ["a dog", "grass", "a red ball"], ["a cat", "snow", "a blue ball"],
    boxes=[[0.1, 0.1, 0.6, 0.6], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.75, 0.9]], preserve_form=[1, 0, 1],
)


def _setup(backbone, plan=PLAN, penalty=(True, False, True)):
    torch.manual_seed(0)
    z_src = torch.randn(1, 4, 16, 16)
    z = z_src + 0.3 * torch.randn_like(z_src)
    masks = EditMasks.from_plan(plan, 16, 16)
    terms = build_terms(backbone, plan, masks)
    terms = [t if t.is_full else type(t)(**{**t.__dict__, "penalty": p}) for t, p in zip(terms, list(penalty) + [False])]
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
    g_global, _ = GroundedScoreGuidance(backbone, GuidanceConfig(guidance_scale=3.0)).term_gradient(z, z_src, plain[1], 500, eps)
    g_default, _ = wide.term_gradient(z, z_src, plain[1], 500, eps)
    torch.testing.assert_close(g_wide, g_global)
    assert not torch.allclose(g_wide, g_default)
    batched, _ = wide.batched_gradient(z, z_src, terms, 500, eps)
    torch.testing.assert_close(batched, sum(wide.term_gradient(z, z_src, t, 500, eps)[0] for t in terms),
                               rtol=1e-4, atol=1e-6)


def test_current_reference_context_scores_only_the_objects_own_change(backbone):
    """reference_context "current": an object term's reference branch is the source inside the object's
    region and the current latent outside it. So for a keep term (source text == target text) a change
    made only outside its region leaves both UNet inputs identical, and its gradient is exactly zero; a
    change made only inside the region gives the same inputs as the source reference."""
    plan = EditPlan.from_lists(["a red ball", "grass"], ["a red ball", "snow"],
                               boxes=[[0.25, 0.25, 0.5, 0.75], [0.0, 0.0, 1.0, 1.0]])
    masks = EditMasks.from_plan(plan, 16, 16)
    cfg = GuidanceConfig(full_prompt=False, batched_noise="per_term", reference_context="current")
    ball, grass = build_terms(backbone, plan, masks, cfg)
    inside = torch.zeros(16, 16)
    inside[4:12, 4:8] = 1.0  # rows y 0.25-0.75, columns x 0.25-0.5 of the box (written out, not taken from the code)
    torch.testing.assert_close(ball.context, inside)
    assert grass.context is None  # the background (a wide box) keeps the source reference
    source_terms = build_terms(backbone, plan, masks, GuidanceConfig(full_prompt=False, batched_noise="per_term"))
    assert all(tm.context is None for tm in source_terms)

    guidance = GroundedScoreGuidance(backbone, cfg)
    torch.manual_seed(3)
    z_src, eps = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    outside_changed = z_src + (1 - inside) * torch.randn_like(z_src)
    g_current, _ = guidance.term_gradient(outside_changed, z_src, ball, 800, eps)
    g_source, _ = guidance.term_gradient(outside_changed, z_src, source_terms[0], 800, eps)
    assert g_current.abs().max() == 0
    assert g_source.abs().max() > 0  # the source reference carries the change around the ball onto it

    inside_changed = z_src + inside * torch.randn_like(z_src)
    torch.testing.assert_close(guidance.term_gradient(inside_changed, z_src, ball, 800, eps)[0],
                               guidance.term_gradient(inside_changed, z_src, source_terms[0], 800, eps)[0])

    # batched with per-term draws: the sum of the sequential terms, each with its own reference
    z = z_src + 0.3 * torch.randn_like(z_src)
    noises = [torch.randn_like(z), torch.randn_like(z)]
    batched, _ = guidance.batched_gradient(z, z_src, [ball, grass], [700, 300], noises)
    summed = guidance.term_gradient(z, z_src, ball, 700, noises[0])[0] + guidance.term_gradient(z, z_src, grass, 300, noises[1])[0]
    torch.testing.assert_close(batched, summed, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="needs per-term sampling"):  # one shared t: one reference for all terms
        guidance.batched_gradient(z, z_src, [ball, grass], 700, noises[0])


def test_current_reference_context_needs_per_term_draws(backbone):
    from PIL import Image

    from gas_lightning.pipeline import build_edit

    plan = EditPlan.from_lists(["a red ball"], ["a blue ball"], boxes=[[0.25, 0.25, 0.5, 0.75]])
    image = Image.new("RGB", (32, 32), (90, 160, 60))
    with pytest.raises(GasError, match="reference_context current .* per_term or keep_aware"):
        build_edit(backbone, image, plan, GuidanceConfig(batched_noise="shared", reference_context="current"))
    build_edit(backbone, image, plan, GuidanceConfig(batched_noise="shared", reference_context="current"), schedule="sequential")
    with pytest.raises(GasError, match="reference_context must be one of source, current"):
        GuidanceConfig(reference_context="target")


def test_current_reference_context_scope_same_outline_leaves_shape_changes_the_source(backbone):
    plan = EditPlan.from_lists(["a red ball", "the blue square", "grass", "a dog"],
                               ["a blue ball", "a blue circle", "snow", "a dog"],
                               boxes=[[0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0], [0, 0, 1, 1], [0.0, 0.0, 0.5, 0.5]])
    masks = EditMasks.from_plan(plan, 4, 4)
    quarter = [torch.zeros(4, 4) for _ in range(3)]
    quarter[0][2:, 2:], quarter[1][2:, :2], quarter[2][:2, :2] = 1.0, 1.0, 1.0  # the boxes' cells, by hand
    for scope, expected in (("objects", [quarter[0], quarter[1], None, quarter[2]]),
                            ("same_outline", [quarter[0], None, None, quarter[2]])):
        cfg = GuidanceConfig(full_prompt=False, batched_noise="per_term", reference_context="current",
                             reference_context_scope=scope)
        for term, want in zip(build_terms(backbone, plan, masks, cfg), expected):
            if want is None:
                assert term.context is None, (scope, term.name)
            else:
                torch.testing.assert_close(term.context, want)
    with pytest.raises(GasError, match="reference_context_scope must be one of objects, same_outline"):
        GuidanceConfig(reference_context_scope="shapes")


def test_relative_penalty_is_its_coefficient_when_both_branches_see_the_same(backbone):
    """With the current latent at the source and the target text equal to the source text, the
    target gap and the source gap are the same numbers: their ratio is 1, so gamma is c (below 1)
    or clamped to 1; an absolute penalty gives some other value there."""
    from dataclasses import replace

    guidance, z, z_src, terms = _setup(backbone, penalty=(True, False, False))
    same = replace(terms[0], tgt_emb=terms[0].src_emb)
    eps = torch.randn_like(z)
    guidance.penalty_relative = True
    guidance.penalty_coefficient = 0.3
    assert guidance.term_gradient(z_src, z_src, same, 400, eps)[1].gamma == pytest.approx(0.3, abs=1e-6)
    guidance.penalty_coefficient = 1.0
    assert guidance.term_gradient(z_src, z_src, same, 400, eps)[1].gamma == pytest.approx(1.0, abs=1e-6)
    guidance.penalty_relative = False
    assert guidance.term_gradient(z_src, z_src, same, 400, eps)[1].gamma != pytest.approx(1.0, abs=1e-3)


def test_null_text_penalty_callback_defaults_and_refusal():
    from gas_lightning.callbacks import NullTextPenalty

    assert NullTextPenalty().coefficient == 5.0 and not NullTextPenalty().relative  # the reference's c
    assert NullTextPenalty(relative=True).coefficient == 1.0
    assert NullTextPenalty(relative=True, coefficient=0.5).coefficient == 0.5
    with pytest.raises(ValueError, match="coefficient must be > 0"):
        NullTextPenalty(coefficient=0)


def test_a_preserve_form_box_under_one_coarsest_cell_is_refused_naming_the_smallest_box(tiny_sd):
    """The tiny UNet hooks self-attention only in up_blocks.0, at 1/2 of the 16 x 16 latent (8 x 8), and its
    VAE halves the 32 px image: one coarsest cell is 4 px, 1/8 of the image."""
    from PIL import Image

    from gas_lightning.loading import load_backbone
    from gas_lightning.errors import PlanError
    from gas_lightning.pipeline import build_edit

    bb = load_backbone(tiny_sd, attention="sdpa")
    image = Image.new("RGB", (32, 32), (90, 160, 60))
    narrow = EditPlan.from_lists(["a dog"], ["a cat"], boxes=[[0.5, 0.25, 0.59, 0.75]], preserve_form=[1])  # 2.9 px
    with pytest.raises(PlanError, match=r"has a box of 3 x 16 px.*the smallest box that works is 4 x 4 px "
                                        r"\(0.125 x 0.125 of the image\)"):
        build_edit(bb, image, narrow)
    build_edit(bb, image, EditPlan.from_lists(["a dog"], ["a cat"], boxes=[[0.5, 0.25, 0.625, 0.75]], preserve_form=[1]))
    build_edit(bb, image, EditPlan.from_lists(["a dog"], ["a cat"], boxes=[[0.5, 0.25, 0.59, 0.75]]))  # no CDS: fine
