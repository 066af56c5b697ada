"""Grounding: caption/token spans, box assignment on hand-made logits, plan filling, explicit
boxes, a tiny random GroundingDINO through the real from_pretrained path, and the
groundingdino-py backend (error paths, and its BERT fix against a stand-in package)."""

from __future__ import annotations

import logging
import math
import sys
import textwrap

import pytest
import torch
from PIL import Image

from gas_lightning.errors import GroundingError, ModelLoadError, PlanError
from gas_lightning.grounding import (
    WHOLE_IMAGE,
    ExplicitGrounder,
    GroundingDinoGrounder,
    GroundingMiss,
    apply_boxes,
    assign_boxes,
    build_caption,
    build_grounder,
    cxcywh_to_xyxy,
    draw_grounding,
    fallback_whole_image,
    gdino_py,
    ground_plan,
    parse_boxes,
)
from gas_lightning.grounding.gdino_hf import resolve_device, token_spans
from gas_lightning.plan import EditPlan

NEG = float("-inf")


# --- a tiny tokenizer / BERT / GroundingDINO --------------------------------------------------
def write_vocab(folder) -> None:
    """A 1030-token BERT vocab whose [CLS]/[SEP]/'.'/'?' sit at bert-base ids (101/102/1012/1029),
    the ids GroundingDINO uses to split the caption into phrases."""
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [f"[unused{i}]" for i in range(99, 99 + 1012 - len(words))]
    words += [".", "a", "the", "dog", "cat", "grass", "red", "car", "on", "sky", "##s"]
    words += [f"[unused{i}]" for i in range(2000, 2000 + 1029 - len(words))]
    words += ["?"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_vocab(folder)
    return BertTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def tiny_gdino(tmp_path_factory, tokenizer):
    """A random GroundingDINO with a timm-free ResNet backbone, saved with save_pretrained."""
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        ResNetConfig,
    )

    torch.manual_seed(0)
    backbone = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 8, 8, 8],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        use_timm_backbone=False,
        num_queries=10,
        encoder_layers=1,
        decoder_layers=2,
        d_model=32,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=1,
        decoder_n_points=1,
        max_text_len=32,
    )
    folder = tmp_path_factory.mktemp("gdino")
    GroundingDinoForObjectDetection(config).save_pretrained(str(folder))
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


@pytest.fixture
def image():
    img = Image.new("RGB", (80, 60), (90, 160, 60))
    img.paste((200, 40, 40), (10, 10, 40, 40))
    return img


def tokens_logits(rows: list[dict[int, float]], num_tokens: int = 12) -> torch.Tensor:
    """Logits [Q, T] whose sigmoid is the given probability at the given token positions,
    a low probability at the other real tokens, and -inf padding from position 8 on."""
    out = torch.full((len(rows), num_tokens), NEG)
    out[:, :8] = math.log(0.01 / 0.99)
    for q, row in enumerate(rows):
        for t, p in row.items():
            out[q, t] = math.log(p / (1 - p))
    return out


# caption 'a dog . the grass .': [CLS]=0 a=1 dog=2 .=3 the=4 grass=5 .=6 [SEP]=7
SPANS = [(1, 3), (4, 6)]
BOXES = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.5, 0.8, 0.9, 0.3], [0.7, 0.7, 0.1, 0.1]])


# --- caption, spans, conversion ----------------------------------------------------------------
def test_build_caption_lowercases_and_separates_with_dots():
    caption, spans = build_caption(["A Dog", "the  grass.", "st. bernard"])
    assert caption == "a dog . the grass . st bernard ."
    assert [caption[a:b] for a, b in spans] == ["a dog", "the grass", "st bernard"]
    with pytest.raises(GroundingError, match="empty"):
        build_caption(["..."])


def test_token_spans_from_offsets_and_without_offsets(tokenizer):
    caption, char_spans = build_caption(["a dog", "the red cars"])
    spans = token_spans(tokenizer, caption, char_spans)
    ids = tokenizer(caption)["input_ids"]
    assert [tokenizer.convert_ids_to_tokens(ids[a:b]) for a, b in spans] == [["a", "dog"], ["the", "red", "car", "##s"]]

    class NoOffsets:  # a "slow" tokenizer: no offsets mapping
        def __call__(self, text, return_offsets_mapping=False):
            raise NotImplementedError

        def tokenize(self, text):
            return tokenizer.tokenize(text)

    assert token_spans(NoOffsets(), caption, char_spans) == spans


