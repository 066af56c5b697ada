"""SIGKILL at random moments of a real `gas-edit` run, then `--resume last` to the end.

Every kill must leave only checkpoints that load (weights_only=True) and previews that decode,
and the edit finished through several kills and resumes must end on the latent of an
uninterrupted run (Adam, so a lost optimizer state would show).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from test_cli import edit_args  # the same tiny edit as the CLI tests

STEPS = 30
KILLS = 3
STEPS_BEFORE_KILL = 2  # each kill waits for the checkpoint 2 steps past where its run resumed, then a random delay
SETTINGS = [
    "--trainer.max_steps",
    str(STEPS),
    "--checkpoint_every",
    "1",
    "--optimizer",
    "torch.optim.Adam",
    "--optimizer.lr",
    "0.05",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def gas_edit(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:  # a file, not a pipe: a full pipe would stall the child
        return subprocess.Popen(
            [sys.executable, "-m", "gas_lightning.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=ENV
        )


def wait_for_new_file(path: Path, since_ns: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until `path` is written by this process (not left by an earlier one); fail if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime_ns >= since_ns:
            return
        assert proc.poll() is None, f"the run ended before writing {path.name}:\n{log.read_text()[-3000:]}"
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no {path.name} after {timeout} s:\n{log.read_text()[-3000:]}")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def check_what_a_kill_left(out: Path) -> int:
    """Every checkpoint loads as data and holds the step its name says; every preview decodes."""
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert ckpts, "no checkpoint survived the kill"
    for path in ckpts:
        ckpt = load(path)
        assert ckpt["state_dict"]["latent"].isfinite().all(), path.name
        if path.name.startswith("step"):
            assert ckpt["global_step"] == int(path.stem[len("step") :]), path.name
    for png in (out / "previews").glob("*.png"):
        Image.open(png).load()
    return load(out / "checkpoints" / "last.ckpt")["global_step"]


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tiny_sd, image_file, tmp_path):
    rng = random.Random(15)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    log = tmp_path / "gas-edit.log"
    reference = gas_edit(edit_args(tiny_sd, image_file, ref, *SETTINGS), log)

    resumed_from = [0]
    for i in range(KILLS):
        # relative to where this run resumes: on a fast machine the random delay can cover several steps
        step = resumed_from[-1] + STEPS_BEFORE_KILL
        assert step < STEPS - 2, f"the kills ran past the edit (resumed from {resumed_from}); raise STEPS"
        start_ns = time.time_ns()
        proc = gas_edit(edit_args(tiny_sd, image_file, out, *SETTINGS, *(["--resume", "last"] if i else [])), log)
        wait_for_new_file(out / "checkpoints" / f"step{step:06d}.ckpt", start_ns, proc, log)
        time.sleep(rng.uniform(0.0, 0.15))  # lands anywhere in the next steps: a write, a UNet call, ...
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, f"the kill after step {step} missed the run"
        resumed_from.append(check_what_a_kill_left(out))
        assert not (out / "latent.pt").exists()  # killed before the end: no final outputs yet
    assert resumed_from == sorted(resumed_from) and resumed_from[1] >= STEPS_BEFORE_KILL, resumed_from

    final = gas_edit(edit_args(tiny_sd, image_file, out, *SETTINGS, "--resume", "last"), log)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert reference.wait(timeout=300) == 0, log.read_text()[-3000:]
    resumed, expected = load(out / "latent.pt"), load(ref / "latent.pt")
    assert resumed["step"] == expected["step"] == STEPS
    torch.testing.assert_close(resumed["latent"], expected["latent"], rtol=0, atol=1e-6)
