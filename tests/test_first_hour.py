"""A newcomer's first hour (issue 28): one test per point a new user tripped over.

1 objects the request does not name are kept; 2 Ctrl-C then `--resume last`; 3 a finished edit is
neither redone nor replaced; 4 a quiet Python API; 5 the bundled model refuses words it does not
know; 6 a wrong flag is one line; 7 a short `--help`; 8 the app (tests/test_app.py).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_cli import edit_args, run_cli

STARTS: list[int] = []  # global_step at each fit's start, written by RecordStart


class CtrlCAtBatch(Callback):
    """Raises KeyboardInterrupt (what Ctrl-C raises) when batch `at_batch` starts."""

    def __init__(self, at_batch: int = 3):
        self.at_batch = at_batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.at_batch:
            raise KeyboardInterrupt


class RecordStart(Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STARTS.append(trainer.global_step)


def _ctrl_c(at: int) -> list[str]:
    return ["--trainer.callbacks+=test_first_hour.CtrlCAtBatch", f"--trainer.callbacks.at_batch={at}"]


def _resume_last(tiny_sd, image_file, out: Path, steps: int, every: int) -> list[int]:
    """`--resume last` on `out`; the steps each fit started from (asserting the run exits 0)."""
    STARTS.clear()
    args = ["--trainer.max_steps", str(steps), "--checkpoint_every", str(every), "--resume", "last"]
    assert run_cli(edit_args(tiny_sd, image_file, out, *args, "--trainer.callbacks+=test_first_hour.RecordStart")) == 0
    return list(STARTS)


# --- 2: Ctrl-C, then --resume last ---------------------------------------------------------------


def test_ctrl_c_says_where_the_checkpoint_is_and_resume_last_takes_the_newest(
    tiny_sd, image_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "out"
    # stopped at step 3 with a periodic checkpoint every 2 steps: last.ckpt holds step 2, interrupted.ckpt step 3
    code = run_cli(
        edit_args(tiny_sd, image_file, out, "--trainer.max_steps", "6", "--checkpoint_every", "2", *_ctrl_c(3))
    )
    err = capsys.readouterr().err
    assert code == 130
    assert str(out / "checkpoints" / "interrupted.ckpt") in err and "--resume last" in err, err
    assert "Detected KeyboardInterrupt" not in err
    # from interrupted.ckpt (step 3), not last.ckpt (step 2): no step redone
    assert _resume_last(tiny_sd, image_file, out, 6, 2) == [3]


def test_resume_last_after_a_stop_before_the_first_periodic_checkpoint(
    tiny_sd, image_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "out"
    assert (
        run_cli(
            edit_args(tiny_sd, image_file, out, "--trainer.max_steps", "4", "--checkpoint_every", "50", *_ctrl_c(1))
        )
        == 130
    )
    assert not (out / "checkpoints" / "last.ckpt").exists()
    assert _resume_last(tiny_sd, image_file, out, 4, 50) == [1]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_the_step_bar_of_a_resumed_edit_knows_its_total(tiny_sd, image_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(edit_args(tiny_sd, image_file, out, "--trainer.max_steps", "2")) == 0
    capsys.readouterr()
    assert (
        run_cli(
            edit_args(
                tiny_sd,
                image_file,
                out,
                "--trainer.max_steps",
                "4",
                "--resume",
                "last",
                "--trainer.enable_progress_bar",
                "true",
            )
        )
        == 0
    )
    bar = capsys.readouterr().out  # Lightning's tqdm bars write to stdout
    assert "step 4/4" in bar and "/?" not in bar, bar[-600:]


# --- 3: a finished edit is neither redone nor replaced --------------------------------------------

PRESET = str(Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml")


def test_the_preset_refuses_a_folder_that_holds_an_edit(tmp_path, capsys):
    """The quick start run twice (or the preset pointed at another edit's folder) must not replace it."""
    out = tmp_path / "shapes"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"an earlier edit")
    (out / "edited.png").write_bytes(b"its picture")
    code = run_cli(["--config", PRESET, "--output_dir", str(out), "--trainer.max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "already holds an earlier edit" in err, err[-400:]
    assert (out / "edited.png").read_bytes() == b"its picture"


def test_the_readme_batch_rerun_skips_finished_jobs(tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        '{"name": "grass", "image": "gas-lightning:example.png", "source": "a red circle on snow", '
        '"target": "a red circle on grass", "boxes": [[0, 0, 1, 1]]}\n'
    )
    command = [
        "batch",
        "--config",
        PRESET,
        "--jobs",
        str(jobs),
        "--output_dir",
        str(tmp_path / "out"),
        "--trainer.max_steps",
        "1",
        "--lr_scheduler.T_max",
        "1",
    ]
    assert run_cli(command) == 0
    capsys.readouterr()
    assert run_cli(command) == 0
    assert "1 ok (1 from an earlier run)" in capsys.readouterr().out


# --- 6: a wrong flag is one line, with what to type instead ---------------------------------------


@pytest.mark.parametrize(
    "flag, meant",
    [
        ("--steps", "--trainer.max_steps"),
        ("--max_steps", "--trainer.max_steps"),
        ("--guidance_scale", "--guidance.guidance_scale"),
        ("--reqest", "--request"),
    ],
)
def test_a_wrong_flag_is_one_line_with_a_did_you_mean(flag, meant, capsys):
    code = run_cli(["--config", PRESET, flag, "20"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gas-edit: error:"), err
    assert f"did you mean {meant}?" in err


def test_a_bad_value_is_one_line(capsys):
    assert run_cli(["--config", PRESET, "--schedule", "fast"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fast" in err and "batched" in err and "usage" not in err, err


def test_the_lr_schedule_warning_names_the_flag(tmp_path, caplog):
    from gas_lightning.runner import check_lr_scheduler

    check_lr_scheduler(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=150), 300)
    assert "--lr_scheduler.T_max 300" in caplog.text


# --- 7: a short --help, the full list behind --help-all ---------------------------------------------


def test_help_is_short_grouped_and_points_to_the_rest(capsys):
    assert run_cli(["--help"]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 60
    for title in ("what to edit:", "model:", "output:", "run:"):
        assert title in text
    for line in text.splitlines():  # every option listed says what it is for
        if line.startswith("  --request") or line.startswith("  --boxes"):
            assert len(line.split(None, 1)) == 2, line
    assert "gas-edit batch" in text and "gas-edit app" in text and "--help-all" in text
    assert "DESIGN.md" not in text and "docs/method.md" in text
    assert run_cli(["--help-all"]) == 0
    full = capsys.readouterr().out
    assert len(full.splitlines()) > 300 and "--trainer.max_steps" in full
    assert "<function" not in full and "lambda" not in full


# --- 4: the Python API is as quiet as the command line, and leaves the caller's logging alone ------

API_CALL = r"""
import logging, warnings
from gas_lightning import edit
edit("gas-lightning:example.png", "change the red circle into a blue circle.", steps=1, output_dir=OUT + "0")
# the libraries add their own warning filters when first imported: compared from here on
before = (list(warnings.filters), {n: list(logging.getLogger(n).filters) for n in
          ("lightning.pytorch.utilities.rank_zero", "diffusers.models.modeling_utils")}, logging.root.handlers[:])
result = edit("gas-lightning:example.png", "change the red circle into a blue circle.", steps=2, output_dir=OUT)
after = (list(warnings.filters), {n: list(logging.getLogger(n).filters) for n in before[1]}, logging.root.handlers[:])
print("UNCHANGED" if after == before else f"CHANGED {before} {after}")
"""


def test_the_python_api_prints_only_its_bar(tmp_path):
    import subprocess
    import sys

    code = API_CALL.replace("OUT", repr(str(tmp_path / "out")))
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-2000:]
    assert "UNCHANGED" in run.stdout, text[-2000:]
    for noise in (
        "GPU available",
        "TPU available",
        "Tip:",
        "accelerate",
        "Epoch 0",
        "stopped: `max_steps",
        "deprecated",
        "ModelCheckpoint",
        "Warning",
        "Loading weights",
    ):
        assert noise not in text, (noise, text[-2000:])
    assert "step 2/2" in text


# --- 5: the bundled model names the words it does not know and refuses before any step ------------


def test_the_bundled_model_refuses_words_it_does_not_know(image_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(
        [
            "--model",
            "gas-lightning:shapes-model",
            "--image",
            image_file,
            "--output_dir",
            str(out),
            "--request",
            "change the dog into a cat. change the sofa into a red square.",
            "--boxes",
            "[[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]",
            "--trainer.max_steps",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "'dog', 'cat', 'sofa'" in err and "'red'" not in err and "'square'" not in err
    assert not (out / "checkpoints").exists() and not (out / "edited.png").exists()  # no step was taken


def test_words_the_bundled_model_knows_pass():
    from gas_lightning.worlds.vocab import check_known, unknown_words

    check_known(["the red circle", "an orange triangle on snow", "a yellow circle, a green square and sand"])
    assert unknown_words(["the red circles", "a blue cube"]) == ["circles", "cube"]


# --- 1: objects the request does not name are kept ------------------------------------------------


def test_objects_the_request_does_not_name_get_keep_subtasks():
    from gas_lightning.api import plan_edit

    request = "change the red circle into a blue circle. change the snow into grass."
    plan = plan_edit("gas-lightning:example.png", request)
    # the example scene (worlds/assets/example.png): a red circle, a blue square and an orange triangle on snow
    assert [(s.source, s.target) for s in plan.subtasks] == [
        ("the red circle", "a blue circle"),
        ("the snow", "grass"),
        ("a blue square", "a blue square"),
        ("an orange triangle", "an orange triangle"),
    ]
    assert plan.subtasks[2].box[0] > 0.5 and plan.subtasks[3].box[1] > 0.5  # the square right, the triangle below
    assert len(plan_edit("gas-lightning:example.png", request, keep_unmentioned=False).subtasks) == 2


def test_keep_unmentioned_keeps_what_no_box_covers():
    from gas_lightning.plan import EditPlan, Subtask
    from gas_lightning.resolve import keep_unmentioned

    plan = EditPlan(
        "x",
        "y",
        (Subtask("a dog", "a cat", box=(0.05, 0.0, 0.5, 0.5)), Subtask("grass", "snow", box=(0.0, 0.0, 1.0, 1.0))),
    )
    objects = [
        ("a dog", (0.0, 0.0, 0.5, 0.5)),  # IoU 0.225 / 0.25 = 0.9 with the dog's box: named
        ("a ball", (0.5, 0.5, 1.0, 1.0)),  # only the whole-image background covers it: kept
        ("a cup", (0.0, 0.0, 0.2, 0.5)),
    ]  # IoU 0.075 / 0.225 = 0.33 with the dog's box: kept
    kept = keep_unmentioned(plan, objects).subtasks[2:]
    assert [(s.source, s.target, s.box, s.penalty) for s in kept] == [
        ("a ball", "a ball", (0.5, 0.5, 1.0, 1.0), False),
        ("a cup", "a cup", (0.0, 0.0, 0.2, 0.5), False),
    ]
    assert keep_unmentioned(plan, objects[:1]) == plan
