"""Masks instead of boxes: reading, soft latent-grid weights, the overlap rule and the union on
soft weights, plan.json, the CDS region, the world's exact masks, bad input, and a masked edit.

Expected values are written out by hand (cell areas, the capped overlap, PatchNCE's cross-entropy
from its formula) or come from the world's renderer (its coverage), never from the code under test.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_inputs import gas_edit  # one in-process gas-edit run: exit status and stderr

from gas_lightning.errors import GasError, PlanError
from gas_lightning.masks import EditMasks, attach_masks, encode_mask, mask_to_grid, read_mask, subtask_masks, union_mask
from gas_lightning.plan import EditPlan, Subtask

REPO = Path(__file__).resolve().parents[1]
REQUEST = "change the red block into a yellow block. change the grass into snow."


def grey_png(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# 1. reading every form
# ---------------------------------------------------------------------------------------------
def test_every_mask_form_reads_as_the_same_weights(tmp_path):
    block = np.zeros((6, 8), dtype=np.uint8)
    block[1:4, 2:7] = 255
    expected = (block / 255.0).astype(np.float32)
    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 3] = block  # painted on a transparent layer: the alpha is the mask
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    forms = [
        grey_png(tmp_path / "m.png", block),
        str(tmp_path / "alpha.png"),
        Image.fromarray(block),
        block,  # uint8
        block > 0,  # bool
        expected,  # float in [0, 1]
        torch.from_numpy(expected)[None],  # (1, H, W) tensor
    ]
    for form in forms:
        np.testing.assert_allclose(read_mask(form), expected, err_msg=type(form).__name__)
    soft = np.array([[0.0, 0.2], [0.6, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(read_mask(encode_mask(soft)), soft, atol=0.5 / 255)  # 8-bit PNG data URI


def test_label_map_picks_one_value(tmp_path):
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[0, :2] = 1
    labels[3, 3] = 2
    path = grey_png(tmp_path / "labels.png", labels)
    np.testing.assert_array_equal(read_mask(path, label=2), (labels == 2).astype(np.float32))
    palette = Image.fromarray(labels).convert("P")  # a palette PNG's values are its indices
    np.testing.assert_array_equal(read_mask(palette, label=1), (labels == 1).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# 2. soft latent-grid weights: each cell the mean over its exact area
# ---------------------------------------------------------------------------------------------
def test_mask_to_grid_averages_exact_cell_areas():
    # A 4x4 mask with ones in rows 0-1, cols 0-2, onto a 3x3 grid: each cell spans 4/3 pixels.
    # Column cell 2 spans [2.67, 4): one third of a pixel (of 4/3) is inside -> 0.25.
    # Row cell 1 spans [1.33, 2.67): 2/3 of a pixel (of 4/3) inside -> 0.5.
    mask = np.zeros((4, 4), dtype=np.float32)
    mask[:2, :3] = 1
    expected = torch.tensor([[1.0, 1.0, 0.25], [0.5, 0.5, 0.125], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(mask_to_grid(mask, 3, 3), expected)
    # 4x4 -> 2x2: plain 2x2 means
    torch.testing.assert_close(mask_to_grid(mask, 2, 2), torch.tensor([[1.0, 0.5], [0.0, 0.0]]))


def test_a_circle_gets_soft_edges_not_stair_steps():
    yy, xx = np.mgrid[:512, :512]
    disc = (((yy + 0.5 - 256) ** 2 + (xx + 0.5 - 256) ** 2) <= 160**2).astype(np.float32)
    grid = mask_to_grid(disc, 64, 64)
    edge = grid[(grid > 0) & (grid < 1)]
    assert edge.numel() > 50  # the outline's cells are fractional
    # the total weight is the disc's area in cells (pi r^2 / 8^2), to the pixelisation of the disc
    assert grid.sum().item() == pytest.approx(disc.sum() / 64, rel=1e-5)
    assert grid.sum().item() == pytest.approx(math.pi * 20**2, rel=0.01)


# ---------------------------------------------------------------------------------------------
# 3. the overlap rule and the union on soft weights
# ---------------------------------------------------------------------------------------------
def test_overlap_caps_the_larger_region_in_proportion_to_the_smaller_ones_weight():
    obj = torch.zeros(4, 4)
    obj[1, 1], obj[1, 2], obj[2, 1] = 1.0, 0.5, 0.25  # a soft object mask
    m = subtask_masks([(0.0, 0.0, 1.0, 1.0), obj], 4, 4, overlap_weight=0.3)
    # background: 1 - 0.7 * object weight  ->  0.3, 0.65, 0.825 on the object's cells, 1 elsewhere
    expected_bg = torch.ones(4, 4)
    expected_bg[1, 1], expected_bg[1, 2], expected_bg[2, 1] = 0.3, 0.65, 0.825
    torch.testing.assert_close(m[0], expected_bg)
    torch.testing.assert_close(m[1], obj)  # the smaller region keeps its own weights
    # the union is the larger weight per cell: here the whole background
    torch.testing.assert_close(union_mask(torch.stack([torch.ones(4, 4), obj]), 4, 4), torch.ones(4, 4))
    em = EditMasks.from_plan(
        EditPlan.from_lists(["a", "b"], ["c", "d"]).replace_subtasks(
            [Subtask("a", "c", box=(0.0, 0.5, 1.0, 1.0)), Subtask("b", "d", mask=encode_mask(obj.numpy()))]
        ),
        4,
        4,
    )
    expected_union = torch.zeros(4, 4)
    expected_union[2:, :] = 1.0  # the box: rows 2-3
    expected_union[1, 1], expected_union[1, 2] = 1.0, 0.5  # the object above it
    torch.testing.assert_close(em.full, expected_union, atol=0.6 / 255, rtol=0)  # 8-bit PNG rounding


def test_a_keep_mask_leaves_the_ground_around_the_object_to_the_background_edit():
    """The halo: with a box the background term is lowered on the whole box; with the object's
    mask only on the object."""
    triangle = np.zeros((8, 8), dtype=np.float32)
    for r in range(2, 6):  # apex at row 2, base at row 5, inside the box rows 2-5, cols 2-5
        triangle[r, 4 - (r - 2) // 2 - 1 : 4 + (r - 2) // 2 + 1] = 1.0
    background = Subtask("snow", "sand", box=(0.0, 0.0, 1.0, 1.0))
    keep_box = Subtask("a triangle", "a triangle", box=(0.25, 0.25, 0.75, 0.75))
    with_box = EditMasks.from_plan(EditPlan("s", "t", (background, keep_box)), 8, 8)
    with_mask = EditMasks.from_plan(EditPlan("s", "t", (background, keep_box)), 8, 8, masks=[None, triangle])
    box_cells = torch.zeros(8, 8)
    box_cells[2:6, 2:6] = 1
    torch.testing.assert_close(with_box.subtasks[0], 1 - 0.7 * box_cells)
    torch.testing.assert_close(with_mask.subtasks[0], 1 - 0.7 * torch.from_numpy(triangle))
    assert with_mask.subtasks[0][2, 2] == 1.0 and with_box.subtasks[0][2, 2] == pytest.approx(0.3)  # a box corner


# ---------------------------------------------------------------------------------------------
# 4. in-memory masks, plan masks, label maps, size handling
# ---------------------------------------------------------------------------------------------
def test_in_memory_masks_of_every_kind_and_plan_masks_agree(tmp_path):
    m = np.zeros((16, 16), dtype=np.uint8)
    m[4:12, 8:16] = 255
    expected = torch.zeros(4, 4)
    expected[1:3, 2:4] = 1.0  # 16 -> 4: 4x4 blocks, all in or all out
    plan = EditPlan.from_lists(["a dog"], ["a cat"])
    for form in (Image.fromarray(m), m, torch.from_numpy(m > 0)):
        torch.testing.assert_close(EditMasks.from_plan(plan, 4, 4, masks=[form]).subtasks[0], expected)
    on_disk = plan.with_masks([grey_png(tmp_path / "dog.png", m)])
    torch.testing.assert_close(EditMasks.from_plan(on_disk, 4, 4).subtasks[0], expected)
    attached = attach_masks(plan, [m])  # as plan data: a data URI and the mask's box
    assert attached.subtasks[0].mask.startswith("data:image/png;base64,")
    assert attached.subtasks[0].box == (0.5, 0.25, 1.0, 0.75)
    torch.testing.assert_close(EditMasks.from_plan(attached, 4, 4).subtasks[0], expected)


def test_a_mask_of_another_size_is_resized_and_warned_about_only_when_stretched(caplog):
    plan = EditPlan.from_lists(["a dog"], ["a cat"])
    half = np.zeros((20, 24), dtype=np.float32)
    half[:, :12] = 1.0
    with caplog.at_level(logging.WARNING, logger="gas_lightning.masks"):
        same = EditMasks.from_plan(plan, 5, 6, masks=[half], image_size=(48, 40))  # 24x20 vs 48x40: same aspect
    assert not caplog.records
    torch.testing.assert_close(same.subtasks[0][:, :3], torch.ones(5, 3))
    torch.testing.assert_close(same.subtasks[0][:, 3:], torch.zeros(5, 3))
    with caplog.at_level(logging.WARNING, logger="gas_lightning.masks"):
        EditMasks.from_plan(plan, 5, 6, masks=[np.ones((20, 20), np.float32)], image_size=(48, 40))
    assert any("different aspect" in r.getMessage() for r in caplog.records)


def test_plan_json_keeps_masks_and_resolves_them_beside_the_plan(tmp_path):
    folder = tmp_path / "plans"
    folder.mkdir()
    grey_png(folder / "cup.png", np.full((4, 4), 255))
    data = {
        "source_prompt": "a cup",
        "target_prompt": "a bowl",
        "subtasks": [
            {"source": "a cup", "target": "a bowl", "mask": "cup.png"},
            {"source": "a table", "target": "a desk", "box": [0, 0.5, 1, 1]},
            {"source": "a mug", "target": "a vase", "mask": "labels.png", "mask_label": 3},
        ],
    }
    (folder / "plan.json").write_text(json.dumps(data))
    plan = EditPlan.load(folder / "plan.json")
    assert plan.subtasks[0].mask == str(folder / "cup.png") and plan.subtasks[2].mask_label == 3
    out = plan.to_dict()["subtasks"]
    assert "mask" not in out[1] and "mask_label" not in out[1]  # box subtasks read as before
    assert EditPlan.from_dict(plan.to_dict()) == plan


def test_label_map_on_the_command_line_marks_subtask_k_with_value_k(tmp_path, image_file, capsys):
    labels = np.zeros((40, 48), dtype=np.uint8)
    labels[4:20, 4:20] = 1
    labels[24:40, :] = 2
    path = grey_png(tmp_path / "labels.png", labels)
    code, err = gas_edit(
        capsys,
        "--image",
        image_file,
        "--request",
        REQUEST,
        "--masks",
        path,
        "--output_dir",
        tmp_path / "out",
        "--plan_only",
        "true",
    )
    assert code == 0, err
    plan = EditPlan.load(tmp_path / "out" / "plan.json")
    assert [(s.mask, s.mask_label) for s in plan.subtasks] == [(path, 1), (path, 2)]
    # boxes come from the masks: pixel columns 4..19 of 48, rows 4..19 of 40; rows 24..39
    assert plan.subtasks[0].box == pytest.approx((4 / 48, 4 / 40, 20 / 48, 20 / 40), abs=1e-6)
    assert plan.subtasks[1].box == pytest.approx((0.0, 0.6, 1.0, 1.0), abs=1e-6)
    # grounding.png tints the first mask's pixels (below its label) with its colour (230, 25, 75) at 45%
    pic = np.asarray(Image.open(tmp_path / "out" / "grounding.png").convert("RGB"), dtype=np.float64)
    source = np.asarray(Image.open(image_file).convert("RGB"), dtype=np.float64)
    np.testing.assert_allclose(pic[18, 8], np.rint(source[18, 8] * 0.55 + np.array([230, 25, 75]) * 0.45), atol=1)
    np.testing.assert_allclose(pic[22, 30], source[22, 30])  # unlabelled, outside every box


# ---------------------------------------------------------------------------------------------
# 5. the CDS region: the mask's bounding box, anchors weighted by the mask
# ---------------------------------------------------------------------------------------------
def test_patch_nce_weights_each_anchor_by_the_mask_inside_its_bounding_box():
    from gas_lightning.guidance.cds import CDSConfig, crop_at, patch_nce

    torch.manual_seed(0)
    q, k = torch.randn(5, 4, 4), torch.randn(5, 4, 4)
    region = torch.zeros(4, 4)
    region[1, 1], region[1, 2], region[2, 2] = 1.0, 0.5, 0.25  # bounding box rows 1-2, cols 1-2
    cfg = CDSConfig(patch_sizes=(1,), n_patches=256)
    rows, cols, weights = crop_at(region, (4, 4), (4, 4))
    assert (rows, cols) == (slice(1, 3), slice(1, 3))
    got = patch_nce(q, k, rows, cols, weights, cfg, torch.Generator().manual_seed(0))
    # by hand: the 4 positions of the bounding box are all drawn (256 > 4), so the order does not
    # matter; each anchor's cross-entropy -log softmax(q_i . k_j / 0.07)_i over those 4 positions,
    # averaged with the mask's weights (the zero-weight corner (2, 1) is a negative, not an anchor).
    # As the reference's PatchNCELoss: the anchors are the source patches (k), the softmax runs over
    # the edited patches (q): logits[i, j] = k_i . q_j / 0.07.
    pos = [(1, 1), (1, 2), (2, 1), (2, 2)]
    w = torch.tensor([1.0, 0.5, 0.0, 0.25])
    qf = torch.stack([q[:, r, c] for r, c in pos])
    kf = torch.stack([k[:, r, c] for r, c in pos])
    qf, kf = qf / qf.norm(dim=1, keepdim=True), kf / kf.norm(dim=1, keepdim=True)
    logits = torch.stack([torch.stack([kf[i] @ qf[j] for j in range(4)]) for i in range(4)]) / 0.07
    ce = -(logits.diag() - logits.exp().sum(dim=1).log())
    torch.testing.assert_close(got, (w * ce).sum() / w.sum())


# ---------------------------------------------------------------------------------------------
# 6. the world's exact masks
# ---------------------------------------------------------------------------------------------
def test_world_segmenter_returns_each_objects_rendered_coverage():
    from gas_lightning.grounding.segmenter import segment_plan
    from gas_lightning.worlds import held_out_cases, render_pil
    from gas_lightning.worlds.cases import example_case
    from gas_lightning.worlds.grounder import WorldGrounder

    for case in [example_case(), *held_out_cases(6, seed=9)]:
        plan = segment_plan(case.plan, render_pil(case.source), WorldGrounder())
        for s in plan.subtasks:
            if s.box == (0.0, 0.0, 1.0, 1.0):
                assert s.mask is None  # the background keeps the whole image
                continue
            i = [o.phrase for o in case.source.objects].index(s.source)
            # the renderer's own coverage, to 8-bit rounding
            np.testing.assert_allclose(read_mask(s.mask), case.source.coverage[i], atol=1.5 / 255)


def test_segmenter_world_on_the_bundled_example_writes_masks_into_plan_json(tmp_path, capsys):
    code, err = gas_edit(
        capsys,
        "--config",
        REPO / "configs" / "shapes.yaml",
        "--segmenter",
        "world",
        "--output_dir",
        tmp_path / "out",
        "--plan_only",
        "true",
    )
    assert code == 0, err
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    has_mask = [("mask" in s) for s in plan["subtasks"]]
    assert has_mask == [True, True, False, True]  # circle, square, (snow: whole image), kept triangle


# ---------------------------------------------------------------------------------------------
# 7. a mask-guided edit end to end (CDS included)
# ---------------------------------------------------------------------------------------------
def test_mask_guided_edit_runs_end_to_end(tiny_pixel, image_file, tmp_path, capsys):
    soft = np.zeros((40, 48), dtype=np.uint8)
    soft[4:20, 4:20] = 255
    soft[3, 4:20] = 128  # a soft top edge
    path = grey_png(tmp_path / "block.png", soft)
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
        "[null, [0, 0, 1, 1]]",
        "--masks",
        f"[{path}, null]",
        "--preserve_form",
        "[1, 0]",
        "--output_dir",
        tmp_path / "out",
        "--trainer.max_steps",
        "2",
    )
    assert code == 0, err
    assert (tmp_path / "out" / "edited.png").is_file()
    plan = EditPlan.load(tmp_path / "out" / "plan.json")
    assert plan.subtasks[0].mask == path and plan.subtasks[1].mask is None


def test_build_edit_takes_an_in_memory_mask(tiny_pixel):
    from gas_lightning.guidance import GuidanceConfig
    from gas_lightning.loading import load_backbone
    from gas_lightning.pipeline import build_edit

    bb = load_backbone(tiny_pixel, attention="sdpa")
    image = Image.new("RGB", (32, 32), (90, 160, 60))
    plan = EditPlan(
        "a block on grass",
        "a ball on snow",
        (
            Subtask("a block", "a ball", box=(0.25, 0.25, 0.75, 0.75), preserve_form=True),
            Subtask("grass", "snow", box=(0.0, 0.0, 1.0, 1.0)),
        ),
    )
    painted = np.zeros((64, 64), dtype=np.float32)
    painted[16:48, 16:48] = 1.0
    painted[16:18, 16:48] = 0.5  # the top two pixel rows at half weight: the top cell row averages to 0.5
    module = build_edit(bb, image, plan, GuidanceConfig(), masks=[painted, None])
    expected = torch.zeros(32, 32)
    expected[8:24, 8:24] = 1.0
    expected[8, 8:24] = 0.5
    torch.testing.assert_close(module.masks.subtasks[0], expected)
    torch.testing.assert_close(module.masks.subtasks[1], 1 - 0.7 * expected)
    assert module.terms[0].region is not None and module.terms[1].region is None
    z = module.z_src.clone()
    grad, _ = module.guidance.batched_gradient(
        z + 0.1, module.z_src, module.terms, 500, torch.randn_like(z), generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# 8. bad mask input: one GasError each, exit 2 from the CLI
# ---------------------------------------------------------------------------------------------
def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    grey_png(tmp_path / "empty.png", np.zeros((40, 48)))
    grey_png(tmp_path / "ok.png", np.full((40, 48), 255))
    grey_png(tmp_path / "labels.png", np.where(np.arange(48)[None, :] < 24, 1, 5) * np.ones((40, 1)))
    grey_png(tmp_path / "one_label.png", np.ones((40, 48)))
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (48, 40)).save(tmp_path / "colour.png")
    (tmp_path / "plan.json").write_text(
        json.dumps(
            {
                "source_prompt": "a",
                "target_prompt": "b",
                "subtasks": [
                    {"source": "the red block", "target": "a yellow block", "box": [0, 0, 1, 1], "mask_label": 2}
                ],
            }
        )
    )
    request = ["--request", REQUEST, "--boxes", "[null, [0, 0, 1, 1]]"]
    return [
        ([*request, "--masks", f"[{tmp_path / 'missing.png'}, null]"], "does not exist"),
        ([*request, "--masks", f"[{tmp_path / 'ok.png'}]"], "1 masks for 2 subtasks"),
        ([*request, "--masks", f"[{tmp_path / 'empty.png'}, null]"], "is empty"),
        ([*request, "--masks", str(tmp_path / "one_label.png")], "no pixel has the value 2"),
        ([*request, "--masks", f"[{tmp_path / 'text.png'}, null]"], "cannot be read as an image"),
        ([*request, "--masks", str(tmp_path / "labels.png")], "has the labels [5]"),
        ([*request, "--masks", str(tmp_path / "colour.png")], "must have one channel"),
        ([*request, "--masks", '["data:image/png;base64,AAAA", null]'], "does not hold a readable PNG"),
        ([*request, "--masks", f"[{tmp_path}, null]"], "is a folder"),
        (["--plan", str(tmp_path / "plan.json")], "needs a mask"),
    ]


def test_bad_mask_input_is_one_clear_error(tmp_path, image_file, capsys):
    for extra, message in _bad_cases(tmp_path):
        code, err = gas_edit(
            capsys, "--image", image_file, "--output_dir", tmp_path / "out", "--plan_only", "true", *extra
        )
        assert code == 2, (extra, err)
        assert message in err and err.count("\n") == 1, (extra, err)


def test_bad_in_memory_masks_raise_plan_errors():
    plan = EditPlan.from_lists(["a dog"], ["a cat"])
    with pytest.raises(PlanError, match="2 masks for 1 subtasks"):
        EditMasks.from_plan(plan, 4, 4, masks=[np.ones((4, 4)), None])
    with pytest.raises(PlanError, match="outside"):
        EditMasks.from_plan(plan, 4, 4, masks=[np.full((4, 4), 2.0)])
    with pytest.raises(PlanError, match="is empty"):
        attach_masks(plan, [np.zeros((4, 4), bool)])
    with pytest.raises(GasError, match="one .height, width. plane"):
        read_mask(np.ones((2, 3, 4)))