def test_cxcywh_to_xyxy_converts_and_clips():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.95, 0.05, 0.3, 0.3]])
    out = cxcywh_to_xyxy(boxes)
    assert torch.allclose(out[0], torch.tensor([0.4, 0.3, 0.6, 0.7]))
    assert torch.allclose(out[1], torch.tensor([0.8, 0.0, 1.0, 0.2]))


# --- assign_boxes on hand-made logits ------------------------------------------------------------
def test_assign_boxes_picks_best_box_per_phrase_span():
    logits = tokens_logits([{2: 0.9}, {5: 0.6}, {4: 0.8, 5: 0.7}])  # query 2 beats 1 on 'the grass'
    dog, grass = assign_boxes(logits, BOXES, SPANS, 0.3, 0.25, phrases=["a dog", "the grass"])
    assert dog == pytest.approx((0.2, 0.2, 0.4, 0.4))
    assert grass == pytest.approx((0.65, 0.65, 0.75, 0.75))


def test_assign_boxes_gives_a_repeated_phrase_the_next_best_distinct_box():
    """Two dogs: the first 'a dog' takes the best box, the second the next-best one that is not a
    near copy of it (query 1 overlaps query 0 almost entirely and is skipped)."""
    boxes = torch.tensor([[0.25, 0.25, 0.3, 0.3], [0.26, 0.26, 0.3, 0.3], [0.75, 0.7, 0.3, 0.3]])  # cx, cy, w, h
    logits = tokens_logits([{2: 0.9}, {2: 0.85}, {2: 0.6}])
    spans = [(1, 3), (1, 3)]
    first, second = assign_boxes(logits, boxes, spans, 0.3, 0.25, phrases=["a dog", "a dog"])
    assert first == pytest.approx((0.1, 0.1, 0.4, 0.4))
    assert second == pytest.approx((0.6, 0.55, 0.9, 0.85))
    with pytest.raises(GroundingMiss, match="a dog"):  # a third dog has no box left
        assign_boxes(logits, boxes, [(1, 3)] * 3, 0.3, 0.25, phrases=["a dog"] * 3)
    # a different phrase on the same span may take the same box: only repeats are kept apart
    a, b = assign_boxes(logits, boxes, spans, 0.3, 0.25, phrases=["a dog", "the dog"])
    assert a == b == pytest.approx((0.1, 0.1, 0.4, 0.4))


def test_assign_boxes_ignores_scores_on_separator_and_special_tokens():
    logits = tokens_logits([{0: 0.99, 3: 0.99, 6: 0.99}, {2: 0.5, 5: 0.5}, {}])
    dog, grass = assign_boxes(logits, BOXES, SPANS, 0.3, 0.25)
    assert dog == grass == pytest.approx((0.05, 0.65, 0.95, 0.95))  # query 1, not query 0


def test_assign_boxes_text_threshold_decides_which_phrases_a_box_belongs_to():
    logits = tokens_logits([{2: 0.9, 5: 0.2}, {}, {}])  # a confident dog box, weakly 'grass'
    with pytest.raises(GroundingMiss) as err:
        assign_boxes(logits, BOXES, SPANS, 0.3, 0.25, phrases=["a dog", "the grass"])
    assert err.value.missing == ["the grass"]
    assert err.value.boxes[0] == pytest.approx((0.2, 0.2, 0.4, 0.4)) and err.value.boxes[1] is None
    boxes = assign_boxes(logits, BOXES, SPANS, 0.3, 0.1)
    assert boxes[1] == boxes[0]


