"""Boxes to grid cells; the overlap rule with hand-written expected masks is in tests/test_fidelity_units.py."""

import torch

from gas_lightning.masks import EditMasks, box_cover, box_to_grid, scale_cells, subtask_masks, union_mask
from gas_lightning.plan import EditPlan


def test_box_to_grid_rounds_both_edges_as_the_reference():
    m = box_to_grid((0.1, 0.0, 0.5, 0.25), 8, 8)
    assert m.shape == (8, 8)
    # the reference's round(x * 8): x 0.8 -> 1, 4.0 -> 4 (cols 1..3); y 0 -> 0, 2 -> 2 (rows 0..1)
    assert m[:2, 1:4].sum() == 6 and m.sum() == 6
    # Python's round goes to the even neighbour at .5: 2.5 -> 2, 4.5 -> 4
    half = box_to_grid((0.3125, 0.3125, 0.5625, 0.5625), 8, 8)
    assert half[2:4, 2:4].sum() == 4 and half.sum() == 4


def test_box_cover_keeps_partly_touched_cells():
    m = box_cover((0.1, 0.0, 0.5, 0.25), 8, 8)
    # x: 0.8 .. 4.0 -> cols 0..3 ; y: 0 .. 2 -> rows 0..1
    assert m[:2, :4].sum() == 8 and m.sum() == 8


def test_cds_crop_cells_at_coarser_maps_as_the_reference():
    # the reference: bbox on the 64 grid, round(b / 2) at 32, round(b / 4) at 16, an empty side + 1
    assert scale_cells((19, 45, 5, 6), 1) == (19, 45, 5, 6)
    assert scale_cells((19, 45, 5, 6), 2) == (10, 22, 2, 3)  # 9.5 -> 10, 22.5 -> 22, 2.5 -> 2, 3 -> 3
    assert scale_cells((19, 45, 5, 6), 4) == (5, 11, 1, 2)  # 4.75, 11.25, 1.25 -> 1, 1.5 -> 2
    assert scale_cells((20, 21, 9, 10), 4) == (5, 6, 2, 3)  # 5, 5.25 -> 5 then widened; 2.25, 2.5 -> 2 widened


def test_tiny_box_keeps_one_cell():
    m = box_to_grid((0.5, 0.5, 0.501, 0.501), 4, 4)
    assert m.sum() == 1


def test_disjoint_and_identical_boxes_are_untouched():
    a, b = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)
    m = subtask_masks([a, b], 4, 4)
    assert set(m.unique().tolist()) == {0.0, 1.0}
    same = subtask_masks([a, a], 4, 4)  # equal shares: neither owns the other
    assert set(same.unique().tolist()) == {0.0, 1.0}


def test_union_and_empty_plan():
    m = subtask_masks([(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)], 4, 4)
    u = union_mask(m, 4, 4)
    assert u.sum() == 8 and set(u.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(union_mask(torch.zeros(0, 4, 4), 4, 4), torch.ones(4, 4))


def test_edit_masks_from_plan_missing_box_is_whole_image():
    plan = EditPlan.from_lists(["a dog"], ["a cat"])
    masks = EditMasks.from_plan(plan, 3, 5)
    assert masks.subtasks.shape == (1, 3, 5) and masks.subtasks.sum() == 15
