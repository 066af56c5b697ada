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
    ["a dog", "grass", "a red ball"], ["a cat", "snow", "a blue ball"],
    boxes=[[0.1, 0.1, 0.6, 0.6], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.75, 0.9]], preserve_form=[0, 0, 1],
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


def drawn_timesteps(module, schedule, max_steps):
    """Fit the module and return the timesteps each guidance call received (a list per call: the batched
    call's per-term list, or one entry per term when a single t is shared; one entry per sequential call)."""
    import lightning as L

    seen = []
    real = module.guidance.batched_gradient if schedule == "batched" else module.guidance.term_gradient

    def spy(z, z_src, terms, t, *rest):
        seen.append(list(t) if isinstance(t, list) else [t] * (len(terms) if isinstance(terms, list) else 1))
        return real(z, z_src, terms, t, *rest)

    module.guidance.batched_gradient = module.guidance.term_gradient = spy
    L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module)
    return seen


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
        ["a red ball", "grass", "a dog"], ["a blue ball", "snow", "a dog"],
        boxes=[[0.55, 0.55, 0.95, 0.95], [0.0, 0.0, 1.0, 1.0], [0.05, 0.05, 0.4, 0.4]],
    )
    assert [s.keep for s in plan.subtasks] == [False, False, True]
    image = Image.new("RGB", (32, 32), (90, 160, 60))
    seen = {}
    for sampling in ("per_term", "keep_aware"):
        module = build_edit(backbone, image, plan, GuidanceConfig(full_prompt=False, batched_noise=sampling), seed=5)
        L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(module)
        seen[sampling] = [lg.t for lg in module.last_logs]
    ball, grass, keep = seen["keep_aware"]
    assert keep == grass and [ball, grass] == seen["per_term"][:2]
    assert seen["per_term"][2] != seen["per_term"][1]  # with per-term draws the keep term's t was its own


def test_local_t_max_caps_object_terms_only_and_needs_per_term_draws(backbone):
    """Objects (boxes under wide_area) draw t in [t_min, local_t_max]; the background keeps [t_min, t_max].
    The same generator stream is consumed, so only the objects' t changes, never the noise."""
    from PIL import Image

    from gas_lightning.errors import GasError
    from gas_lightning.pipeline import build_edit

    plan = EditPlan.from_lists(["a red ball", "grass"], ["a blue ball", "snow"],
                               boxes=[[0.55, 0.55, 0.95, 0.95], [0.0, 0.0, 1.0, 1.0]])
    image = Image.new("RGB", (32, 32), (90, 160, 60))
    for schedule in ("batched", "sequential"):
        cfg = GuidanceConfig(full_prompt=False, batched_noise="per_term", t_min=50, t_max=949, local_t_max=60)
        module = build_edit(backbone, image, plan, cfg, schedule=schedule, seed=2)
        assert [tm.t_max for tm in module.terms] == [60, None]
        ts = [t for step in drawn_timesteps(module, schedule, 6) for t in step]
        ball, grass = ts[0::2], ts[1::2]
        assert len(ball) == 6 and all(50 <= t <= 60 for t in ball), (schedule, ball)
        assert max(grass) > 60, (schedule, grass)  # six draws from [50, 949] all <= 60: p ~ 1e-29
    with pytest.raises(GasError, match="local_t_max needs a timestep per term"):
        build_edit(backbone, image, plan, GuidanceConfig(full_prompt=False, batched_noise="shared", local_t_max=600))
    with pytest.raises(GasError, match=r"local_t_max must lie in \[t_min, t_max\]"):
        build_edit(backbone, image, plan, GuidanceConfig(full_prompt=False, batched_noise="per_term", local_t_max=990))


def test_local_t_scope_same_outline_leaves_shape_changes_the_full_range(backbone):
    plan = EditPlan.from_lists(["a red ball", "the blue square", "grass", "a dog"],
                               ["a blue ball", "a blue circle", "snow", "a dog"],
                               boxes=[[0.55, 0.55, 0.95, 0.95], [0.05, 0.5, 0.4, 0.9], [0, 0, 1, 1], [0.05, 0.05, 0.4, 0.4]])
    masks = EditMasks.from_plan(plan, 16, 16)
    for scope, expected in (("objects", [600, 600, None, 600]), ("same_outline", [600, None, None, 600])):
        cfg = GuidanceConfig(full_prompt=False, batched_noise="per_term", local_t_max=600, local_t_scope=scope)
        assert [tm.t_max for tm in build_terms(backbone, plan, masks, cfg)] == expected, scope
    from gas_lightning.errors import GasError

    with pytest.raises(GasError, match="local_t_scope must be one of objects, same_outline"):
        GuidanceConfig(local_t_scope="shapes")


