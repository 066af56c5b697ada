"""GroundingDINO through groundingdino-py, for users holding the original .pth checkpoints.

groundingdino-py 0.4.0 (its last release) wraps BERT by copying `get_extended_attention_mask`,
`invert_attention_mask` and `get_head_mask` from a `BertModel`; transformers 5 removed those,
so building its model fails there. `BertCompat` replaces that wrapper with one that only
uses BertModel's public forward (passing GroundingDINO's per-phrase attention mask as a
ready 4D mask), so the package works under transformers 4 and 5. The package is imported
only when this backend is chosen, and every failure becomes one ModelLoadError saying what
to do. The config .py is read as literal assignments, never executed; weights are read
with safetensors or torch.load(weights_only=True).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from torch import nn

from gas_lightning.errors import ModelLoadError
from gas_lightning.grounding.gdino_hf import (
    BOX_THRESHOLD,
    DEFAULT_DETECTOR,
    TEXT_THRESHOLD,
    assign_boxes,
    caption_and_spans,
    check_thresholds,
    resolve_device,
)
from gas_lightning.plan import Box

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "Install it with `pip install 'groundingdino-py==0.4.0'` (it also pulls opencv, supervision, "
    "timm, addict and yapf), or use the default backend: --detector_backend transformers "
    f"--detector {DEFAULT_DETECTOR} (or a local copy of it)."
)
CONFIG_FOR_CHECKPOINT = (("swinb", "GroundingDINO_SwinB_cfg.py"), ("swint", "GroundingDINO_SwinT_OGC.py"))
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class BertCompat(nn.Module):
    """Stand-in for groundingdino's BertModelWarper that works with transformers 4 and 5.

    It registers the same submodules (embeddings, encoder, pooler), so checkpoint keys such as
    `bert.encoder.layer.0...` still match, and runs them through BertModel.forward, which
    accepts GroundingDINO's [batch, tokens, tokens] phrase mask once it is made 4D.
    """

    def __init__(self, bert_model: nn.Module):
        super().__init__()
        self.config = bert_model.config
        self.embeddings = bert_model.embeddings
        self.encoder = bert_model.encoder
        self.pooler = bert_model.pooler
        self._bert = [bert_model]  # a list, so the same modules are not registered twice

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **_unused):
        dtype = self.embeddings.word_embeddings.weight.dtype
        if attention_mask is not None:
            mask = attention_mask.bool()
            if mask.ndim == 2:  # [b, n] padding mask -> every query sees the same keys
                mask = mask[:, None, :].expand(-1, mask.shape[1], -1)
            additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            attention_mask = additive.masked_fill(~mask, torch.finfo(dtype).min)[:, None]
        return self._bert[0](
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
        )


def bert_compat_needed() -> bool:
    """True when BertModel lacks the helpers groundingdino-py 0.4.0 copies (transformers >= 5)."""
    from transformers import BertModel

    return not all(
        hasattr(BertModel, n) for n in ("get_extended_attention_mask", "invert_attention_mask", "get_head_mask")
    )


@contextlib.contextmanager
def _patched_bert_wrapper(module: Any) -> Iterator[None]:
    """Let groundingdino build its model with BertCompat; undone afterwards."""
    original = getattr(module, "BertModelWarper", None)
    module.BertModelWarper = BertCompat
    try:
        yield
    finally:
        module.BertModelWarper = original


def import_groundingdino() -> tuple[Any, Any]:
    """Import groundingdino-py lazily: (build_model, the module that wraps BERT)."""
    try:
        models = importlib.import_module("groundingdino.models")
        gd = importlib.import_module("groundingdino.models.GroundingDINO.groundingdino")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "groundingdino":
            raise ModelLoadError(
                f"--detector_backend groundingdino-py needs the groundingdino-py package, which is not installed. {INSTALL_HINT}"
            ) from None
        raise ModelLoadError(
            f"groundingdino-py is installed but its dependency {e.name!r} is missing ({e}). {INSTALL_HINT}"
        ) from None
    except Exception as e:  # a broken install can raise anything at import time
        raise ModelLoadError(f"importing groundingdino-py failed: {type(e).__name__}: {e}. {INSTALL_HINT}") from None
    return models.build_model, gd


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a GroundingDINO config .py made of `name = literal` lines, without running it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(
            f"--detector_config {str(path)!r} does not exist; pass the GroundingDINO config .py that matches "
            "the checkpoint (e.g. GroundingDINO_SwinT_OGC.py for groundingdino_swint_ogc.pth)."
        )
    try:
        tree = ast.parse(p.read_text(), filename=str(p))
    except (SyntaxError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"--detector_config {str(p)!r} is not a readable Python config: {e}") from None
    out: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
                continue
            except ValueError:
                pass
        raise ModelLoadError(
            f"--detector_config {str(p)!r} line {node.lineno} is not a plain `name = value` assignment; "
            "gas-lightning reads GroundingDINO configs without executing them, so keep to literal values."
        )
    if out.get("modelname") != "groundingdino":
        raise ModelLoadError(
            f"--detector_config {str(p)!r} has modelname {out.get('modelname')!r}; expected 'groundingdino'."
        )
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or torch.load(weights_only=True); 'model' and 'module.' unwrapped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(
            f"--detector_checkpoint {str(path)!r} does not exist; pass the .pth (or .safetensors) file that "
            "goes with --detector_config, e.g. groundingdino_swint_ogc.pth."
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(p))
        else:
            data = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ModelLoadError(
            f"could not read --detector_checkpoint {str(p)!r}: {type(e).__name__}: {' '.join(str(e).split())[:300]}. "
            "Checkpoints are read as tensors only (weights_only=True); a file holding other Python objects "
            "must be re-saved as a plain state dict (or .safetensors) from a trusted environment."
        ) from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelLoadError(f"--detector_checkpoint {str(p)!r} is not a state dict of tensors.")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in data.items()}


def build_model(config: dict[str, Any], device: torch.device, text_encoder: str | None = None) -> nn.Module:
    """Build the groundingdino-py model from a parsed config, with the BERT fix when needed."""
    build, gd_module = import_groundingdino()
    args = SimpleNamespace(**config)
    args.device = str(device)
    args.use_checkpoint = args.use_transformer_ckpt = False  # inference only: checkpointing just costs time
    if text_encoder is not None:
        args.text_encoder_type = str(Path(text_encoder).expanduser())
    patch = _patched_bert_wrapper(gd_module) if bert_compat_needed() else contextlib.nullcontext()
    try:
        with patch:
            return build(args)
    except OSError as e:
        raise ModelLoadError(
            f"groundingdino-py could not load its text encoder {args.text_encoder_type!r}: "
            f"{' '.join(str(e).split())[:300]}. Without internet, save bert-base-uncased (model and tokenizer) "
            "to a folder and pass it as the text encoder (text_encoder_type in the config)."
        ) from None
    except Exception as e:
        import transformers

        raise ModelLoadError(
            f"groundingdino-py failed to build its model with transformers {transformers.__version__}: "
            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}. Check that --detector_config matches the "
            "checkpoint; if this is a version clash, run groundingdino-py in its own environment with "
            f"`pip install 'groundingdino-py==0.4.0' 'transformers<5'`. {INSTALL_HINT}"
        ) from None


def preprocess(image: Image.Image, short: int = 800, long: int = 1333) -> torch.Tensor:
    """The reference eval transform: resize (short side 800, long side <= 1333), normalise."""
    img = image.convert("RGB")
    w, h = img.size
    scale = min(short / min(w, h), long / max(w, h))
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.size[1], img.size[0], 3)
    x = x.permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(_MEAN)[:, None, None]) / torch.tensor(_STD)[:, None, None]


class GroundingDinoPyGrounder:
    """Zero-shot boxes from an original GroundingDINO checkpoint (groundingdino-py)."""

    def __init__(
        self,
        config: str | Path | None,
        checkpoint: str | Path | None,
        device: str | torch.device = "cpu",
        box_threshold: float = BOX_THRESHOLD,
        text_threshold: float = TEXT_THRESHOLD,
        text_encoder: str | None = None,
    ):
        if not config or not checkpoint:
            raise ModelLoadError(
                "--detector_backend groundingdino-py needs --detector_config (the .py) and "
                "--detector_checkpoint (the .pth) of an original GroundingDINO release."
            )
        check_thresholds(box_threshold, text_threshold)
        self.config_path, self.checkpoint_path = str(config), str(checkpoint)
        self.device = resolve_device(device)
        self.box_threshold, self.text_threshold = float(box_threshold), float(text_threshold)
        cfg = read_config(config)
        state = read_state_dict(checkpoint)
        model = build_model(cfg, self.device, text_encoder)
        self._check_shapes(model.state_dict(), state)
        result = model.load_state_dict(state, strict=False)
        expected = len(model.state_dict())
        if len(result.missing_keys) > expected // 2:
            raise ModelLoadError(
                f"--detector_checkpoint {self.checkpoint_path!r} does not fit --detector_config "
                f"{self.config_path!r} ({len(result.missing_keys)} of {expected} weights missing); "
                "use the config that belongs to the checkpoint (SwinT_OGC vs SwinB)."
            )
        if result.missing_keys or result.unexpected_keys:
            log.warning(
                "groundingdino-py checkpoint: %d missing and %d unexpected weights",
                len(result.missing_keys),
                len(result.unexpected_keys),
            )
        self.model = model.to(self.device).eval()

    def _check_shapes(self, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        """load_state_dict(strict=False) forgives missing keys but not other shapes (a SwinB checkpoint
        with the SwinT config); name the config to use instead of a page of size mismatches."""
        wrong = [
            (k, tuple(v.shape), tuple(expected[k].shape))
            for k, v in state.items()
            if k in expected and v.shape != expected[k].shape
        ]
        if not wrong:
            return
        key, got, want = wrong[0]
        name = Path(self.checkpoint_path).name.lower()
        config = next((c for tag, c in CONFIG_FOR_CHECKPOINT if tag in name), "the config released with the checkpoint")
        raise ModelLoadError(
            f"--detector_checkpoint {self.checkpoint_path!r} does not fit --detector_config {self.config_path!r}: "
            f"{len(wrong)} weights have other shapes (e.g. {key}: {list(got)} in the checkpoint, {list(want)} in "
            f"the model the config builds); use --detector_config {config}."
        )

    def __repr__(self) -> str:
        return (
            f"GroundingDinoPyGrounder(config={self.config_path!r}, checkpoint={self.checkpoint_path!r}, "
            f"device='{self.device}', box_threshold={self.box_threshold}, text_threshold={self.text_threshold})"
        )

    @torch.inference_mode()
    def ground(self, image: Image.Image, phrases: list[str]) -> list[Box]:
        caption, spans = caption_and_spans(self.model.tokenizer, phrases)
        pixels = preprocess(image).to(self.device)
        out = self.model(pixels[None], captions=[caption])
        return assign_boxes(
            out["pred_logits"][0].float().cpu(),
            out["pred_boxes"][0].float().cpu(),
            spans,
            self.box_threshold,
            self.text_threshold,
            phrases=phrases,
        )
