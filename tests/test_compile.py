"""The compiled UNet path runs on the CPU (so it cannot rot between GPU loans): same edit, one compilation.

torch.compile with inductor on a tiny model costs about a minute of C++ compilation on a cold cache;
one test pays it once and checks everything it can against the eager run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from gas_lightning import GasError, edit, load_model
from gas_lightning.backbone import compile_mode

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
REQUEST = "change the red block into a yellow block. change the grass into snow."
BOXES = [[0.05, 0.05, 0.45, 0.5], [0.0, 0.0, 1.0, 1.0]]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_edit_equals_eager_and_compiles_once_for_several_edits(tiny_sd, image_file, tmp_path):
    def run(model, name, **kw):
        return edit(
            image_file, REQUEST, boxes=BOXES, config=TINY, model=model, steps=3, output_dir=tmp_path / name, **kw
        )

    eager = run(load_model(tiny_sd), "eager")

    model = load_model(tiny_sd)
    before = graphs()
    first = run(model, "first", compile=True)  # the runner's path: cfg.compile -> Backbone.tune
    compiled_graphs = graphs() - before
    assert compiled_graphs >= 1  # the UNet really ran through dynamo
    assert model.compiled == "default"
    wrapper = model.unet._compiled_call_impl
    # inductor reorders float sums, and the x2000 loss scale magnifies that rounding in each step's
    # move (seen: 2e-5 at most over 3 steps); a wrong graph (a lost hook, another timestep) moves far more
    torch.testing.assert_close(first.latent, eager.latent, rtol=1e-3, atol=1e-4)

    # a second edit on the same model, as `gas-edit batch` runs its jobs: compile asked again, nothing compiled
    second = run(model, "second", compile=True, seed=1)
    assert graphs() - before == compiled_graphs
    assert model.unet._compiled_call_impl is wrapper
    assert not torch.equal(second.latent, first.latent)  # another seed: a real second edit, not a cached result


def test_compile_modes_are_checked():
    assert (compile_mode(False), compile_mode(True), compile_mode("max-autotune")) == (None, "default", "max-autotune")
    with pytest.raises(GasError, match="compile must be true, false or one of"):
        compile_mode("fast")
