"""GroundingDINO through transformers: the default detector.

All source phrases go into one caption ("a dog . the grass ."), as GroundingDINO was trained,
and each phrase gets the box that scores best on that phrase's own tokens. The token-level
part (`assign_boxes`) is a pure function on tensors so that it can be checked by hand.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from gas_lightning.errors import GroundingError, ModelLoadError
from gas_lightning.grounding.base import FALLBACK_HINT, GroundingMiss
from gas_lightning.plan import Box

log = logging.getLogger(__name__)

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
BOX_THRESHOLD = 0.3
TEXT_THRESHOLD = 0.25
DUPLICATE_IOU = 0.5  # a repeated phrase's next box must overlap its earlier boxes less than this
Span = tuple[int, int]  # half-open [start, end) token (or character) positions


# --- caption and token spans ---------------------------------------------------------------
def caption_and_spans(tokenizer: Any, phrases: Sequence[str]) -> tuple[str, list[Span]]:
    """One caption of the distinct phrases, and each phrase's token span (repeats share theirs)."""
    distinct = list(dict.fromkeys(phrases))
    caption, char_spans = build_caption(distinct)
    spans = token_spans(tokenizer, caption, char_spans)
    return caption, [spans[distinct.index(p)] for p in phrases]


def build_caption(phrases: Sequence[str]) -> tuple[str, list[Span]]:
    """'A dog', 'the grass' -> ('a dog . the grass .', character spans of each phrase).

    Lower case and ' . ' separators are the GroundingDINO convention; a '.' inside a phrase
    would split it, so it becomes a space.
    """
    if not phrases:
        raise GroundingError("nothing to ground: the list of phrases is empty.")
    caption, spans = "", []
    for p in phrases:
        text = " ".join(str(p).lower().replace(".", " ").split())
        if not text:
            raise GroundingError(f"the phrase {p!r} is empty once dots are removed; give words to look for.")
        spans.append((len(caption), len(caption) + len(text)))
        caption += text + " . "
    return caption.rstrip(), spans


def token_spans(tokenizer: Any, caption: str, char_spans: Sequence[Span]) -> list[Span]:
    """Map each phrase's character span to its token span in `tokenizer(caption)`.

    Uses the tokenizer's offsets; a tokenizer without offsets falls back to counting the
    tokens of the caption prefix (exact for BERT-style word-level pre-tokenisation).
    """
    try:
        offsets = tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    spans = []
    for cs, ce in char_spans:
        if offsets is not None:
            idx = [t for t, (a, b) in enumerate(offsets) if b > a and a < ce and b > cs]
            if not idx:
                raise GroundingError(f"the tokenizer produced no tokens for {caption[cs:ce]!r}.")
            spans.append((idx[0], idx[-1] + 1))
        else:
            start = 1 + len(tokenizer.tokenize(caption[:cs]))  # 1 = [CLS]
            spans.append((start, 1 + len(tokenizer.tokenize(caption[:ce]))))
    return spans


# --- boxes ---------------------------------------------------------------------------------
def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Normalised (cx, cy, w, h) -> normalised (x0, y0, x1, y1), clipped to [0, 1]."""
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    return xyxy.clamp(0.0, 1.0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, 4] x [M, 4] xyxy boxes -> [N, M] intersection over union (torchvision's definition)."""
    from torchvision.ops import box_iou as tv_box_iou

    return tv_box_iou(a, b)


