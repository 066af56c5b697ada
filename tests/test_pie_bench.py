"""tools/bench/pie_bench_jobs.py on a small hand-written file in PIE-Bench's mapping_file.json layout."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from gas_lightning.jobs import read_jobs

REPO = Path(__file__).resolve().parents[1]
H, W = 6, 8  # masks of 6 rows x 8 columns (PIE-Bench's are 512 x 512)


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("pie_bench_jobs", REPO / "tools" / "bench" / "pie_bench_jobs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pie_bench_jobs"] = mod
    spec.loader.exec_module(mod)
    return mod


MAPPING = {
    "000000000000": {
        "image_path": "0_random_140/000000000000.jpg",
        "original_prompt": "a cat sitting on a wooden chair",
        "editing_prompt": "a [dog] sitting on a wooden chair",
        "editing_instruction": "Make the cat a dog",
        "editing_type_id": "0",
        "blended_word": "cat dog",
        "mask": [10, 3, 18, 3, 26, 3],
    },  # rows 1-3, columns 2-4
    "000000000001": {
        "image_path": "6_change_attribute_color_40/000000000001.jpg",
        "original_prompt": "a red car on the road",
        "editing_prompt": "a [blue] car on the road",
        "editing_instruction": "",
        "editing_type_id": "6",
        "blended_word": "car car",
        "mask": [44, 10],
    },  # row 5, columns 4-7: the run stops at the end
    "000000000002": {
        "image_path": "9_change_style_80/000000000002.jpg",
        "original_prompt": "a house in the snow",
        "editing_prompt": "a house in the snow",
        "editing_instruction": "",
        "editing_type_id": "9",
        "blended_word": "house cabin",
        "mask": [],
    },  # no difference in the prompts: the blended words
    "000000000003": {
        "image_path": "1_change_object_80/000000000003.jpg",
        "original_prompt": "a bird",
        "editing_prompt": "a bird",
        "editing_instruction": "",
        "editing_type_id": "1",
        "blended_word": "",
        "mask": [0, 1],
    },  # nothing to edit: left out
    "000000000004": {
        "image_path": "2_add_object_80/000000000004.jpg",
        "original_prompt": "a table",
        "editing_prompt": "a table with [a cup]",
        "editing_instruction": "",
        "editing_type_id": "2",
        "blended_word": "table cup",
        "mask": [0, 4],
    },  # a type not asked for
}


def test_run_length_pairs_decode_row_major_from_zero(tool):
    expected = np.zeros((H, W), bool)
    expected[1:4, 2:5] = True
    assert np.array_equal(tool.decode_mask([10, 3, 18, 3, 26, 3], (H, W)), expected)
    tail = np.zeros((H, W), bool)
    tail[5, 4:] = True
    assert np.array_equal(tool.decode_mask([44, 10], (H, W)), tail)
    assert tool.mask_box(expected) == [2 / 8, 1 / 6, 5 / 8, 4 / 6]
    assert tool.mask_box(np.zeros((H, W), bool)) == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="even-length"):
        tool.decode_mask([1, 2, 3], (H, W))
    with pytest.raises(ValueError, match="past the 6x8 mask"):
        tool.decode_mask([48, 1], (H, W))


def test_mapping_file_becomes_a_jobs_file_gas_edit_reads(tool, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    (root / "mapping_file.json").write_text(json.dumps(MAPPING))
    out = tmp_path / "jobs" / "pie.jsonl"
    assert (
        tool.main(
            ["--pie_root", str(root), "--out", str(out), "--types", "0,6,9,1", "--mask_size", "6", "8", "--seed", "7"]
        )
        == 0
    )
    assert "case 000000000003 left out" in capsys.readouterr().err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    images = root / "annotation_images"
    assert lines == [
        {
            "name": "000000000000",
            "image": str(images / "0_random_140/000000000000.jpg"),
            "seed": 7,
            "source": "a cat sitting on a wooden chair",
            "target": "a dog sitting on a wooden chair",
            "boxes": [[0.25, 1 / 6, 0.625, 4 / 6]],
        },
        {
            "name": "000000000001",
            "image": str(images / "6_change_attribute_color_40/000000000001.jpg"),
            "seed": 7,
            "source": "a red car on the road",
            "target": "a blue car on the road",
            "boxes": [[0.5, 5 / 6, 1.0, 1.0]],
        },
        {
            "name": "000000000002",
            "image": str(images / "9_change_style_80/000000000002.jpg"),
            "seed": 7,
            "sources": ["house"],
            "targets": ["cabin"],
            "source_prompt": "a house in the snow",
            "target_prompt": "a house in the snow",
            "boxes": [[0.0, 0.0, 1.0, 1.0]],
        },
    ]
    # the batch reads it strictly, and each job's edit is a grounded plan with the mask's box
    from gas_lightning.resolve import PlanSpec, make_plan
    from gas_lightning.runner import build_parser

    jobs = read_jobs(out, known=build_parser(exit_on_error=False).get_defaults())
    plans = [
        make_plan(PlanSpec(**{k: v for k, v in j.settings.items() if k in PlanSpec.__dataclass_fields__})) for j in jobs
    ]
    assert [[(s.source, s.target) for s in p.subtasks] for p in plans] == [
        [("a cat", "a dog")],
        [("a red car", "a blue car")],
        [("house", "cabin")],
    ]
    assert all(p.grounded for p in plans)
