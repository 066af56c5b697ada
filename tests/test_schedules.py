"""The batched schedule's two samplings against the per-term gradients computed one by one.

`term_gradient` is the sequential schedule's unit (checked against the reference iteration in
test_reference_iteration.py); here the one-call batched gradient must equal the sum of those units
for every term count, shared (one t, one noise) and per-term (each term its own t and noise).
"""

from contextlib import contextmanager

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
    preserve_form=[0, 0, 1],
)


@contextmanager
def unet_batches(backbone):
    """The batch size of every UNet call made inside the block."""
    calls = []
    real = backbone.unet.forward
    backbone.unet.forward = lambda *a, **k: (calls.append(a[0].shape[0]), real(*a, **k))[1]
    try:
        yield calls
    finally:
        backbone.unet.forward = real


def _terms(backbone, n):
    plan = PLAN.replace_subtasks(PLAN.subtasks[:n])
    cfg = GuidanceConfig(full_prompt=False)
    return GroundedScoreGuidance(backbone, cfg), build_terms(backbone, plan, EditMasks.from_plan(plan, 16, 16), cfg)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shared_batched_gradient_is_the_sum_of_term_gradients(backbone, n):
    guidance, terms = _terms(backbone, n)
    gen = torch.Generator().manual_seed(0)
    z_src = torch.randn(1, 4, 16, 16, generator=gen)
    z, eps = z_src + 0.3 * torch.randn(z_src.shape, generator=gen), torch.randn(z_src.shape, generator=gen)
    batched, logs = guidance.batched_gradient(z, z_src, terms, 400, eps, torch.Generator().manual_seed(3))
    cds_gen = torch.Generator().manual_seed(3)
    parts = [guidance.term_gradient(z, z_src, tm, 400, eps, cds_gen) for tm in terms]
    assert len(logs) == n and all(lg.t == 400 for lg in logs)
    torch.testing.assert_close(batched, sum(g for g, _ in parts), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3])
def test_per_term_batched_gradient_gives_each_term_its_own_t_and_noise(backbone, n):
    guidance, terms = _terms(backbone, n)  # n = 3 includes the preserve-form (CDS) subtask
    gen = torch.Generator().manual_seed(1)
    z_src = torch.randn(1, 4, 16, 16, generator=gen)
    z = z_src + 0.3 * torch.randn(z_src.shape, generator=gen)
    ts = [120, 640, 930][:n]
    noises = [torch.randn(z_src.shape, generator=gen) for _ in ts]
    with unet_batches(backbone) as calls:
        batched, logs = guidance.batched_gradient(z, z_src, terms, ts, noises, torch.Generator().manual_seed(3))
    preserve = sum(tm.preserve_form for tm in terms)
    # one DDS call of 4 samples per term (each its own null-text pair); CDS adds a reference and an edited call
    assert calls == [4 * n] + [preserve] * 2 * (preserve > 0)
    assert [lg.t for lg in logs] == ts
    cds_gen = torch.Generator().manual_seed(3)
    expected = sum(guidance.term_gradient(z, z_src, tm, t, e, cds_gen)[0] for tm, t, e in zip(terms, ts, noises))
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-6)
    if n > 1:  # and it is not the shared sampling: one t and noise for all terms gives another gradient
        shared, _ = guidance.batched_gradient(z, z_src, terms, ts[0], noises[0], torch.Generator().manual_seed(3))
        assert not torch.allclose(shared, batched, rtol=1e-3, atol=1e-5)


def test_per_term_sampling_checks_its_lengths(backbone):
    guidance, terms = _terms(backbone, 2)
    z = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match="2 timesteps and noises"):
        guidance.batched_gradient(z, z, terms, [100], [z])


