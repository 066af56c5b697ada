"""tools/world/summarize_eval.py on a hand-made pair of runs: per-seed means and paired differences by hand."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "world"))
import summarize_eval  # noqa: E402


def record(method, seed, case, ok, psnr):
    return {
        "method": method,
        "seed": seed,
        "case": case,
        "all_attributes": ok,
        "psnr_outside": psnr,
        "bg_psnr_in_boxes": 20.0,
        "preserved": 1.0,
        "seconds": 1.0,
        "attributes": [{"kind": "colour", "ok": bool(ok), "requested": "red", "got": "red"}],
    }


def test_paired_success_and_psnr_by_hand(tmp_path):
    rows = [
        record("boxes", 1, 0, 1.0, 30.0),
        record("boxes", 1, 1, 0.0, 20.0),
        record("boxes", 2, 0, 1.0, 25.0),
        record("masks", 1, 0, 1.0, 33.0),
        record("masks", 1, 1, 1.0, float("nan")),
        record("masks", 2, 0, 0.0, 26.0),
    ]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize_eval.summarize(summarize_eval.load([path]), n_boot=200)
    boxes = summary["methods"]["boxes"]
    assert boxes["all_attributes_per_seed"] == {"1": 0.5, "2": 1.0} and boxes["all_attributes_mean"] == 0.75
    pair = summary["paired"]["boxes - masks"]
    # success: (1-1) + (0-1) + (1-0) over 3 cases = 0; one case right only with each
    assert (pair["cases"], pair["difference"], pair["only_first_right"], pair["only_second_right"]) == (3, 0.0, 1, 1)
    # PSNR outside: the nan case is left out; (30-33) and (25-26) -> mean -2, median -2
    q = pair["psnr_outside"]
    assert q["cases"] == 2 and math.isclose(q["difference_db"], -2.0) and math.isclose(q["median_db"], -2.0)
    assert -3.0 <= q["ci95"][0] <= q["ci95"][1] <= -1.0


def test_psnr_outside_objects_is_paired_where_both_records_have_it(tmp_path):
    rows = [
        record("boxes", 1, 0, 1.0, 30.0),
        record("boxes", 1, 1, 1.0, 30.0),
        record("masks", 1, 0, 1.0, 31.0),
        record("masks", 1, 1, 1.0, 31.0),
    ]
    rows[0]["psnr_outside_objects"], rows[2]["psnr_outside_objects"] = 20.0, 26.0  # case 1: older records, none
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pair = summarize_eval.summarize(summarize_eval.load([path]), n_boot=50)["paired"]["boxes - masks"]
    assert pair["psnr_outside_objects"]["cases"] == 1 and pair["psnr_outside_objects"]["difference_db"] == -6.0
    assert pair["psnr_outside"]["cases"] == 2 and pair["psnr_outside"]["difference_db"] == -1.0
