"""Checkpoints: data-only loading, kill-safe writes, interrupted.ckpt, and resumes that must match."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_cli import edit_args, run_cli  # the same tiny edit as the CLI tests

from gas_lightning.cli import run
from gas_lightning.io import AtomicCheckpointIO, atomic_write

# The schedule and optimiser whose resume has the most state to lose: one Adam step per term.
ADAM_SEQUENTIAL = [
    "--schedule",
    "sequential",
    "--optimizer",
    "torch.optim.Adam",
    "--optimizer.lr",
    "0.05",
    "--checkpoint_every",
    "1",
]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class RaiseAtBatch(Callback):
    """Raises when batch `at_batch` starts, i.e. after `at_batch` completed steps."""

    def __init__(self, at_batch: int = 3):
        self.at_batch = at_batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == self.at_batch:
            raise RuntimeError(f"boom at batch {batch_idx}")


class Payload:
    """Unpickling this creates `marker`: stands for any code a pickled checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "input.png"
    Image.new("RGB", (48, 40), (90, 160, 60)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def adam_runs(tiny_sd, image, tmp_path_factory):
    """(4 uninterrupted steps, 2 steps to resume from) with the sequential schedule and Adam."""
    tmp = tmp_path_factory.mktemp("adam")
    ref, half = tmp / "ref", tmp / "half"
    assert run_cli(edit_args(tiny_sd, image, ref, "--trainer.max_steps", "4", *ADAM_SEQUENTIAL)) == 0
    assert run_cli(edit_args(tiny_sd, image, half, "--trainer.max_steps", "2", *ADAM_SEQUENTIAL)) == 0
    return ref, half


def resume_copy(half: Path, dest: Path, tiny_sd: str, image: str, *extra: str) -> int:
    shutil.copytree(half, dest)
    return run_cli(
        edit_args(tiny_sd, image, dest, "--trainer.max_steps", "4", *ADAM_SEQUENTIAL, "--resume", "last", *extra)
    )


# --- data-only loading -------------------------------------------------------------------------


def test_every_checkpoint_and_latent_loads_as_data_only(adam_runs):
    """Optimizer state, LR-free Adam, loops, callbacks and the module's plan dict are all plain data."""
    ref, _ = adam_runs
    names = sorted(p.name for p in (ref / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step000001.ckpt", "step000002.ckpt", "step000003.ckpt", "step000004.ckpt"]
    for name in names:
        ckpt = load(ref / "checkpoints" / name)
        assert ckpt["optimizer_states"][0]["state"][0]["exp_avg"].shape == ckpt["state_dict"]["latent"].shape
        assert ckpt["gas_lightning"]["schedule"] == "sequential"
    latent = load(ref / "latent.pt")
    assert latent["step"] == 4
    torch.testing.assert_close(latent["latent"], load(ref / "checkpoints" / "last.ckpt")["state_dict"]["latent"])


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(adam_runs, tiny_sd, image, tmp_path, capsys):
    _, half = adam_runs
    ckpt = load(half / "checkpoints" / "last.ckpt")
    # The payload is real: loading it the unsafe way runs it.
    probe = tmp_path / "probe"
    torch.save({**ckpt, "extra": Payload(probe)}, tmp_path / "probe.ckpt")
    torch.load(tmp_path / "probe.ckpt", weights_only=False)
    assert probe.exists()

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({**ckpt, "extra": Payload(marker)}, evil)
    out = tmp_path / "out"
    shutil.copytree(half, out)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    capsys.readouterr()
    code = run_cli(edit_args(tiny_sd, image, out, "--trainer.max_steps", "4", *ADAM_SEQUENTIAL, "--resume", str(evil)))
    err = capsys.readouterr().err
    assert code == 2
    assert not marker.exists()
    assert f"refusing to load {evil}" in err and "weights_only=True" in err and "Traceback" not in err
    # Nothing of the earlier edit is replaced (no interrupted.ckpt from a run that never started).
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


def test_no_checkpoint_relies_on_lightnings_weights_only_default(adam_runs, tiny_sd, image, tmp_path, caplog):
    """Lightning logs when a save or load leaves `weights_only` unset (it then means False)."""
    _, half = adam_runs
    lightning_log = logging.getLogger("lightning.pytorch")  # does not propagate to the root logger
    lightning_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            assert resume_copy(half, tmp_path / "out", tiny_sd, image) == 0
    finally:
        lightning_log.removeHandler(caplog.handler)
    assert "Restoring states from the checkpoint" in caplog.text  # the handler does see Lightning's messages
    assert "`weights_only` was not set" not in caplog.text


# --- writes that survive a kill -----------------------------------------------------------------


def test_sigkill_in_the_middle_of_a_checkpoint_write_keeps_the_old_file(tmp_path):
    """The process dies with half the new bytes written: the old checkpoint must still load."""
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import io, os, signal, torch
        from gas_lightning.io import AtomicCheckpointIO

        io_ = AtomicCheckpointIO()
        io_.save_checkpoint({{"global_step": 1, "latent": torch.ones(64, 64)}}, {str(path)!r})
        real_save = torch.save

        def save_half_then_die(obj, f, *args, **kwargs):
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_half_then_die
        io_.save_checkpoint({{"global_step": 2, "latent": torch.zeros(64, 64)}}, {str(path)!r})
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert load(path)["global_step"] == 1
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]  # the stray temp file is no checkpoint


def test_atomic_write_leaves_the_old_file_on_error_and_keeps_the_umask_mode(tmp_path):
    path = tmp_path / "plan.json"
    with atomic_write(path, "w") as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("new, half")
            raise RuntimeError("disk on fire")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_checkpoint_io_refuses_a_pickled_payload_directly(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"x": Payload(marker)}, tmp_path / "x.ckpt")
    from gas_lightning.errors import GasError

    with pytest.raises(GasError, match="holds Python objects"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "x.ckpt")
    assert not marker.exists()


# --- interrupted.ckpt ---------------------------------------------------------------------------


def test_an_exception_in_a_step_leaves_interrupted_ckpt(tiny_sd, image, tmp_path, monkeypatch):
    at_batch = 3  # raised when batch 3 starts: batches 0, 1, 2 have each taken their step
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=f"boom at batch {at_batch}"):  # run(): main() turns it into an exit code
        run(
            edit_args(
                tiny_sd,
                image,
                out,
                "--trainer.max_steps",
                "6",
                "--checkpoint_every",
                "1",
                "--trainer.callbacks+=test_checkpoints.RaiseAtBatch",
                f"--trainer.callbacks.at_batch={at_batch}",
            )
        )
    ckpt = load(out / "checkpoints" / "interrupted.ckpt")
    assert ckpt["global_step"] == at_batch
    # The same latent as the regular checkpoint of that step: nothing lost, nothing extra.
    regular = load(out / "checkpoints" / f"step{at_batch:06d}.ckpt")
    torch.testing.assert_close(ckpt["state_dict"]["latent"], regular["state_dict"]["latent"], rtol=0, atol=0)
    assert not (out / "checkpoints" / f"step{at_batch + 1:06d}.ckpt").exists()


