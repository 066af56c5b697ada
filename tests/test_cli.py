"""gas-edit end to end on a tiny random model: outputs, TensorBoard, resume, errors, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gas_lightning.cli import main

REQUEST = "change the red block into a yellow block. change the grass into snow."
BOXES = "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]]"
REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def edit_args(model: str, image: str, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--model",
        model,
        "--image",
        image,
        "--request",
        REQUEST,
        "--boxes",
        BOXES,
        "--output_dir",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def edit_run(tiny_sd, tmp_path_factory):
    from PIL import Image

    tmp = tmp_path_factory.mktemp("edit")
    image = tmp / "input.png"
    Image.new("RGB", (48, 40), (90, 160, 60)).save(image)
    out = tmp / "out"
    assert run_cli(edit_args(tiny_sd, str(image), out, "--trainer.max_steps", "4")) == 0
    return out, str(image)


def test_edit_writes_all_outputs(edit_run):
    out, _ = edit_run
    for name in ("edited.png", "comparison.png", "plan.json", "config.yaml", "masks.png"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "last.ckpt").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert [s["source"] for s in plan["subtasks"]] == ["the red block", "the grass"]
    assert plan["subtasks"][0]["box"] == [0.05, 0.05, 0.45, 0.5]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["trainer"]["max_steps"] == 4 and cfg["request"] == REQUEST
    from PIL import Image

    # non-square input keeps its aspect: 48x40 -> short side 32 -> 40x32 (multiple of 4 on the tiny model)
    assert Image.open(out / "edited.png").size == (40, 32)
    assert Image.open(out / "comparison.png").size == (80 * 8, 32 * 8)  # upscaled for viewing


def test_tensorboard_has_per_term_scalars_and_images(edit_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = edit_run
    acc = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for term in ("subtask0_the-red-block", "subtask1_the-grass", "full"):
        for key in ("t", "gamma", "grad_norm"):
            assert f"{term}/{key}" in tags["scalars"], (term, key, tags["scalars"])
        assert len(acc.Scalars(f"{term}/t")) == 4
    assert "subtask0_the-red-block/cds_loss" in tags["scalars"]  # tiny.yaml preserves the block's form
    assert "inputs/source" in tags["images"] and "edit/preview" in tags["images"]


def test_checkpoint_holds_only_the_latent(edit_run):
    out, _ = edit_run
    ckpt_path = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    assert list(ckpt["state_dict"]) == ["latent"]
    latent_bytes = ckpt["state_dict"]["latent"].numel() * 4
    # A Stable Diffusion 1.5 latent is 64 KB; a checkpoint is that plus a few KB of loop state.
    assert ckpt_path.stat().st_size < latent_bytes + 64_000
    assert ckpt["gas_lightning"]["plan"]["subtasks"][1]["target"] == "snow"


def test_resume_gives_the_same_latent_as_an_uninterrupted_run(edit_run, tiny_sd, tmp_path):
    """The reference run did 4 steps; here 2 steps, then --resume last to 4."""
    reference, image = edit_run
    out = tmp_path / "resumed"
    assert run_cli(edit_args(tiny_sd, image, out, "--trainer.max_steps", "2")) == 0
    first = torch.load(out / "latent.pt")["latent"]
    assert run_cli(edit_args(tiny_sd, image, out, "--trainer.max_steps", "4", "--resume", "last")) == 0
    resumed = torch.load(out / "latent.pt")
    expected = torch.load(reference / "latent.pt")
    assert resumed["step"] == expected["step"] == 4
    assert not torch.equal(first, resumed["latent"])
    torch.testing.assert_close(resumed["latent"], expected["latent"], rtol=0, atol=1e-6)


def test_resume_restores_the_lr_schedule(tiny_sd, image_file, tmp_path, capsys):
    """A cosine schedule resumed at step 2 continues its decay: same latent as 4 uninterrupted steps."""
    cosine = ["--lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR", "--lr_scheduler.T_max", "4"]
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    assert run_cli(edit_args(tiny_sd, image_file, ref, "--trainer.max_steps", "4", *cosine)) == 0
    assert run_cli(edit_args(tiny_sd, image_file, out, "--trainer.max_steps", "2", *cosine)) == 0
    assert "spans 4 steps but --trainer.max_steps is 2; add --lr_scheduler.T_max 2" in capsys.readouterr().err
    assert run_cli(edit_args(tiny_sd, image_file, out, "--trainer.max_steps", "4", "--resume", "last", *cosine)) == 0
    assert "spans" not in capsys.readouterr().err
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 4
    torch.testing.assert_close(
        torch.load(out / "latent.pt")["latent"], torch.load(ref / "latent.pt")["latent"], rtol=0, atol=1e-6
    )


def test_refuses_to_overwrite_an_earlier_edit(edit_run, tiny_sd, capsys):
    out, image = edit_run
    assert run_cli(edit_args(tiny_sd, image, out, "--trainer.max_steps", "1")) == 2
    err = capsys.readouterr().err
    assert "--resume last" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--boxes", "[[0.5, 0.1, 0.2, 0.9], [0, 0, 1, 1]]"], "x0 < x1"),
        (["--boxes", "[[0, 0, 1.5, 1], [0, 0, 1, 1]]"], "outside [0, 1]"),
        (["--boxes", "[[0, 0, 1, 1]]"], "1 boxes for 2 subtasks"),
        (["--request", "make it nicer please"], "no LLM planner is configured"),
        (["--image", "/nonexistent.png"], "does not exist"),
        (["--model", "/nonexistent/model"], "--model"),
        (["--guidance.overlap_weight", "1.5"], "overlap_weight must be in [0, 1]"),
        (["--guidance.wide_guidance_scale", "-1"], "wide_guidance_scale >= 0"),
        (["--guidance.keep_guidance_scale", "-1"], "keep_guidance_scale must be >= 0"),
        (["--lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"], "needs a validation metric"),
        (
            [
                "--lr_scheduler",
                "torch.optim.lr_scheduler.OneCycleLR",
                "--lr_scheduler.max_lr",
                "0.1",
                "--lr_scheduler.total_steps",
                "1",
                "--trainer.max_steps",
                "2",
            ],
            "set --lr_scheduler.total_steps 2",
        ),
        (
            ["--lr_scheduler", "torch.optim.lr_scheduler.LinearLR", "--lr_scheduler.start_factor", "2"],
            "--lr_scheduler could not be built",
        ),
    ],
)
def test_bad_input_is_one_clear_error(tiny_sd, image_file, tmp_path, capsys, extra, message):
    code = run_cli(edit_args(tiny_sd, image_file, tmp_path / "out", "--trainer.max_steps", "1", *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_print_config(tiny_sd, image_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", tiny_sd, "--image", image_file, "--request", REQUEST, "--print_config"])
    assert exit_info.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["schedule"] == "batched" and cfg["guidance"]["guidance_scale"] == 7.5
    assert [c["class_path"] for c in cfg["trainer"]["callbacks"]][:1] == ["gas_lightning.callbacks.NullTextPenalty"]


def test_plan_only_writes_plan_and_grounding_picture(image_file, tmp_path):
    out = tmp_path / "plan"
    assert (
        run_cli(
            [
                "--image",
                image_file,
                "--request",
                REQUEST,
                "--boxes",
                BOXES,
                "--output_dir",
                str(out),
                "--plan_only",
                "true",
            ]
        )
        == 0
    )
    assert (out / "plan.json").is_file() and (out / "grounding.png").is_file()
    assert not (out / "checkpoints").exists()


def test_keep_flag_adds_keep_subtasks_with_their_boxes(image_file, tmp_path):
    out = tmp_path / "keep"
    boxes = "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1], [0.6, 0.6, 0.9, 0.9]]"
    assert (
        run_cli(
            [
                "--image",
                image_file,
                "--request",
                REQUEST,
                "--keep",
                "[the blue ball]",
                "--boxes",
                boxes,
                "--output_dir",
                str(out),
                "--plan_only",
                "true",
            ]
        )
        == 0
    )
    subtasks = json.loads((out / "plan.json").read_text())["subtasks"]
    assert subtasks[2] == {
        "source": "the blue ball",
        "target": "the blue ball",
        "box": [0.6, 0.6, 0.9, 0.9],
        "preserve_form": False,
        "intensity": 1.0,
        "penalty": False,
    }


def test_two_process_ddp_keeps_the_latent_identical(tiny_sd, image_file, tmp_path):
    probe = tmp_path / "latents"
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "gas_lightning.cli",
        *edit_args(tiny_sd, image_file, out),
        "--trainer.max_steps",
        "3",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--schedule",
        "sequential",
        "--trainer.callbacks+=ddp_probe.SaveLatentPerRank",
        f"--trainer.callbacks.dirpath={probe}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(probe / "rank0.pt"), torch.load(probe / "rank1.pt")
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert torch.equal(r0, r1)
    assert saved["global_step"] == 3 and torch.equal(r0, saved["state_dict"]["latent"])
    assert (out / "edited.png").is_file()


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_parses(config, image_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["--config", str(REPO / "configs" / config), "--image", image_file, "--request", REQUEST, "--print_config"]
        )
    assert exit_info.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["max_steps"] > 0 and cfg["optimizer"]["class_path"].startswith("torch.optim.")


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"accelerator": "cpu", "precision": "16-mixed"}, "32-true"),
        ({"accelerator": "cpu", "precision": "bf16-mixed"}, "bf16-mixed"),  # asked for by name: kept
        ({"accelerator": "cpu", "precision": "32-true"}, "32-true"),
        ({"accelerator": "gpu", "precision": "16-mixed"}, "16-mixed"),
    ],
)
def test_16_mixed_on_the_cpu_runs_in_32_true(kwargs, expected):
    """Lightning would turn 16-mixed into bf16-mixed on the CPU: 8x coarser for DDS (README)."""
    from gas_lightning.runner import cpu_precision

    cpu_precision(kwargs)
    assert kwargs["precision"] == expected


def test_an_sd_config_on_the_cpu_edits_in_float32(tiny_sd, image_file, tmp_path, monkeypatch):
    """configs/sd15.yaml asks for 16-mixed; on the CPU its edit's UNet must see float32, not bf16."""
    from gas_lightning.backbone import Backbone

    seen = []
    real = Backbone.denoise

    def spy(self, z, *args, **kwargs):
        out = real(self, z, *args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(Backbone, "denoise", spy)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--config",
                str(Path(__file__).resolve().parents[1] / "configs" / "sd15.yaml"),
                "--model",
                tiny_sd,
                "--image",
                image_file,
                "--request",
                "change the grass into snow.",
                "--boxes",
                "[[0, 0, 1, 1]]",
                "--output_dir",
                str(tmp_path / "out"),
                "--trainer.max_steps",
                "1",
                "--trainer.accelerator",
                "cpu",
            ]
        )
    assert exit_info.value.code == 0
    assert seen and set(seen) == {torch.float32}
