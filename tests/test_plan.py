"""EditPlan / Subtask: validation messages and the JSON round trip."""

import json
import math

import pytest

from gas_lightning.errors import GasError, PlanError
from gas_lightning.plan import MAX_SUBTASKS, EditPlan, Subtask, check_box, join_phrases


def test_plan_error_is_user_facing_value_error():
    assert issubclass(PlanError, GasError) and issubclass(PlanError, ValueError)


def test_phrases_are_whitespace_normalised():
    s = Subtask("  a   brown\n dog ", "a cat")
    assert s.source == "a brown dog"


@pytest.mark.parametrize("source,target", [("", "a cat"), ("   ", "a cat"), ("a dog", ""), ("a dog", " \n ")])
def test_empty_phrases_rejected(source, target):
    with pytest.raises(PlanError, match="is empty"):
        Subtask(source, target)


def test_non_string_and_overlong_phrases_rejected():
    with pytest.raises(PlanError, match="must be a string"):
        Subtask(3, "a cat")
    with pytest.raises(PlanError, match="characters long"):
        Subtask("a " * 200 + "dog", "a cat")


def test_empty_whole_scene_sentence_rejected():
    with pytest.raises(PlanError, match="whole-scene source sentence is empty"):
        EditPlan("", "a cat")


@pytest.mark.parametrize(
    "box,match",
    [
        ([0.1, 0.2, 1.5, 0.9], "outside \\[0, 1\\]"),
        ([-0.1, 0.2, 0.5, 0.9], "outside \\[0, 1\\]"),
        ([10, 20, 200, 300], "divide pixel coordinates"),
        ([0.1, 0.2, float("nan"), 0.9], "outside \\[0, 1\\]"),
        ([0.5, 0.2, 0.5, 0.9], "x0 < x1"),
        ([0.6, 0.2, 0.5, 0.9], "x0 < x1"),
        ([0.1, 0.9, 0.5, 0.2], "y0 < y1"),
        ([0.1, 0.2, 0.5], "4 numbers"),
        ("0.1 0.2 0.5 0.9", "4 numbers"),
        ([0.1, "a", 0.5, 0.9], "4 numbers"),
    ],
)
def test_bad_boxes_rejected(box, match):
    with pytest.raises(PlanError, match=match):
        Subtask("a dog", "a cat", box=box)


def test_box_becomes_float_tuple_and_area():
    s = Subtask("a dog", "a cat", box=[0, 0, 0.5, 0.5])
    assert s.box == (0.0, 0.0, 0.5, 0.5)
    assert math.isclose(s.area, 0.25)
    assert Subtask("a dog", "a cat").area == 1.0
    assert check_box((0.1, 0.2, 0.3, 0.4)) == (0.1, 0.2, 0.3, 0.4)


def test_flags_and_intensity_validated():
    assert Subtask("a", "b", preserve_form=1).preserve_form is True
    assert Subtask("a", "b", intensity="2").intensity == 2.0
    with pytest.raises(PlanError, match="preserve_form"):
        Subtask("a", "b", preserve_form="yes")
    with pytest.raises(PlanError, match="intensity .* must be in \\[0, 10\\]"):
        Subtask("a", "b", intensity=11)
    with pytest.raises(PlanError, match="intensity .* must be a number"):
        Subtask("a", "b", intensity="strong")
    with pytest.raises(PlanError, match="penalty"):
        Subtask("a", "b", penalty="on")


def test_from_lists_derives_whole_scene_sentences():
    plan = EditPlan.from_lists(["a dog", "a cup", "the sky"], ["a cat", "a bowl", "a sunset"])
    assert plan.source_prompt == "a dog, a cup and the sky"
    assert plan.target_prompt == "a cat, a bowl and a sunset"
    assert [s.source for s in plan.subtasks] == ["a dog", "a cup", "the sky"]
    assert not plan.grounded


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(targets=["a cat"]), "targets"),
        (dict(boxes=[[0, 0, 1, 1]]), "boxes"),
        (dict(preserve_form=[True, False, True]), "preserve_form"),
        (dict(intensities=[1.0]), "intensities"),
    ],
)
def test_from_lists_mismatched_lengths(kwargs, name):
    args = {"sources": ["a dog", "a cup"], "targets": ["a cat", "a bowl"], **kwargs}
    with pytest.raises(PlanError, match=f"{name} for 2 source phrases"):
        EditPlan.from_lists(**args)