# --- resumes that can fail ----------------------------------------------------------------------


def test_sequential_adam_resume_matches_an_uninterrupted_run(adam_runs, tiny_sd, image, tmp_path):
    ref, half = adam_runs
    out = tmp_path / "resumed"
    assert resume_copy(half, out, tiny_sd, image) == 0
    resumed, expected = load(out / "latent.pt"), load(ref / "latent.pt")
    assert resumed["step"] == expected["step"] == 4
    torch.testing.assert_close(resumed["latent"], expected["latent"], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        load(out / "checkpoints" / "last.ckpt")["optimizer_states"][0]["state"][0]["exp_avg"],
        load(ref / "checkpoints" / "last.ckpt")["optimizer_states"][0]["state"][0]["exp_avg"],
        rtol=0,
        atol=1e-6,
    )


def test_the_resume_comparison_notices_a_lost_optimizer_state(adam_runs, tiny_sd, image, tmp_path, monkeypatch):
    """Guards the test above: with Adam's state dropped on load, the latent must differ."""
    ref, half = adam_runs
    monkeypatch.setattr(torch.optim.Adam, "load_state_dict", lambda self, state: None)
    out = tmp_path / "lost"
    assert resume_copy(half, out, tiny_sd, image) == 0
    assert (load(out / "latent.pt")["latent"] - load(ref / "latent.pt")["latent"]).abs().max() > 1e-4


def test_resume_with_a_different_plan_is_refused(adam_runs, tiny_sd, image, tmp_path, capsys):
    _, half = adam_runs
    out = tmp_path / "other"
    shutil.copytree(half, out)
    shutil.copy(out / "checkpoints" / "last.ckpt", out / "checkpoints" / "interrupted.ckpt")  # a good one to keep
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    capsys.readouterr()
    code = run_cli(
        edit_args(
            tiny_sd,
            image,
            out,
            "--trainer.max_steps",
            "4",
            *ADAM_SEQUENTIAL,
            "--resume",
            "last",
            "--boxes",
            "[[0.1, 0.1, 0.5, 0.5], [0, 0, 1, 1]]",
        )
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "different edit plan" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before