def test_assign_boxes_error_names_phrase_best_score_and_options():
    logits = tokens_logits([{2: 0.9}, {5: 0.28}, {}])  # grass above text but below box threshold
    with pytest.raises(GroundingError) as err:
        assign_boxes(logits, BOXES, SPANS, 0.3, 0.25, phrases=["a dog", "the grass"])
    msg = str(err.value)
    assert "'the grass' (best score 0.28)" in msg and "a dog" not in msg
    for option in ("--box_threshold 0.3", "--text_threshold 0.25", "--boxes", "--grounding_fallback whole_image"):
        assert option in msg
    assert assign_boxes(logits, BOXES, SPANS, 0.25, 0.25)[1] == pytest.approx((0.05, 0.65, 0.95, 0.95))


def test_assign_boxes_skips_boxes_without_area_and_checks_spans():
    logits = tokens_logits([{2: 0.99}, {2: 0.5, 5: 0.5}, {}])
    boxes = BOXES.clone()
    boxes[0] = torch.tensor([1.2, 0.5, 0.2, 0.2])  # entirely right of the image
    assert assign_boxes(logits, boxes, SPANS, 0.3, 0.25)[0] == pytest.approx((0.05, 0.65, 0.95, 0.95))
    with pytest.raises(GroundingError, match="longer than the detector reads"):
        assign_boxes(logits, boxes, [(1, 3), (10, 13)], 0.3, 0.25)


# --- plans ------------------------------------------------------------------------------------
class RecordingGrounder:
    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def ground(self, image, phrases):
        self.calls.append(list(phrases))
        if isinstance(self.answer, Exception):
            raise self.answer
        return [self.answer[p] for p in phrases]


def three_subtasks(boxes=None) -> EditPlan:
    return EditPlan.from_lists(["a dog", "the grass", "a dog"], ["a cat", "snow", "a fox"], boxes=boxes)


def test_ground_plan_fills_only_missing_boxes_with_one_query(image):
    plan = three_subtasks([None, (0.0, 0.5, 1.0, 1.0), None])
    grounder = RecordingGrounder({"a dog": (0.1, 0.1, 0.3, 0.3)})
    out = ground_plan(plan, image, grounder)
    assert grounder.calls == [["a dog", "a dog"]]  # one query; the repeat asks for a second box
    assert [s.box for s in out.subtasks] == [(0.1, 0.1, 0.3, 0.3), (0.0, 0.5, 1.0, 1.0), (0.1, 0.1, 0.3, 0.3)]
    assert ground_plan(out, image, None) is out  # nothing to do: no detector needed


def test_ground_plan_miss_raises_or_falls_back_with_warning(image, caplog):
    miss = GroundingMiss(
        "no box for 'the grass'", boxes=[(0.1, 0.1, 0.3, 0.3), None, (0.1, 0.1, 0.3, 0.3)], missing=["the grass"]
    )
    with pytest.raises(GroundingError, match="the grass"):
        ground_plan(three_subtasks(), image, RecordingGrounder(miss))
    with caplog.at_level(logging.WARNING):
        out = ground_plan(three_subtasks(), image, RecordingGrounder(miss), fallback_whole_image=True)
    assert [s.box for s in out.subtasks] == [(0.1, 0.1, 0.3, 0.3), WHOLE_IMAGE, (0.1, 0.1, 0.3, 0.3)]
    assert "'the grass' was not found" in caplog.text
    with pytest.raises(GroundingError, match="--boxes"):
        ground_plan(three_subtasks(), image, None)
    assert fallback_whole_image("whole_image") and not fallback_whole_image("error")
    with pytest.raises(GroundingError, match="--grounding_fallback"):
        fallback_whole_image("skip")


def test_draw_grounding_writes_boxes_and_labels(image, tmp_path):
    plan = three_subtasks([(0.1, 0.1, 0.5, 0.6), None, (0.5, 0.5, 0.9, 0.9)])
    path = draw_grounding(image, plan, tmp_path / "out" / "grounding.png")
    drawn = Image.open(path).convert("RGB")
    assert drawn.size == image.size
    assert drawn.getpixel((round(0.9 * 79), round(0.7 * 59))) != image.getpixel((round(0.9 * 79), round(0.7 * 59)))