def test_t_max_end_anneals_the_timestep_bound_over_the_run(backbone):
    """Step s of S draws t in [t_min, t_max + (t_max_end - t_max) * s / (S - 1)], in every schedule and
    sampling; a term's own cap still applies. With t_max_end = t_min the last step can only draw t_min."""
    import lightning as L
    from PIL import Image

    from gas_lightning.errors import GasError
    from gas_lightning.pipeline import build_edit

    # the bound written out by hand: 949 -> 50 over four steps
    cfg = GuidanceConfig(t_min=50, t_max=949, t_max_end=50)
    assert [cfg.t_max_at(p) for p in (0.0, 1 / 3, 2 / 3, 1.0)] == [949, 649, 350, 50]
    assert GuidanceConfig(t_max=949).t_max_at(1.0) == 949  # None: no annealing
    plan = EditPlan.from_lists(["a red ball", "grass"], ["a blue ball", "snow"],
                               boxes=[[0.55, 0.55, 0.95, 0.95], [0.0, 0.0, 1.0, 1.0]])
    image = Image.new("RGB", (32, 32), (90, 160, 60))
    bounds = [949, 649, 350, 50]
    for schedule, sampling, local in (("batched", "shared", None), ("batched", "keep_aware", 300), ("sequential", "shared", None)):
        cfg = GuidanceConfig(full_prompt=False, batched_noise=sampling, t_min=50, t_max=949, t_max_end=50, local_t_max=local)
        seen = drawn_timesteps(build_edit(backbone, image, plan, cfg, schedule=schedule, seed=5), schedule, 4)
        steps = seen if schedule == "batched" else [seen[i] + seen[i + 1] for i in range(0, len(seen), 2)]
        assert len(steps) == 4, (schedule, seen)
        for bound, ts in zip(bounds, steps):
            ball_cap = bound if local is None else min(bound, local)
            assert 50 <= ts[0] <= ball_cap and 50 <= ts[1] <= bound, (schedule, sampling, bound, ts)
        assert steps[-1] == [50, 50]
        assert max(t for ts in steps[:2] for t in ts[1:]) > 350, (schedule, steps)  # seeded: early steps do draw above the late bounds
    with pytest.raises(GasError, match=r"t_max_end must lie in \[t_min, t_max\]"):
        build_edit(backbone, image, plan, GuidanceConfig(full_prompt=False, t_max_end=20))
    module = build_edit(backbone, image, plan, GuidanceConfig(full_prompt=False, t_max_end=400))
    with pytest.raises(GasError, match="t_max_end anneals the timesteps over trainer.max_steps"):
        L.Trainer(max_steps=-1, max_time="00:00:00:20", accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(module)


def test_stratified_t_puts_one_draw_of_each_term_in_each_slice_of_the_range(backbone):
    """t_sampling stratified: over S steps each term's draws fall one in each of the S equal slices of
    [t_min, bound], written out by hand (S = 6 over [50, 649]: slices of 100), in every schedule and
    sampling; a term's own cap narrows its slices; the order differs between terms and seeds; refused
    without max_steps. Uniform draws are checked to miss a slice on these seeds (so the test can fail)."""
    import lightning as L
    from PIL import Image

    from gas_lightning.errors import GasError
    from gas_lightning.pipeline import build_edit

    plan = EditPlan.from_lists(["a red ball", "grass"], ["a blue ball", "snow"],
                               boxes=[[0.55, 0.55, 0.95, 0.95], [0.0, 0.0, 1.0, 1.0]])
    image = Image.new("RGB", (32, 32), (90, 160, 60))
    orders = []
    for schedule, sampling, local, seed in (("batched", "shared", None, 5), ("batched", "per_term", 349, 5),
                                            ("sequential", "shared", None, 5), ("batched", "per_term", None, 6)):
        cfg = GuidanceConfig(full_prompt=False, batched_noise=sampling, t_min=50, t_max=649, local_t_max=local,
                             t_sampling="stratified")
        seen = drawn_timesteps(build_edit(backbone, image, plan, cfg, schedule=schedule, seed=seed), schedule, 6)
        steps = seen if schedule == "batched" else [seen[i] + seen[i + 1] for i in range(0, len(seen), 2)]
        assert len(steps) == 6
        for term, width in ((0, 100 if local is None else 50), (1, 100)):  # ball: capped at 349 -> slices of 50
            ts = [s[term] for s in steps]
            assert sorted((t - 50) // width for t in ts) == list(range(6)), (schedule, sampling, term, ts)
        orders.append([[(s[k] - 50) // 100 for s in steps] for k in (0, 1)])
    assert orders[1][0] != orders[1][1]  # per-term draws: each term its own order
    assert orders[1][1] != orders[3][1]  # another seed, another order
    uniform = drawn_timesteps(build_edit(backbone, image, plan, GuidanceConfig(full_prompt=False, t_min=50, t_max=649),
                                         schedule="batched", seed=5), "batched", 6)
    assert sorted((s[0] - 50) // 100 for s in uniform) != list(range(6))
    with pytest.raises(GasError, match="t_sampling must be one of"):
        GuidanceConfig(t_sampling="sobol")
    module = build_edit(backbone, image, plan, GuidanceConfig(full_prompt=False, t_sampling="stratified"))
    with pytest.raises(GasError, match="t_sampling stratified spreads the timesteps over trainer.max_steps"):
        L.Trainer(max_steps=-1, max_time="00:00:00:20", accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(module)


def test_terms_given_one_draw_share_their_null_text_samples(backbone):
    """keep_aware hands a keep term the very (t, eps) of an edit term: its null-text pair is the edit's,
    so the call holds 4n - 2 samples, and the gradient is still the sum of the terms taken one by one.
    A term whose reference differs (reference_context) shares only the null-text sample of the current latent."""
    from dataclasses import replace

    plan = EditPlan.from_lists(["a red ball", "grass", "a dog"], ["a blue ball", "snow", "a dog"],
                               boxes=[[0.55, 0.55, 0.95, 0.95], [0.0, 0.0, 1.0, 1.0], [0.05, 0.05, 0.4, 0.4]])
    cfg = GuidanceConfig(full_prompt=False)
    guidance = GroundedScoreGuidance(backbone, cfg)
    terms = build_terms(backbone, plan, EditMasks.from_plan(plan, 16, 16), cfg)
    gen = torch.Generator().manual_seed(4)
    z_src = torch.randn(1, 4, 16, 16, generator=gen)
    z = z_src + 0.3 * torch.randn(z_src.shape, generator=gen)
    e_ball, e_grass = torch.randn(z_src.shape, generator=gen), torch.randn(z_src.shape, generator=gen)
    ts, noises = [700, 250, 250], [e_ball, e_grass, e_grass]  # the keep term (2) takes the grass term's draw
    context = torch.zeros(16, 16)
    context[:6, :6] = 1.0
    for keep, samples in ((terms[2], 10), (replace(terms[2], context=context), 11)):
        with unet_batches(backbone) as calls:
            batched, logs = guidance.batched_gradient(z, z_src, [terms[0], terms[1], keep], ts, noises)
        assert calls == [samples]
        expected = sum(guidance.term_gradient(z, z_src, tm, t, e)[0] for tm, t, e in zip([terms[0], terms[1], keep], ts, noises))
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

    fake = SimpleNamespace(guidance=SimpleNamespace(config=GuidanceConfig()), _progress=lambda: 0.0, _trainer=None,
                           latent=torch.zeros(1, 1, 1, 1), device=torch.device("cpu"), terms=[], global_step=0)
    gen = torch.Generator().manual_seed(0)
    drawn = {GroundAScoreEdit._draw(fake, gen)[0] for _ in range(20000)}
    # 20000 draws from 899 values: each value is missed with probability (898/899)^20000 ~ e^-22
    assert drawn == set(range(50, 949))
