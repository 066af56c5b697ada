"""Model-free planners: structured requests and the two-sentence noun-phrase diff."""

import pytest

from gas_lightning.errors import GasError, PlannerError
from gas_lightning.plan import EditPlan
from gas_lightning.planners import diff_sentences, is_structured_request, parse_request, split_sentences


def pairs(plan: EditPlan) -> list[tuple[str, str]]:
    return [(s.source, s.target) for s in plan.subtasks]


# ---------------------------------------------------------------- parse_request


def test_request_two_sentences():
    plan = parse_request("change the dog into a cat. change the red cup into a blue bowl.")
    assert pairs(plan) == [("the dog", "a cat"), ("the red cup", "a blue bowl")]
    assert plan.source_prompt == "the dog and the red cup"
    assert plan.target_prompt == "a cat and a blue bowl"
    assert all(s.box is None and s.intensity == 1.0 and not s.preserve_form for s in plan.subtasks)


def test_request_all_forms_separators_and_case():
    text = "Change the dog to a cat; REPLACE the cup with a bowl\nturn the sky into a sunset.\n\nchange the car INTO a truck"
    assert pairs(parse_request(text)) == [
        ("the dog", "a cat"),
        ("the cup", "a bowl"),
        ("the sky", "a sunset"),
        ("the car", "a truck"),
    ]
    assert parse_request(text).source_prompt == "the dog, the cup, the sky and the car"


def test_request_quotes_and_whitespace_stripped():
    assert pairs(parse_request('  "change  the dog into a cat."  ')) == [("the dog", "a cat")]
    assert pairs(parse_request("\u201cchange \"the dog\" into 'a cat'\u201d")) == [("the dog", "a cat")]


def test_request_phrase_boundaries():
    # "next to" stays in the phrase; the first "into"/"with" ends the source phrase
    assert pairs(parse_request("change the cup next to the plate to a bowl")) == [
        ("the cup next to the plate", "a bowl")
    ]
    assert pairs(parse_request("change the dog into a cat with a hat")) == [("the dog", "a cat with a hat")]
    assert pairs(parse_request("please change a 1.5 m vase into a lamp.")) == [("a 1.5 m vase", "a lamp")]


@pytest.mark.parametrize("text", ["", "   ", "...", ";\n;", '""'])
def test_request_empty(text):
    with pytest.raises(PlannerError, match="the edit request is empty"):
        parse_request(text)
    assert not is_structured_request(text)


def test_request_non_string():
    with pytest.raises(PlannerError, match="must be text"):
        parse_request(None)
    assert not is_structured_request(None)


@pytest.mark.parametrize("bad", ["make it sunny", "change the dog", "change into a cat", "replace the cup by a bowl"])
def test_request_unmatched_sentence_quoted_with_forms(bad):
    with pytest.raises(PlannerError) as info:
        parse_request(f"change the dog into a cat. {bad}.")
    msg = str(info.value)
    assert f'"{bad}"' in msg
    assert '"change A into B"' in msg and '"replace A with B"' in msg and '"turn A into B"' in msg
    assert "change the dog into a cat." in msg
    assert isinstance(info.value, GasError)


def test_request_same_source_and_target():
    with pytest.raises(PlannerError, match="into itself"):
        parse_request("change the dog into The Dog")


def test_is_structured_request():
    assert is_structured_request("change the dog into a cat. replace the cup with a bowl")
    assert not is_structured_request("change the dog into a cat. and make the sky dramatic")
    assert not is_structured_request("a cat on a sofa")


def test_split_sentences():
    assert split_sentences('"a. b;c\n\n d 1.5 e."') == ["a", "b", "c", "d 1.5 e"]


def test_request_too_many_subtasks_is_user_error():
    text = ". ".join(f"change object {i} into thing {i}" for i in range(17))
    with pytest.raises(GasError, match="17 subtasks"):
        parse_request(text)


# ---------------------------------------------------------------- diff_sentences