# --- explicit boxes -------------------------------------------------------------------------
def test_parse_boxes_accepts_lists_flat_box_and_null():
    assert parse_boxes("[[0.1, 0.2, 0.5, 0.6], null]", count=2) == [(0.1, 0.2, 0.5, 0.6), None]
    assert parse_boxes("[0, 0, 1, 1]") == [(0.0, 0.0, 1.0, 1.0)]
    assert parse_boxes([[0, 0, 0.5, 0.5]]) == [(0.0, 0.0, 0.5, 0.5)]
    plan = apply_boxes(three_subtasks(), parse_boxes("[[0, 0, 0.5, 0.5], null, [0.5, 0.5, 1, 1]]"))
    assert [s.box for s in plan.subtasks] == [(0.0, 0.0, 0.5, 0.5), None, (0.5, 0.5, 1.0, 1.0)]
    assert ExplicitGrounder([[0, 0, 1, 1]]).ground(Image.new("RGB", (4, 4)), ["x"]) == [(0.0, 0.0, 1.0, 1.0)]


@pytest.mark.parametrize(
    "text, match",
    [
        ("[[0.1, 0.2, 0.5]]", "4 numbers"),
        ("[[10, 20, 50, 60]]", "normalised"),
        ("[[0.5, 0.2, 0.1, 0.6]]", "x0 < x1"),
        ("[[0.1, 0.2, 0.5, 0.6]", "not valid JSON"),
        ("__import__('os').system('echo hi')", "not valid JSON"),
        ("[[true, 0, 1, 1]]", "4 numbers or null"),
        ("[]", "non-empty"),
        ('{"a": 1}', "non-empty list"),
    ],
)
def test_parse_boxes_rejects_bad_input_clearly(text, match):
    with pytest.raises(PlanError, match=match):
        parse_boxes(text)


def test_parse_boxes_checks_count():
    with pytest.raises(PlanError, match="2 boxes for 3 subtasks"):
        parse_boxes("[[0, 0, 1, 1], [0, 0, 1, 1]]", count=3)


# --- the tiny GroundingDINO through from_pretrained ------------------------------------------------
def test_tiny_groundingdino_detects_one_box_per_phrase(tiny_gdino, image):
    grounder = GroundingDinoGrounder(str(tiny_gdino), box_threshold=0.0, text_threshold=0.0)
    assert "cpu" in repr(grounder)
    boxes = grounder.ground(image, ["a dog", "The red cars"])
    assert len(boxes) == 2
    for box in boxes:
        assert isinstance(box, tuple) and len(box) == 4 and all(isinstance(v, float) for v in box)
        assert 0.0 <= box[0] < box[2] <= 1.0 and 0.0 <= box[1] < box[3] <= 1.0
    plan = ground_plan(EditPlan.from_lists(["a dog", "the red cars"], ["a cat", "a bus"]), image, grounder)
    assert plan.grounded


def test_tiny_groundingdino_below_threshold_is_a_clear_error(tiny_gdino, image):
    grounder = build_grounder("transformers", str(tiny_gdino))
    grounder.box_threshold = 1.0  # no probability exceeds 1: a guaranteed miss, whatever the weights
    with pytest.raises(GroundingMiss) as err:
        grounder.ground(image, ["a dog"])
    assert "'a dog' (best score" in str(err.value) and err.value.missing == ["a dog"]
    with pytest.raises(GroundingMiss):
        ground_plan(EditPlan.from_lists(["a dog"], ["a cat"]), image, grounder)
    plan = ground_plan(EditPlan.from_lists(["a dog"], ["a cat"]), image, grounder, fallback_whole_image=True)
    assert plan.subtasks[0].box == WHOLE_IMAGE


def test_detector_load_errors_name_the_local_path_option(tmp_path, tokenizer):
    with pytest.raises(ModelLoadError, match="--detector /local/path"):
        GroundingDinoGrounder(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="--detector /local/path"):
        GroundingDinoGrounder("nobody-here/no-such-detector", local_files_only=True)
    tokenizer.save_pretrained(str(tmp_path / "only_tokenizer"))
    with pytest.raises(ModelLoadError, match="could not load"):
        GroundingDinoGrounder(str(tmp_path / "only_tokenizer"))
    with pytest.raises(GroundingError, match="--box_threshold"):
        GroundingDinoGrounder(str(tmp_path), box_threshold=1.5)
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_build_grounder_rejects_unknown_backend_and_missing_files():
    with pytest.raises(GroundingError, match="--detector_backend"):
        build_grounder("yolo")
    with pytest.raises(GroundingError, match="--detector_config"):
        build_grounder("groundingdino-py")
    with pytest.raises(ModelLoadError, match="--detector_checkpoint"):
        gdino_py.GroundingDinoPyGrounder(config=None, checkpoint="x.pth")


