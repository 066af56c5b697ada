"""Two CPU processes (gloo): the optimiser step applies the MEAN of the two ranks' gradients.

Each rank draws its own noise (the step generator is keyed on the rank), so the two ranks'
gradients differ. The expected latent after one Trainer step is computed here, in one process,
from each rank's gradient (the guidance's public term_gradient / batched_gradient are the
per-rank oracle: what is under test is the reduction across ranks, not the gradient).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fidelity_units import _one_thread  # noqa: F401  (autouse: one torch thread in this process)

REPO = Path(__file__).resolve().parents[1]
REQUEST = "change the red block into a yellow block. change the grass into snow."
BOXES = "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]]"
LR, LOSS_SCALE, SEED = 0.1, 2000.0, 0


def _run_ddp(tiny_sd: str, image: str, out: Path, schedule: str) -> list[dict]:
    probe = out / "probe"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "gas_lightning.cli",
        "--model",
        tiny_sd,
        "--image",
        image,
        "--request",
        REQUEST,
        "--boxes",
        BOXES,
        "--output_dir",
        str(out),
        "--seed",
        str(SEED),
        "--schedule",
        schedule,
        "--trainer.max_steps",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.callbacks+=ddp_probe.SaveLatentAndSource",
        f"--trainer.callbacks.dirpath={probe}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(probe / f"rank{r}.pt") for r in (0, 1)]


def _single_process_module(backbone, image: str, out: Path, schedule: str):
    """The same edit built in this process: same plan (the run's plan.json), image, seed, penalty flags."""
    from gas_lightning.callbacks import NullTextPenalty
    from gas_lightning.pipeline import build_edit, load_image
    from gas_lightning.plan import EditPlan

    plan = EditPlan.load(out / "plan.json")
    module = build_edit(backbone, load_image(image), plan, schedule=schedule, seed=SEED)
    NullTextPenalty().setup(None, module, "fit")  # the CLI's default callback
    return module


def _expected(module, schedule: str, combine) -> torch.Tensor:
    """Latent after one Trainer step when the two ranks' gradients are combined by `combine`."""
    from gas_lightning.module import step_generator

    guidance, terms, z_src = module.guidance, module.active_terms, module.z_src
    gens = [step_generator(SEED, 0, rank) for rank in (0, 1)]
    z = z_src.clone()
    if schedule == "batched":
        grads = []
        for gen in gens:
            t, eps = module._draw(gen)
            grads.append(guidance.batched_gradient(z, z_src, terms, t, eps, gen)[0])
        return z - LR * LOSS_SCALE * combine(grads)
    for term in terms:  # one optimiser step per term, each rank drawing its own (t, eps) per term
        grads = []
        for gen in gens:
            t, eps = module._draw(gen)
            grads.append(guidance.term_gradient(z, z_src, term, t, eps, gen)[0])
        z = z - LR * LOSS_SCALE * combine(grads)
    return z


@pytest.mark.parametrize("schedule", ["batched", "sequential"])
def test_ddp_step_applies_the_mean_of_the_ranks_gradients(backbone, tiny_sd, image_file, tmp_path, schedule):
    out = tmp_path / schedule
    ranks = _run_ddp(tiny_sd, image_file, out, schedule)
    assert ranks[0]["step"] == ranks[1]["step"] == 1
    assert torch.equal(ranks[0]["latent"], ranks[1]["latent"])  # DDP keeps the replicas identical
    ddp = ranks[0]["latent"]

    module = _single_process_module(backbone, image_file, out, schedule)
    torch.testing.assert_close(module.z_src, ranks[0]["z_src"], rtol=0, atol=1e-6)
    z0 = module.z_src
    mean = _expected(module, schedule, lambda g: (g[0] + g[1]) / 2)
    others = {
        "sum": _expected(module, schedule, lambda g: g[0] + g[1]),
        "rank 0 alone": _expected(module, schedule, lambda g: g[0]),
        "rank 1 alone": _expected(module, schedule, lambda g: g[1]),
    }
    step = float((mean - z0).abs().max())
    assert step > 1e-3
    err = float((ddp - mean).abs().max())
    assert err < 1e-3 * step, f"DDP latent is {err:.3g} from the mean-gradient step (step size {step:.3g})"
    for name, alt in others.items():
        gap = float((alt - mean).abs().max())
        assert gap > 0.05 * step, f"{name} is indistinguishable from the mean ({gap:.3g} vs step {step:.3g})"
        assert float((ddp - alt).abs().max()) > 0.5 * gap, f"the DDP step looks like {name}"
