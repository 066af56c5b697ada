"""Load an SD3 / SD3.5 or FLUX.1 model from a diffusers folder or hub id, component by component.

The same path as loading.py takes for Stable Diffusion (diffusers/transformers `from_pretrained` with the
package's one-line errors), with the family's own classes: a transformer instead of a UNet, three or two
text encoders, a FlowMatchEulerDiscreteScheduler. loading.py calls this after reading model_index.json;
nothing here imports loading.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gas_lightning.backbone import VaeCodec
from gas_lightning.components import from_pretrained, settle_vae, vae_dtype, without_accelerate
from gas_lightning.errors import ModelLoadError
from gas_lightning.flow_backbone import FlowBackbone, FluxBackbone, SD3Backbone

log = logging.getLogger(__name__)

# the components each family's folder holds (model_index.json names them)
ENCODERS = {
    "sd3": [
        ("text_encoder", "CLIPTextModelWithProjection"),
        ("text_encoder_2", "CLIPTextModelWithProjection"),
        ("text_encoder_3", "T5EncoderModel"),
    ],
    "flux": [("text_encoder", "CLIPTextModel"), ("text_encoder_2", "T5EncoderModel")],
}
TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}


def check_flow_components(model: str, index: dict, family: str) -> None:
    """Every component the family needs is named in model_index.json and, for a local folder, present."""
    needed = ["transformer", "vae", "scheduler"]
    for name, _ in ENCODERS[family]:
        needed += [name, name.replace("text_encoder", "tokenizer")]
    unnamed = [c for c in needed if (index.get(c) or [None])[0] is None]
    if unnamed:
        raise ModelLoadError(
            f"{model!r} ({index.get('_class_name')}) is a {family.upper()} model without {', '.join(unnamed)} in its "
            "model_index.json; "
            "gas-lightning needs the whole model (every text encoder: the prompts are embedded once per edit)"
        )
    missing = [c for c in needed if Path(model).is_dir() and not (Path(model) / c).is_dir()]
    if missing:
        raise ModelLoadError(
            f"the --model folder {model!r} lacks {', '.join(m + '/' for m in missing)}; copy the whole model "
            "(every folder model_index.json names), e.g. with `hf download MODEL_ID --local-dir FOLDER`"
        )


def load_flow_folder(
    model: str,
    family: str,
    torch_dtype: torch.dtype,
    local_files_only: bool,
    allow_pickle_weights: bool,
    transformer_file: str | None = None,
) -> FlowBackbone:
    """The family's networks from a diffusers folder or hub id, frozen, on the CPU.

    `transformer_file`: a single-file transformer checkpoint (original or diffusers key layout) that replaces
    the folder's transformer (diffusers' `from_single_file` with the folder's transformer config), as SD3/FLUX
    fine-tunes are shared; the text encoders, VAE and scheduler still come from the folder."""
    import diffusers
    import transformers

    kw = {"local_files_only": local_files_only}
    weights = {**kw, "use_safetensors": None if allow_pickle_weights else True}
    big = {**weights, **without_accelerate()}
    transformer_class = getattr(diffusers, TRANSFORMERS[family])
    if transformer_file is None:
        transformer = from_pretrained(transformer_class, model, "transformer", torch_dtype=torch_dtype, **big)
    else:
        transformer = single_file_transformer(transformer_class, transformer_file, model, torch_dtype)
    vae = from_pretrained(diffusers.AutoencoderKL, model, "vae", torch_dtype=vae_dtype(family, torch_dtype), **big)
    scheduler = from_pretrained(diffusers.FlowMatchEulerDiscreteScheduler, model, "scheduler", **kw)
    text = {}
    for name, cls in ENCODERS[family]:
        text[name] = from_pretrained(getattr(transformers, cls), model, name, dtype=torch_dtype, **weights)
        tokenizer = name.replace("text_encoder", "tokenizer")
        text[tokenizer] = from_pretrained(transformers.AutoTokenizer, model, tokenizer, **kw)
    cls = SD3Backbone if family == "sd3" else FluxBackbone
    backbone = cls(
        transformer=transformer, codec=VaeCodec(settle_vae(vae, torch_dtype)), scheduler=scheduler, source=model, **text
    )
    for net in backbone.frozen_networks():
        net.requires_grad_(False).eval()
    return backbone


def single_file_transformer(cls, path: str, config: str, torch_dtype: torch.dtype):
    """A transformer from one file, configured by `config`'s transformer/config.json, offline."""
    try:
        return cls.from_single_file(
            path, config=config, subfolder="transformer", torch_dtype=torch_dtype, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = " ".join(str(e).split())[:300]
        if isinstance(e, RuntimeError) and "size mismatch" not in first:
            raise
        raise ModelLoadError(
            f"--model {path!r} could not be loaded with the transformer config in --model_config {config!r} "
            f"({type(e).__name__}: {first}); the checkpoint and the config folder must be the same architecture"
        ) from None


def finish_flow(backbone: FlowBackbone, device: str | torch.device) -> FlowBackbone:
    """On its device (text encoders on the CPU, see FlowBackbone), with PyTorch's SDPA attention (diffusers' default)."""
    backbone.to(device)
    log.info("loaded %s (%s, %s, attention=%s)", backbone.source, backbone.family, backbone.dtype, backbone.attention)
    return backbone