# --- groundingdino-py backend ----------------------------------------------------------------
GD_CONFIG = 'modelname = "groundingdino"\nnum_queries = 5\nmax_text_len = 32\ntext_encoder_type = "{bert}"\n'


def test_groundingdino_py_missing_package_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "groundingdino", None)  # import fails like an absent package
    with pytest.raises(ModelLoadError) as err:
        gdino_py.import_groundingdino()
    msg = str(err.value)
    assert "not installed" in msg and "pip install 'groundingdino-py==0.4.0'" in msg
    assert "--detector_backend transformers" in msg

    def missing_dep(name):
        raise ModuleNotFoundError("No module named 'cv2'", name="cv2")

    monkeypatch.setattr(gdino_py.importlib, "import_module", missing_dep)
    with pytest.raises(ModelLoadError, match="dependency 'cv2' is missing"):
        gdino_py.import_groundingdino()


def test_groundingdino_py_config_is_read_not_executed(tmp_path):
    good = tmp_path / "cfg.py"
    good.write_text(
        '"""doc"""\nmodelname = "groundingdino"\nreturn_interm_indices = [1, 2, 3]\nbackbone_freeze_keywords = None\n'
    )
    assert gdino_py.read_config(good)["return_interm_indices"] == [1, 2, 3]
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.py"
    evil.write_text(f"modelname = 'groundingdino'\nx = __import__('os').system('touch {marker}')\n")
    with pytest.raises(ModelLoadError, match="line 2 is not a plain"):
        gdino_py.read_config(evil)
    assert not marker.exists()
    with pytest.raises(ModelLoadError, match="--detector_config"):
        gdino_py.read_config(tmp_path / "nope.py")


def test_groundingdino_py_checkpoint_is_tensors_only(tmp_path):
    import pickle

    with pytest.raises(ModelLoadError, match="--detector_checkpoint"):
        gdino_py.read_state_dict(tmp_path / "nope.pth")
    torch.save({"model": {"module.w": torch.ones(2)}}, tmp_path / "ok.pth")
    assert list(gdino_py.read_state_dict(tmp_path / "ok.pth")) == ["w"]
    (tmp_path / "bad.pth").write_bytes(pickle.dumps({"model": {"w": logging.getLogger}}, protocol=2))
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        gdino_py.read_state_dict(tmp_path / "bad.pth")


def tiny_bert(folder):
    from transformers import BertConfig, BertModel, BertTokenizer

    write_vocab(folder)
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1030, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(str(folder))
    return BertModel.from_pretrained(str(folder)).eval()


def test_bert_compat_applies_the_phrase_block_mask(tmp_path):
    """Tokens must only see their own phrase: the wrapper's output for a block equals
    running that block alone (with the same position and type ids)."""
    bert = tiny_bert(tmp_path / "bert")
    wrapper = gdino_py.BertCompat(bert)
    assert {k.split(".")[0] for k in wrapper.state_dict()} == {"embeddings", "encoder", "pooler"}
    ids = torch.tensor([[101, 1013, 1015, 1012, 1014, 1017, 1012, 102]])
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    blocks = [(0, 1), (1, 4), (4, 7), (7, 8)]
    for a, b in blocks:
        mask[0, a:b, a:b] = True
    pos = torch.tensor([[0, 0, 1, 2, 0, 1, 2, 0]])
    with torch.no_grad():
        out = wrapper(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), position_ids=pos)
        for a, b in blocks:
            alone = bert(input_ids=ids[:, a:b], position_ids=pos[:, a:b], token_type_ids=torch.zeros_like(ids[:, a:b]))
            assert torch.allclose(out["last_hidden_state"][:, a:b], alone.last_hidden_state, atol=1e-5)