def test_keep_aware_sampling_gives_a_keep_term_the_draw_of_the_edit_around_it(backbone):
    """Keep term 2 sits inside the background's box and away from the ball: it must take the
    background's t (term 1), while the ball and the background keep their own per-term draws."""
    import lightning as L
    from PIL import Image

    from gas_lightning.pipeline import build_edit

    plan = EditPlan.from_lists(
        ["a red ball", "grass", "a dog"],
        ["a blue ball", "snow", "a dog"],
        boxes=[[0.55, 0.55, 0.95, 0.95], [0.0, 0.0, 1.0, 1.0], [0.05, 0.05, 0.4, 0.4]],
    )
    assert [s.keep for s in plan.subtasks] == [False, False, True]
    image = Image.new("RGB", (32, 32), (90, 160, 60))
    seen = {}
    for sampling in ("per_term", "keep_aware"):
        module = build_edit(backbone, image, plan, GuidanceConfig(full_prompt=False, batched_noise=sampling), seed=5)
        L.Trainer(
            max_steps=3,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(module)
        seen[sampling] = [lg.t for lg in module.last_logs]
    ball, grass, keep = seen["keep_aware"]
    assert keep == grass and [ball, grass] == seen["per_term"][:2]
    assert seen["per_term"][2] != seen["per_term"][1]  # with per-term draws the keep term's t was its own


def test_terms_given_one_draw_share_their_null_text_samples(backbone):
    """keep_aware hands a keep term the very (t, eps) of an edit term: its null-text pair is the edit's,
    so the call holds 4n - 2 samples, and the gradient is still the sum of the terms taken one by one."""
    plan = EditPlan.from_lists(
        ["a red ball", "grass", "a dog"],
        ["a blue ball", "snow", "a dog"],
        boxes=[[0.55, 0.55, 0.95, 0.95], [0.0, 0.0, 1.0, 1.0], [0.05, 0.05, 0.4, 0.4]],
    )
    cfg = GuidanceConfig(full_prompt=False)
    guidance = GroundedScoreGuidance(backbone, cfg)
    terms = build_terms(backbone, plan, EditMasks.from_plan(plan, 16, 16), cfg)
    gen = torch.Generator().manual_seed(4)
    z_src = torch.randn(1, 4, 16, 16, generator=gen)
    z = z_src + 0.3 * torch.randn(z_src.shape, generator=gen)
    e_ball, e_grass = torch.randn(z_src.shape, generator=gen), torch.randn(z_src.shape, generator=gen)
    ts, noises = [700, 250, 250], [e_ball, e_grass, e_grass]  # the keep term (2) takes the grass term's draw
    with unet_batches(backbone) as calls:
        batched, logs = guidance.batched_gradient(z, z_src, terms, ts, noises)
    assert calls == [10]
    expected = sum(guidance.term_gradient(z, z_src, tm, t, e)[0] for tm, t, e in zip(terms, ts, noises))
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-6)
    assert [lg.t for lg in logs] == ts
    # equal values in different tensors are different draws: nothing is shared
    with unet_batches(backbone) as calls:
        guidance.batched_gradient(z, z_src, terms, ts, [e_ball, e_grass, e_grass.clone()])
    assert calls == [12]


def test_default_timesteps_are_the_references_randint_50_949():
    """The reference draws torch.randint(low=50, high=min(950, 1000) - 1): 50..948, never 949."""
    from types import SimpleNamespace

    from gas_lightning.module import GroundAScoreEdit

    fake = SimpleNamespace(
        guidance=SimpleNamespace(config=GuidanceConfig()),
        _progress=lambda: 0.0,
        _trainer=None,
        latent=torch.zeros(1, 1, 1, 1),
        device=torch.device("cpu"),
        terms=[],
        global_step=0,
    )
    gen = torch.Generator().manual_seed(0)
    drawn = {GroundAScoreEdit._draw(fake, gen)[0] for _ in range(20000)}
    # 20000 draws from 899 values: each value is missed with probability (898/899)^20000 ~ e^-22
    assert drawn == set(range(50, 949))
