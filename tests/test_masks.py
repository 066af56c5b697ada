"""Boxes to grid cells; the overlap rule with hand-written expected masks is in tests/test_fidelity_units.py."""

import torch

from gas_lightning.masks import EditMasks, box_to_grid, subtask_masks, union_mask
from gas_lightning.plan import EditPlan


def test_box_to_grid_covers_partly_touched_cells():
    m = box_to_grid((0.1, 0.0, 0.5, 0.25), 8, 8)
    assert m.shape == (8, 8)
    # x: 0.8 .. 4.0 -> cols 0..3 ; y: 0 .. 2 -> rows 0..1
    assert m[:2, :4].sum() == 8 and m.sum() == 8


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
