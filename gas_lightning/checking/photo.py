"""Verdicts for photo edits: the configured detector and a CLIP model look inside each subtask's box.

Two independent signals, each used when configured: GroundingDINO's best score for the target and
the source phrase in the box's crop (`det_target`, `det_source`), and CLIP's preference for the
target text over the source text on the same crop (`clip_target`, a softmax over the two texts).
A subtask is done or not done when every signal says so, unsure when they disagree. Models come
from local folders only; one that cannot be loaded is one error naming its flag.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from gas_lightning.checking.verdict import DONE, NOT_DONE, UNSURE, Verdict, by_threshold, vote
from gas_lightning.errors import ModelLoadError
from gas_lightning.grounding.gdino_hf import caption_and_spans, phrase_scores
from gas_lightning.plan import WHOLE_IMAGE, EditPlan, Subtask

CLIP_DONE, CLIP_FAILED = 0.6, 0.4  # CLIP's share for the target text: a clear preference either way


def crop(image: Image.Image, box) -> Image.Image:
    x0, y0, x1, y1 = box or WHOLE_IMAGE
    w, h = image.size
    left, top = int(x0 * w), int(y0 * h)
    return image.crop((left, top, max(left + 1, round(x1 * w)), max(top + 1, round(y1 * h))))


def load_clip(path: str, device: torch.device):
    """CLIPModel and CLIPProcessor from a local folder (never a download)."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path).expanduser()
    how = (
        "pass a local folder holding a CLIPModel and its CLIPProcessor (config.json, weights, tokenizer and "
        "preprocessor_config.json), e.g. made with `hf download openai/clip-vit-base-patch32 --local-dir DIR` "
        "on a machine with internet"
    )
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"--check_clip {path!r}: no CLIP model there (no config.json); {how}")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(
            f"--check_clip {path!r}: could not load it ({' '.join(str(e).split())[:200]}); {how}"
        ) from None
    return model, processor


class PhotoChecker:
    """Checker protocol from a GroundingDINO grounder (its processor and model) and/or a CLIP folder.

    Args:
        detector: a `GroundingDinoGrounder` (or None); its box threshold is the detector's "found".
        clip: a local CLIP folder (or None).
        device: where CLIP runs.

    Raises:
        ModelLoadError: when the CLIP folder cannot be loaded.
    """

    def __init__(self, detector=None, clip: str | None = None, device: str | torch.device = "cpu"):
        self.detector = detector
        self.device = torch.device(device)
        self.clip = load_clip(clip, self.device) if clip else None
        self.name = "+".join(n for n, used in (("detector", detector), ("clip", clip)) if used)

    def __call__(self, source: Image.Image, edited: Image.Image, plan: EditPlan) -> list[Verdict]:
        return [self._judge(k, s, crop(edited.convert("RGB"), s.box)) for k, s in enumerate(plan.subtasks)]

    def _judge(self, k: int, s: Subtask, piece: Image.Image) -> Verdict:
        scores, votes = {}, []
        if self.detector is not None:
            t, src = self.detector_scores(piece, [s.target, s.source])
            scores["det_target"] = t
            found = self.detector.box_threshold
            if s.keep:
                votes.append(DONE if t >= found else NOT_DONE)
            else:
                scores["det_source"] = src
                votes.append(DONE if t >= found and t > src else NOT_DONE if t < found <= src else UNSURE)
        if self.clip is not None and not s.keep:  # a kept object's two texts are one: CLIP cannot tell
            scores["clip_target"] = self.clip_share(piece, s.target, s.source)
            votes.append(by_threshold(scores["clip_target"], CLIP_DONE, CLIP_FAILED))
        verdict = vote(votes)
        why = "every signal agrees" if votes and verdict != UNSURE else "the signals disagree or none applies"
        return Verdict(k, s.source, s.target, s.keep, verdict, scores, why)

    @torch.inference_mode()
    def detector_scores(self, piece: Image.Image, phrases: list[str]) -> list[float]:
        """The detector's best score for each phrase anywhere in the crop."""
        processor, model = self.detector.processor, self.detector.model
        caption, spans = caption_and_spans(processor.tokenizer, phrases)
        inputs = processor(images=piece, text=caption, return_tensors="pt").to(self.detector.device)
        probs = phrase_scores(model(**inputs).logits[0].float().cpu(), spans)
        return [float(v) for v in probs.max(dim=0).values]

    @torch.inference_mode()
    def clip_share(self, piece: Image.Image, target: str, source: str) -> float:
        """CLIP's softmax probability of the target text against the source text for the crop."""
        model, processor = self.clip
        inputs = processor(text=[target, source], images=piece, return_tensors="pt", padding=True).to(self.device)
        logits = model(**inputs).logits_per_image[0].float()
        return float(logits.softmax(-1)[0])