# (source sentence, target sentence, expected subtasks); also the README example table.
EXAMPLES = [
    (
        "a green apple and a red cup on a table",
        "a yellow apple and a red bowl on a table",
        [("a green apple", "a yellow apple"), ("a red cup", "a red bowl")],
    ),
    ("a dog on a sofa", "a cat on a sofa", [("a dog", "a cat")]),
    ("a brown dog on a sofa", "a black cat on a sofa", [("a brown dog", "a black cat")]),
    ("a house", "a stone house", [("a house", "a stone house")]),
    ("a stone house", "a house", [("a stone house", "a house")]),
    ("a cat on the grass", "a cat on the snow", [("the grass", "the snow")]),
    (
        "a man holding an umbrella",
        "a woman holding a red umbrella",
        [("a man", "a woman"), ("an umbrella", "a red umbrella")],
    ),
    (
        "a red cup and a blue plate",
        "a blue cup and a red plate",
        [("a red cup", "a blue cup"), ("a blue plate", "a red plate")],
    ),
    ("a red car next to a tree", "a blue car next to a tree", [("a red car", "a blue car")]),
    ("a cat in front of a house", "a cat in front of a castle", [("a house", "a castle")]),
    (
        "the sky is blue and the grass is green",
        "the sky is grey and the grass is green",
        [("the sky is blue", "the sky is grey")],
    ),
    ("a dog chases a ball in the park", "a wolf chases a ball in the park", [("a dog", "a wolf")]),
    ("a sleeping cat on a sofa", "a sleeping dog on a sofa", [("a sleeping cat", "a sleeping dog")]),
    ("a cat sleeping on a sofa", "a cat sleeping on a bed", [("a sofa", "a bed")]),
    ("two apples on a plate", "three oranges on a plate", [("two apples", "three oranges")]),
    ("the dog's red collar", "the dog's blue collar", [("the dog's red collar", "the dog's blue collar")]),
    (
        "a man wearing a hat, a dog and a car",
        "a woman wearing a hat, a dog and a red car",
        [("a man", "a woman"), ("a car", "a red car")],
    ),
    ("a dog and a cat", "a lion", [("a dog and a cat", "a lion")]),
    ("A Dog.", "a cat", [("A Dog", "a cat")]),
]


@pytest.mark.parametrize("source,target,expected", EXAMPLES, ids=[e[0] + " -> " + e[1] for e in EXAMPLES])
def test_diff_examples(source, target, expected):
    plan = diff_sentences(source, target)
    assert pairs(plan) == expected
    assert (plan.source_prompt, plan.target_prompt) == (source, target)


def test_diff_prompts_are_normalised_inputs():
    plan = diff_sentences('  "a  green apple\n on a table" ', "a red apple on a table")
    assert plan.source_prompt == "a green apple on a table"
    assert pairs(plan) == [("a green apple", "a red apple")]


def test_diff_deduplicates_repeated_pairs():
    plan = diff_sentences("a red cup and a red cup", "a blue cup and a blue cup")
    assert pairs(plan) == [("a red cup", "a blue cup")]


@pytest.mark.parametrize("target", ["a dog on a sofa", "A dog on a sofa.", "a  dog on a sofa"])
def test_diff_identical(target):
    with pytest.raises(PlannerError, match="^the sentences are identical; nothing to edit"):
        diff_sentences("a dog on a sofa", target)


def test_diff_addition_needs_explicit_plan():
    with pytest.raises(PlannerError, match="'a ball' in the target sentence has no counterpart.*explicit plan.*box"):
        diff_sentences("a dog", "a dog and a ball")
    with pytest.raises(PlannerError, match="'a ball' in the target"):
        diff_sentences("a dog", "a big dog and a ball")


def test_diff_removal_needs_explicit_plan():
    with pytest.raises(PlannerError, match="'a ball' in the source sentence has no counterpart.*explicit plan"):
        diff_sentences("a dog and a ball", "a dog")


def test_diff_only_relation_changed():
    with pytest.raises(PlannerError, match="differ only in words outside noun phrases \\('on' -> 'under'\\)"):
        diff_sentences("a cup on a table", "a cup under a table")


@pytest.mark.parametrize("source,target", [("", "a cat"), ("a dog", "  "), (None, "a cat")])
def test_diff_empty_sentence(source, target):
    with pytest.raises(PlannerError, match="sentence is empty"):
        diff_sentences(source, target)


def test_diff_plan_round_trips(tmp_path):
    plan = diff_sentences(*EXAMPLES[0][:2])
    plan.save(tmp_path / "plan.json")
    assert EditPlan.load(tmp_path / "plan.json") == plan


def test_request_keep_sentences_become_keep_subtasks():
    plan = parse_request("change the dog into a cat. keep the red ball. leave the tree unchanged.")
    pairs = [(s.source, s.target, s.keep, s.penalty) for s in plan.subtasks]
    assert pairs == [
        ("the dog", "a cat", False, None),
        ("the red ball", "the red ball", True, False),
        ("the tree", "the tree", True, False),
    ]
    assert plan.source_prompt == "the dog, the red ball and the tree"
    assert plan.target_prompt == "a cat, the red ball and the tree"
    assert is_structured_request("change the dog into a cat. keep the ball.")


def test_request_with_only_keep_sentences_is_rejected():
    with pytest.raises(PlannerError, match="only keeps"):
        parse_request("keep the dog. leave the tree as it is.")
