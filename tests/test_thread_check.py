"""tools/world/thread_check.py: the instruction-set comparison really runs its second side capped at AVX2."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "world"))
import thread_check  # noqa: E402


def test_isa_comparison_runs_each_side_at_its_capability(capsys):
    assert thread_check.main(["--cases", "1", "--seed", "2", "--steps", "2", "--compare", "isa"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 1
    native = torch.backends.cpu.get_cpu_capability()
    # a child capped at AVX2 reports AVX2 where the CPU has it (AVX-512 machines included), else what it has
    expected_capped = "AVX2" if native in ("AVX2", "AVX512") else native
    assert rows[0]["capability"] == {"native": native, "avx2": expected_capped}
    assert len(rows[0]["verdicts_native"]) == len(rows[0]["verdicts_avx2"]) >= 1
    assert rows[0]["max_pixel_diff"] >= 0