def test_with_boxes_count_must_match():
    plan = EditPlan.from_lists(["a dog", "a cup"], ["a cat", "a bowl"])
    with pytest.raises(PlanError, match="1 boxes for 2 subtasks"):
        plan.with_boxes([[0, 0, 1, 1]])
    grounded = plan.with_boxes([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    assert grounded.grounded and grounded.subtasks[1].box == (0.5, 0.5, 1.0, 1.0)
    assert not plan.grounded  # the original is unchanged (frozen)


def test_too_many_subtasks():
    n = MAX_SUBTASKS + 1
    with pytest.raises(PlanError, match=f"{n} subtasks"):
        EditPlan.from_lists([f"object {i}" for i in range(n)], [f"thing {i}" for i in range(n)])


def test_subtasks_must_be_subtask_objects():
    with pytest.raises(PlanError, match="Subtask objects"):
        EditPlan("a", "b", subtasks=({"source": "a", "target": "b"},))


@pytest.mark.parametrize(
    "data,match",
    [
        ({"source_prompt": "a", "target_prompt": "b", "subtask": []}, "unknown plan keys \\['subtask'\\]"),
        ({"subtasks": [{"source": "a", "target": "b", "colour": 1}]}, "unknown keys \\['colour'\\]"),
        ({"subtasks": [{"source": "a"}]}, "needs both 'source' and 'target'"),
        ({"subtasks": {"source": "a", "target": "b"}}, "must be a list"),
        ({"subtasks": ["a -> b"]}, "subtask 0 must be an object"),
        ([{"source": "a", "target": "b"}], "must be a JSON object"),
        ({"subtasks": [{"source": "a", "target": "b", "box": [0, 0, 2, 1]}]}, "outside"),
    ],
)
def test_from_dict_rejects_malformed(data, match):
    with pytest.raises(PlanError, match=match):
        EditPlan.from_dict(data)


def test_from_dict_derives_missing_prompts():
    plan = EditPlan.from_dict(
        {"subtasks": [{"source": "a dog", "target": "a cat"}, {"source": "a cup", "target": "a bowl"}]}
    )
    assert (plan.source_prompt, plan.target_prompt) == ("a dog and a cup", "a cat and a bowl")


def test_dict_and_file_round_trip(tmp_path):
    plan = EditPlan(
        "a dog and a cup on a table",
        "a cat and a bowl on a table",
        (
            Subtask("a dog", "a cat", box=(0.1, 0.2, 0.5, 0.6), preserve_form=True, intensity=0.5, penalty=False),
            Subtask("a cup", "a bowl"),
        ),
    )
    assert EditPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["subtasks"][0]["box"] == [0.1, 0.2, 0.5, 0.6]
    assert data["subtasks"][1]["box"] is None
    assert EditPlan.load(path) == plan


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        EditPlan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        EditPlan.load(bad)


def test_join_phrases():
    assert join_phrases([]) == ""
    assert join_phrases(["a"]) == "a"
    assert join_phrases(["a", "b"]) == "a and b"
    assert join_phrases(["a", "", "b", "c"]) == "a, b and c"


def test_with_keep_appends_identity_subtasks_without_penalty():
    plan = EditPlan.from_lists(["a dog"], ["a cat"], boxes=[[0, 0, 0.5, 0.5]])
    kept = plan.with_keep(["a red ball"], [[0.6, 0.6, 0.9, 0.9]])
    assert [s.keep for s in kept.subtasks] == [False, True]
    assert kept.subtasks[1].target == "a red ball" and kept.subtasks[1].penalty is False
    assert kept.subtasks[1].box == (0.6, 0.6, 0.9, 0.9) and kept.source_prompt == plan.source_prompt
    assert plan.with_keep(["a ball"]).subtasks[1].box is None  # left to the detector
    with pytest.raises(PlanError, match="1 boxes for 2 keep phrases"):
        plan.with_keep(["a", "b"], [[0, 0, 1, 1]])
    with pytest.raises(PlanError, match="list of phrases"):
        plan.with_keep("a ball")
    assert Subtask("The Ball", "the ball").keep and not Subtask("a ball", "a red ball").keep