STAND_IN = '''
"""A stand-in for groundingdino-py 0.4.0: its BERT wrapper copies BertModel helpers
(get_head_mask, ...) that transformers 5 removed; the model calls bert with a 3D mask."""
import torch
from torch import nn
from transformers import AutoTokenizer, BertModel


class BertModelWarper(nn.Module):
    def __init__(self, bert_model):
        super().__init__()
        self.embeddings, self.encoder, self.pooler = bert_model.embeddings, bert_model.encoder, bert_model.pooler
        self.get_extended_attention_mask = bert_model.get_extended_attention_mask
        self.invert_attention_mask = bert_model.invert_attention_mask
        self.get_head_mask = bert_model.get_head_mask


class Stand(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.tokenizer = AutoTokenizer.from_pretrained(args.text_encoder_type)
        self.bert = BertModelWarper(bert_model=BertModel.from_pretrained(args.text_encoder_type))
        self.queries = nn.Parameter(torch.randn(args.num_queries, 16))
        self.boxes = nn.Linear(16 + 3, 4)
        self.max_text_len = args.max_text_len

    def forward(self, images, captions):
        tok = self.tokenizer(captions, return_tensors="pt")
        n = tok["input_ids"].shape[1]
        text = self.bert(input_ids=tok["input_ids"], token_type_ids=tok["token_type_ids"],
                         attention_mask=torch.ones(1, n, n, dtype=torch.bool),
                         position_ids=torch.arange(n)[None])["last_hidden_state"]
        logits = torch.full((1, len(self.queries), self.max_text_len), float("-inf"))
        logits[0, :, :n] = self.queries @ text[0].T
        feats = torch.cat([self.queries, images.mean(dim=(2, 3)).expand(len(self.queries), 3)], dim=1)
        return {"pred_logits": logits, "pred_boxes": self.boxes(feats).sigmoid()[None]}
'''


@pytest.fixture
def stand_in_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "groundingdino"
    (pkg / "models" / "GroundingDINO").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text(
        "def build_model(args):\n    from .GroundingDINO.groundingdino import Stand\n    return Stand(args)\n"
    )
    (pkg / "models" / "GroundingDINO" / "__init__.py").write_text("")
    (pkg / "models" / "GroundingDINO" / "groundingdino.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m.split(".")[0] == "groundingdino"]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m.split(".")[0] == "groundingdino"]:
        del sys.modules[name]


def test_groundingdino_py_backend_builds_and_detects_through_the_bert_fix(
    stand_in_package, tmp_path, image, monkeypatch
):
    tiny_bert(tmp_path / "bert")
    cfg = tmp_path / "tiny_cfg.py"
    cfg.write_text(GD_CONFIG.format(bert=tmp_path / "bert"))
    config = gdino_py.read_config(cfg)
    torch.save({"model": gdino_py.build_model(config, torch.device("cpu")).state_dict()}, tmp_path / "tiny.pth")
    grounder = build_grounder(
        "groundingdino-py", config=cfg, checkpoint=tmp_path / "tiny.pth", box_threshold=0.0, text_threshold=0.0
    )
    boxes = grounder.ground(image, ["a dog", "the grass"])
    assert len(boxes) == 2 and all(0.0 <= b[0] < b[2] <= 1.0 and 0.0 <= b[1] < b[3] <= 1.0 for b in boxes)
    if gdino_py.bert_compat_needed():  # transformers >= 5: without the fix the build fails, clearly
        monkeypatch.setattr(gdino_py, "bert_compat_needed", lambda: False)
        with pytest.raises(ModelLoadError, match="transformers<5"):
            gdino_py.build_model(config, torch.device("cpu"))


def test_groundingdino_py_wrong_checkpoint_and_offline_text_encoder(stand_in_package, tmp_path):
    tiny_bert(tmp_path / "bert")
    cfg = tmp_path / "tiny_cfg.py"
    cfg.write_text(GD_CONFIG.format(bert=tmp_path / "bert"))
    torch.save({"model": {"something.else": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match="does not fit"):
        build_grounder("groundingdino-py", config=cfg, checkpoint=tmp_path / "other.pth")
    with pytest.raises(ModelLoadError, match="text encoder"):
        gdino_py.build_model(gdino_py.read_config(cfg), torch.device("cpu"), text_encoder=str(tmp_path / "no_bert"))
