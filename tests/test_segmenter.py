"""`--segmenter`: SAM through transformers turns each subtask's box into a mask, offline.

A tiny random SAM (same architecture, tiny sizes) is built here and saved with save_pretrained,
then loaded through the real loading code; its masks are random but have the right form.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_inputs import gas_edit  # one in-process gas-edit run: exit status and stderr

from gas_lightning.errors import ModelLoadError
from gas_lightning.grounding.segmenter import SamSegmenter, inside_box, segment_plan
from gas_lightning.masks import read_mask
from gas_lightning.plan import EditPlan, Subtask

REPO = Path(__file__).resolve().parents[1]
REQUEST = "change the red block into a yellow block. change the grass into snow."


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory) -> str:
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    folder = tmp_path_factory.mktemp("tiny_sam")
    torch.manual_seed(0)
    vision = SamVisionConfig(
        hidden_size=16,
        output_channels=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=8,
        window_size=4,
        global_attn_indexes=[1],
        num_pos_feats=4,
        mlp_dim=32,
    )
    prompt = SamPromptEncoderConfig(hidden_size=8, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(
        hidden_size=8, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=8
    )
    config = SamConfig(
        vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(), mask_decoder_config=decoder.to_dict()
    )
    SamModel(config).save_pretrained(folder)
    SamProcessor(
        image_processor=SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    ).save_pretrained(folder)
    return str(folder)


class _Fixed:
    """A segmenter with known answers, to check what segment_plan does with them."""

    def __init__(self, masks):
        self.masks = masks
        self.calls = []

    def segment(self, image, boxes, phrases):
        self.calls.append((list(boxes), list(phrases)))
        return self.masks


def test_sam_returns_one_mask_per_box_at_the_image_size(tiny_sam):
    seg = SamSegmenter(tiny_sam)
    image = Image.new("RGB", (48, 40), (90, 160, 60))
    masks = seg.segment(image, [(0.1, 0.1, 0.4, 0.5), (0.5, 0.5, 1.0, 1.0)], ["a", "b"])
    assert len(masks) == 2
    assert all(m.shape == (40, 48) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0} for m in masks)


def test_segment_plan_masks_boxed_subtasks_and_leaves_the_whole_image_alone(tiny_sam, image_file):
    image = Image.open(image_file)
    plan = EditPlan(
        "s",
        "t",
        (
            Subtask("the red block", "a yellow block", box=(0.05, 0.05, 0.45, 0.5)),
            Subtask("the grass", "snow", box=(0.0, 0.0, 1.0, 1.0)),
            Subtask("the blue block", "a green block", box=(0.5, 0.4, 0.95, 0.95), mask="given.png"),
        ),
    )
    full = np.ones((40, 48), dtype=np.float32)
    fixed = _Fixed([full])
    out = segment_plan(plan, image, fixed)
    # only the first subtask is asked for: the background has the whole image, the third a mask
    assert fixed.calls == [([(0.05, 0.05, 0.45, 0.5)], ["the red block"])]
    assert out.subtasks[1].mask is None and out.subtasks[2].mask == "given.png"
    # a mask spilling out of its box is cut to the box grown by one pixel (1% of 40 or 48 rounds to 0 -> 1)
    expected = np.zeros((40, 48), dtype=np.float32)
    expected[1:21, 1:23] = 1.0  # rows floor(0.05*40)-1 .. ceil(0.5*40)+1, cols floor(2.4)-1 .. ceil(21.6)+1
    np.testing.assert_array_equal(read_mask(out.subtasks[0].mask), expected)
    # the real SAM goes through the same step
    sam_plan = segment_plan(plan, image, SamSegmenter(tiny_sam))
    assert sam_plan.subtasks[1].mask is None


def test_an_empty_segmenter_mask_keeps_the_box_with_a_warning(image_file, caplog):
    plan = EditPlan("s", "t", (Subtask("the red block", "a yellow block", box=(0.05, 0.05, 0.45, 0.5)),))
    with caplog.at_level(logging.WARNING, logger="gas_lightning.grounding.segmenter"):
        out = segment_plan(plan, Image.open(image_file), _Fixed([np.zeros((40, 48), np.float32)]))
    assert out.subtasks[0].mask is None and out.subtasks[0].box == (0.05, 0.05, 0.45, 0.5)
    assert any("keeps its box" in r.getMessage() for r in caplog.records)


def test_inside_box_by_hand():
    w = np.ones((10, 10), dtype=np.float32)
    cut = inside_box(w, (0.3, 0.3, 0.6, 0.6), margin=0.1)  # one pixel (10% of 10) around rows/cols 3..5
    expected = np.zeros((10, 10), dtype=np.float32)
    expected[2:7, 2:7] = 1.0
    np.testing.assert_array_equal(cut, expected)


def test_cli_segmenter_writes_masks_and_grounding_png_then_edits(tiny_sam, tiny_pixel, image_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = gas_edit(
        capsys,
        "--config",
        REPO / "configs" / "tiny.yaml",
        "--model",
        tiny_pixel,
        "--image",
        image_file,
        "--request",
        REQUEST,
        "--boxes",
        "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]]",
        "--segmenter",
        tiny_sam,
        "--output_dir",
        out,
        "--trainer.max_steps",
        "1",
    )
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["subtasks"][0]["mask"].startswith("data:image/png;base64,")
    assert "mask" not in plan["subtasks"][1]
    assert (out / "edited.png").is_file()
    code, err = gas_edit(
        capsys,
        "--image",
        image_file,
        "--request",
        REQUEST,
        "--boxes",
        "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]]",
        "--segmenter",
        tiny_sam,
        "--output_dir",
        tmp_path / "plan_only",
        "--plan_only",
        "true",
    )
    assert code == 0 and (tmp_path / "plan_only" / "grounding.png").is_file()


@pytest.mark.parametrize("which", ["missing_folder", "empty_folder", "uncached_hub_id"])
def test_missing_sam_weights_are_one_clear_error(which, tmp_path, image_file, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to find offline
    name = {
        "missing_folder": str(tmp_path / "nowhere"),
        "empty_folder": str(tmp_path),
        "uncached_hub_id": "facebook/sam-vit-base",
    }[which]
    with pytest.raises(ModelLoadError, match="--segmenter /local/path"):
        SamSegmenter(name)
    code, err = gas_edit(
        capsys,
        "--image",
        image_file,
        "--request",
        REQUEST,
        "--boxes",
        "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]]",
        "--segmenter",
        name,
        "--output_dir",
        tmp_path / "out",
        "--plan_only",
        "true",
    )
    assert code == 2 and "segmenter" in err and err.count("\n") == 1, err


def test_same_outline_scope_leaves_shape_changes_their_boxes(image_file):
    """--segment same_outline: kept objects, recolours and preserve-form swaps get masks; a square
    turning into a triangle keeps its box (its mask would be the old square)."""
    box = (0.1, 0.1, 0.5, 0.5)
    plan = EditPlan(
        "s",
        "t",
        (
            Subtask("the red circle", "a blue circle", box=box),  # recolour: same noun
            Subtask("the red square", "a red triangle", box=box),  # shape change
            Subtask("the orange triangle", "the orange triangle", box=box),  # keep
            Subtask("a dog", "a cat", box=box, preserve_form=True),  # pose-keeping swap
            Subtask("the grass", "snow", box=(0.0, 0.0, 1.0, 1.0)),
        ),
    )
    mask = np.ones((40, 48), dtype=np.float32)
    fixed = _Fixed([mask, mask, mask])
    out = segment_plan(plan, Image.open(image_file), fixed, scope="same_outline")
    assert fixed.calls[0][1] == ["the red circle", "the orange triangle", "a dog"]
    assert [s.mask is not None for s in out.subtasks] == [True, False, True, True, False]
    assert out.subtasks[1].box == box
    every = segment_plan(plan, Image.open(image_file), _Fixed([mask] * 4))
    assert [s.mask is not None for s in every.subtasks] == [True, True, True, True, False]
    with pytest.raises(ValueError, match="same_outline"):
        segment_plan(plan, Image.open(image_file), fixed, scope="shapes")


def test_gas_edit_segment_flag_reaches_the_segmenter(tmp_path, capsys):
    """--segmenter world --segment same_outline on a shape change: the square keeps its box in plan.json."""
    from gas_lightning.worlds import held_out_cases, render_pil

    case = next(c for c in held_out_cases(30, seed=3) if any(ch.kind == "shape" for ch in c.changes))
    image = tmp_path / "scene.png"
    render_pil(case.source).save(image)
    case.edit_plan().save(tmp_path / "plan.json")
    code, _ = gas_edit(
        capsys,
        "--image",
        image,
        "--plan",
        tmp_path / "plan.json",
        "--segmenter",
        "world",
        "--segment",
        "same_outline",
        "--output_dir",
        tmp_path / "out",
        "--plan_only",
        "true",
    )
    assert code == 0
    plan = EditPlan.load(tmp_path / "out" / "plan.json")
    shaped = [s for s in plan.subtasks if s.source != s.target and s.box != (0.0, 0.0, 1.0, 1.0)]

    assert shaped and all((s.mask is not None) == s.keeps_outline for s in shaped)
    assert any(s.mask is None for s in shaped)
