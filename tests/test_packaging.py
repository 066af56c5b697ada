"""The package as a user installs it: quiet loading without accelerate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# diffusers decides whether accelerate is there from one module flag; forcing it off makes the
# check the same whether or not the machine running the tests has accelerate installed
LOAD_WITHOUT_ACCELERATE = """
import sys
import diffusers.utils.import_utils as iu
iu._accelerate_available = False
from gas_lightning.loading import load_backbone
load_backbone(sys.argv[1], device="cpu", dtype="float32", attention="sdpa")
print("loaded")
"""


def test_loading_without_accelerate_prints_no_install_hint(tiny_sd):
    run = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_ACCELERATE, str(tiny_sd)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "loaded" in run.stdout, run.stderr[-2000:]
    assert "pip install accelerate" not in run.stderr and "low cpu memory usage" not in run.stderr, run.stderr[-2000:]