def phrase_scores(logits: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
    """[num_queries, num_tokens] logits -> [num_queries, num_phrases] probabilities.

    Box b's score for phrase p is the best sigmoid over the tokens of p's span.
    """
    probs = logits.float().sigmoid()  # -inf padding -> 0
    n = probs.shape[-1]
    for a, b in spans:
        if not 0 <= a < b <= n:
            raise GroundingError(
                f"the caption is longer than the detector reads ({n} tokens): "
                "use fewer or shorter source phrases, or give --boxes."
            )
    return torch.stack([probs[:, a:b].max(dim=1).values for a, b in spans], dim=1)


def assign_boxes(
    logits: torch.Tensor,
    boxes_cxcywh: torch.Tensor,
    spans: Sequence[Span],
    box_threshold: float = BOX_THRESHOLD,
    text_threshold: float = TEXT_THRESHOLD,
    phrases: Sequence[str] | None = None,
) -> list[Box]:
    """Pick one box per phrase from one detector pass.

    A box is a candidate for phrase p when its best score over all phrase tokens exceeds
    `box_threshold` (the reference box filter) and its score on p's tokens exceeds
    `text_threshold` (p is among the box's labels); the candidate with the highest score on
    p wins. A phrase asked again ("the dog" for each of two dogs) gets the next-best candidate
    that does not overlap (IoU < `DUPLICATE_IOU`) a box its earlier occurrences took, as the
    reference does, rather than the same box twice. Raises GroundingMiss (with the boxes found)
    when a phrase has no candidate.
    """
    if logits.ndim != 2 or boxes_cxcywh.shape != (logits.shape[0], 4):
        raise ValueError(
            f"expected logits [Q, T] and boxes [Q, 4], got {tuple(logits.shape)} and {tuple(boxes_cxcywh.shape)}"
        )
    names = list(phrases) if phrases is not None else [f"phrase {i}" for i in range(len(spans))]
    scores = phrase_scores(logits, spans)  # [Q, P]
    xyxy = cxcywh_to_xyxy(boxes_cxcywh.float())
    has_area = ((xyxy[:, 2] - xyxy[:, 0]) > 1e-6) & ((xyxy[:, 3] - xyxy[:, 1]) > 1e-6)
    box_ok = has_area & (scores.max(dim=1).values > box_threshold)
    found: list[Box | None] = []
    misses: list[str] = []
    taken: dict[str, list[int]] = {}
    for p, name in enumerate(names):
        s = scores[:, p]
        cand = box_ok & (s > text_threshold)
        for q in taken.get(name, []):  # a repeated phrase: not a box (or a near copy) it already has
            cand &= box_iou(xyxy, xyxy[q : q + 1])[:, 0] < DUPLICATE_IOU
        if bool(cand.any()):
            best = int(torch.where(cand, s, torch.full_like(s, -1.0)).argmax())
            taken.setdefault(name, []).append(best)
            found.append(tuple(float(v) for v in xyxy[best]))  # type: ignore[arg-type]
            log.info("grounded %r with score %.3f at %s", name, float(s[best]), [round(v, 3) for v in found[-1]])
        else:
            found.append(None)
            misses.append(name)
    if misses:
        best = scores.max(dim=0).values.tolist() if scores.shape[0] else [0.0] * len(names)
        detail = "; ".join(f"'{n}' (best score {v:.2f})" for n, v, b in zip(names, best, found) if b is None)
        raise GroundingMiss(
            f"the detector found no box for {detail}: a box needs a score above --box_threshold "
            f"{box_threshold:g} and a score on the phrase's words above --text_threshold {text_threshold:g}. "
            f"To go on, {FALLBACK_HINT}.",
            boxes=found,
            missing=misses,
        )
    return found  # type: ignore[return-value]


def check_thresholds(box_threshold: float, text_threshold: float) -> None:
    for name, v in (("--box_threshold", box_threshold), ("--text_threshold", text_threshold)):
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
            raise GroundingError(f"{name} must be a number in [0, 1), got {v!r} (the reference uses 0.3 and 0.25).")


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse a device string and fail clearly when CUDA is asked for but absent."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"unknown device {device!r} ({e}); use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but no CUDA GPU is visible; use --device cpu.")
    return dev


# --- loading -------------------------------------------------------------------------------
def load_detector(name: str, device: torch.device, local_files_only: bool = False) -> tuple[Any, Any]:
    """from_pretrained for processor and model, with one clear error instead of a traceback."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    name = str(name)
    source = os.path.expanduser(name)
    how = (
        f"Pass --detector /local/path to a folder saved with save_pretrained (config.json, model "
        f"weights and processor files), e.g. made on a machine with internet by "
        f"`hf download {DEFAULT_DETECTOR} --local-dir /local/path`."
    )
    from gas_lightning.io import looks_like_path

    if looks_like_path(name) and not Path(source).is_dir():
        raise ModelLoadError(f"detector folder {name!r} does not exist or is not a folder. {how}")
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as e:
        log.debug("loading detector %r failed", name, exc_info=True)
        reason = " ".join(str(e).split())[:300]
        raise ModelLoadError(f"could not load the GroundingDINO detector {name!r}: {reason}. {how}") from None
    model_type = str(getattr(model.config, "model_type", ""))
    if "grounding" not in model_type.replace("_", "-"):
        raise ModelLoadError(
            f"{name!r} is a {model_type or type(model).__name__} model, not GroundingDINO; "
            f"pass a GroundingDINO checkpoint such as {DEFAULT_DETECTOR}."
        )
    return processor, model.to(device).eval()


class GroundingDinoGrounder:
    """Zero-shot boxes from GroundingDINO (transformers), one per phrase."""

    def __init__(
        self,
        model: str = DEFAULT_DETECTOR,
        device: str | torch.device = "cpu",
        box_threshold: float = BOX_THRESHOLD,
        text_threshold: float = TEXT_THRESHOLD,
        local_files_only: bool = False,
    ):
        check_thresholds(box_threshold, text_threshold)
        self.name = str(model)
        self.device = resolve_device(device)
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.processor, self.model = load_detector(self.name, self.device, local_files_only)

    def __repr__(self) -> str:
        return (
            f"GroundingDinoGrounder(model={self.name!r}, device='{self.device}', "
            f"box_threshold={self.box_threshold}, text_threshold={self.text_threshold})"
        )

    @torch.inference_mode()
    def ground(self, image: Image.Image, phrases: list[str]) -> list[Box]:
        caption, spans = caption_and_spans(self.processor.tokenizer, phrases)
        inputs = self.processor(images=image.convert("RGB"), text=caption, return_tensors="pt").to(self.device)
        out = self.model(**inputs)
        return assign_boxes(
            out.logits[0].float().cpu(),
            out.pred_boxes[0].float().cpu(),
            spans,
            self.box_threshold,
            self.text_threshold,
            phrases=phrases,
        )
