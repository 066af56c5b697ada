"""What `gas-edit` prints: a step counter and our own lines, none of the libraries' noise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jsonargparse import Namespace

from gas_lightning.callbacks.progress import StepProgressBar, step_progress_bar

ROOT = Path(__file__).resolve().parents[1]
NOISE = (
    "Epoch 0",  # Lightning's own bar
    "litlogger",
    "Tip:",  # Lightning's logger advertisement
    "GPU available",
    "TPU available",
    "Cannot initialize model with low cpu memory usage",
    "pip install accelerate",  # diffusers
    "Loading weights",  # transformers' bar over the text encoder's tensors
    "isinstance(treespec, LeafSpec)",  # a deprecation inside Lightning
    "stopped: `max_steps",
)


def test_gas_edit_prints_steps_and_no_library_noise(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gas_lightning.cli",
            "--config",
            "configs/shapes.yaml",
            "--trainer.max_steps",
            "3",
            "--lr_scheduler.init_args.T_max",
            "3",
            "--output_dir",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-3000:]
    assert [n for n in NOISE if n in text] == [], text[-3000:]
    assert "step 3/3" in text
    assert "editing on cpu (precision 32-true), 3 steps; outputs in " + str(tmp_path / "out") in run.stderr
    assert "edited: " + str(tmp_path / "out" / "edited.png") in run.stdout
    assert "WARNING" not in run.stderr  # the schedule spans the run: nothing to warn about


def test_no_bar_where_lightning_would_refuse_one():
    assert [type(c) for c in step_progress_bar(Namespace(enable_progress_bar=None, callbacks=None))] == [
        StepProgressBar
    ]
    assert step_progress_bar(Namespace(enable_progress_bar=False, callbacks=None)) == []
    own = Namespace(class_path="lightning.pytorch.callbacks.RichProgressBar", init_args=Namespace())
    other = Namespace(class_path="gas_lightning.callbacks.EditPreviews", init_args=Namespace())
    assert step_progress_bar(Namespace(enable_progress_bar=True, callbacks=[other, own])) == []
    assert len(step_progress_bar({"enable_progress_bar": True, "callbacks": [{"class_path": other.class_path}]})) == 1


def test_the_python_api_leaves_logging_alone():
    """Only the entry points filter library loggers; a notebook importing the API keeps them as they were."""
    code = (
        "import logging, gas_lightning, gas_lightning.api, gas_lightning.app\n"
        "from gas_lightning import plan_edit\n"
        "plan_edit('gas-lightning:example.png')\n"
        "names = ['lightning.pytorch.utilities.rank_zero', 'diffusers.models.modeling_utils']\n"
        "print([len(logging.getLogger(n).filters) for n in names])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[0, 0]"
