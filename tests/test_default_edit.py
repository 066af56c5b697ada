"""The README's main command on the bundled model: request -> world grounder -> edit -> outputs."""

from pathlib import Path

import pytest
from PIL import Image

from gas_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_bundled_default_edit_runs_and_writes_outputs(tmp_path):
    out = tmp_path / "shapes"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--config",
                str(REPO / "configs" / "shapes.yaml"),
                "--output_dir",
                str(out),
                "--trainer.max_steps",
                "5",
                "--lr_scheduler.T_max",
                "5",
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
    assert exit_info.value.code == 0
    edited = Image.open(out / "edited.png")
    assert edited.size == (32, 32)
    import json

    plan = json.loads((out / "plan.json").read_text())
    # the WorldGrounder found the circle, the square and the kept triangle; the background got the whole image
    boxes = [s["box"] for s in plan["subtasks"]]
    assert boxes[2] == [0.0, 0.0, 1.0, 1.0]
    assert boxes[0][2] < 0.5 and boxes[1][0] > 0.5  # circle on the left, square on the right
    assert boxes[3][1] > 0.5 and plan["subtasks"][3]["source"] == plan["subtasks"][3]["target"]  # triangle below
    assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.timeout(1800)  # one full 150-step edit: about a minute idle, far longer on a shared CPU
def test_the_main_command_makes_the_requested_edit(tmp_path):
    """The README's main command as shipped (all its steps), scored by the world's exact scorer:
    every requested attribute right and the kept triangle still there."""
    import numpy as np

    from gas_lightning.worlds import score
    from gas_lightning.worlds.cases import example_case

    out = tmp_path / "shapes"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--config",
                str(REPO / "configs" / "shapes.yaml"),
                "--output_dir",
                str(out),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.callbacks",
                "[]",
                "--checkpoint_every",
                "1000",
            ]
        )
    assert exit_info.value.code == 0
    result = score(np.asarray(Image.open(out / "edited.png").convert("RGB")), example_case())
    assert [a["ok"] for a in result["attributes"]] == [True, True, True], result["attributes"]
    assert result["preserved"] == 1.0
