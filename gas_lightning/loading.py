"""Load a `Backbone` from a diffusers folder, a hub id, or a single-file checkpoint.

Stage order: backbone.py (the loaded model) < components.py (what loading yields, the shared checks)
< single_file.py < this module; nothing here imports upwards. Components are loaded one by one with
diffusers/transformers `from_pretrained`, so a hub id and a local folder take the same path. The family (SD 1/2 or SDXL) is read from model_index.json
before any weight is touched, and every other family is refused with one message. A single
`.safetensors` checkpoint (the form community fine-tunes are shared in) goes through diffusers'
`from_single_file` with a local config folder, offline.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from gas_lightning.backbone import (
    Backbone,
    IdentityCodec,
    LatentCodec,
    SDXLBackbone,
    VaeCodec,
    resolve_dtype,
    set_attention,
)
from gas_lightning.components import (
    SUPPORTED,
    Components,
    check_components,
    from_pretrained,
    model_family,
    settle_vae,
    vae_dtype,
    without_accelerate,
)
from gas_lightning.errors import ModelLoadError
from gas_lightning.flow_backbone import FLOW_FAMILIES, FlowBackbone
from gas_lightning.flow_loading import check_flow_components, finish_flow, load_flow_folder
from gas_lightning.io import looks_like_path
from gas_lightning.single_file import load_single_file, single_file_family

log = logging.getLogger(__name__)


def _model_index(source: str, local_files_only: bool) -> dict:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(source, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        if Path(source).exists():
            raise ModelLoadError(
                f"{source!r} is not a diffusers model folder (no readable model_index.json); "
                "save the model with save_pretrained or point --model at the folder that holds unet/, text_encoder/ ..."
            ) from None
        if looks_like_path(source):
            raise ModelLoadError(
                f"--model {source!r}: no such folder; pass the folder that holds unet/, text_encoder/ ... "
                "(a diffusers save_pretrained layout), or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
            ) from None
        raise ModelLoadError(
            f"could not reach model {source!r} (offline, or no such hub id): {type(e).__name__}. "
            "Pass a local folder with --model /path/to/model (a diffusers save_pretrained layout)."
        ) from None


def _check_world_vae(model: str, index: dict) -> None:
    """A gas-lightning world model's VAE must carry the scaling_factor measured on its images: without
    it diffusers silently falls back to SD's 0.18215, and every latent would be scaled wrongly."""
    config = Path(model) / "vae" / "config.json"
    if index.get("gas_world") and config.is_file() and "scaling_factor" not in json.loads(config.read_text()):
        raise ModelLoadError(
            f"the world model {model!r} has no scaling_factor in vae/config.json; add the one measured on the world's "
            'images ("scaling_factor": 1 / std of the VAE latents; tools/world/train_latent_world.py vae writes it), '
            "or copy the shipped folder again"
        )


def _load_folder(
    model: str, index: dict, family: str, torch_dtype: torch.dtype, local_files_only: bool, allow_pickle_weights: bool
) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    kw = {"local_files_only": local_files_only}
    weights = {**kw, "use_safetensors": None if allow_pickle_weights else True}
    unet_vae = {**weights, **without_accelerate()}
    parts = Components(
        family=family,
        unet=from_pretrained(UNet2DConditionModel, model, "unet", torch_dtype=torch_dtype, **unet_vae),
        text_encoder=from_pretrained(CLIPTextModel, model, "text_encoder", dtype=torch_dtype, **weights),
        tokenizer=from_pretrained(AutoTokenizer, model, "tokenizer", **kw),
        scheduler=from_pretrained(DDPMScheduler, model, "scheduler", **kw),
        vae=None,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )
    if family == "sdxl":
        parts.text_encoder_2 = from_pretrained(
            CLIPTextModelWithProjection, model, "text_encoder_2", dtype=torch_dtype, **weights
        )
        parts.tokenizer_2 = from_pretrained(AutoTokenizer, model, "tokenizer_2", **kw)
    if (index.get("vae") or [None])[0] is not None:
        _check_world_vae(model, index)
        vae = from_pretrained(AutoencoderKL, model, "vae", torch_dtype=vae_dtype(family, torch_dtype), **unet_vae)
        parts.vae = settle_vae(vae, torch_dtype)
    return parts


def _flow_source(
    model: str, model_config: str | None, local_files_only: bool, allow_pickle_weights: bool
) -> tuple[str, str, str | None] | None:
    """(family, folder, transformer file) when `model` is an SD3/FLUX model, else None (an SD model, or an error)."""
    if Path(model).is_file():
        family, _ = single_file_family(model, model_config, allow_pickle_weights)
        return (family, model_config, model) if family in FLOW_FAMILIES else None
    if model_config is not None:
        return None  # load_backbone refuses --model_config with a folder
    family = model_family(model, _model_index(model, local_files_only))
    return (family, model, None) if family in FLOW_FAMILIES else None


def load_backbone(
    model: str,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    attention: str = "auto",
    local_files_only: bool | None = None,
    allow_pickle_weights: bool = False,
    model_config: str | None = None,
    compile: bool | str = False,
    low_memory: bool = False,
    micro_batch: int | None = None,
) -> Backbone | FlowBackbone:
    """Load UNet, text encoder(s), tokenizer(s), scheduler constants and (if present) the VAE; for SD3/FLUX
    the transformer, text encoders and VAE (flow_loading.py).

    `model` is a diffusers folder, a hub id, or a single-file checkpoint; the latter needs
    `model_config`, a local diffusers-layout folder with the family's configs and tokenizers.
    Weights are read from .safetensors only unless `allow_pickle_weights` (a pickle can run code).
    `compile`, `low_memory` and `micro_batch`: see `Backbone.tune`.
    """
    model = os.fspath(model)
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    resolve_dtype(dtype, device)  # an unknown dtype fails here, before any file is read
    flow = _flow_source(model, model_config, local_files_only, allow_pickle_weights)
    if flow is not None:
        family, folder, transformer_file = flow
        check_flow_components(folder, _model_index(folder, local_files_only), family)
        loaded = load_flow_folder(
            folder,
            family,
            resolve_dtype(dtype, device, family),
            local_files_only,
            allow_pickle_weights,
            transformer_file,
        )
        backbone_flow = finish_flow(loaded, device)
        backbone_flow.config_source = model_config
        return backbone_flow.tune(compile=compile, low_memory=low_memory, micro_batch=micro_batch)
    if Path(model).is_file():
        parts = load_single_file(
            model, model_config, lambda family: resolve_dtype(dtype, device, family), allow_pickle_weights
        )
    else:
        if model_config is not None:
            raise ModelLoadError(
                f"--model_config is for a single-file checkpoint (--model FILE.safetensors); --model "
                f"{model!r} is a folder or hub id with its own configs: drop --model_config"
            )
        index = _model_index(model, local_files_only)
        family = model_family(model, index)
        check_components(model, index)
        parts = _load_folder(
            model, index, family, resolve_dtype(dtype, device, family), local_files_only, allow_pickle_weights
        )
    backbone = _assemble(parts, model, device, attention)
    backbone.config_source = model_config
    return backbone.tune(compile=compile, low_memory=low_memory, micro_batch=micro_batch)


def _assemble(parts: Components, source: str, device: str | torch.device, attention: str) -> Backbone:
    unet_in, unet_out = parts.unet.config.in_channels, parts.unet.config.out_channels
    if unet_in != unet_out:
        raise ModelLoadError(
            f"{source!r} is not supported: its UNet takes {unet_in} input channels for {unet_out} output "
            f"channels (an inpainting, depth or instruction model, not a text-to-image base model). {SUPPORTED}"
        )
    codec: LatentCodec = VaeCodec(parts.vae) if parts.vae is not None else IdentityCodec()
    prediction_type = parts.scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ModelLoadError(
            f"{source!r} uses prediction_type={prediction_type!r}; only epsilon and v_prediction are supported"
        )
    common = dict(
        unet=parts.unet,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        codec=codec,
        alphas_cumprod=parts.scheduler.alphas_cumprod.float().clone(),
        prediction_type=prediction_type,
        attention="sdpa",
        source=source,
    )
    if parts.family == "sdxl":
        backbone: Backbone = SDXLBackbone(
            **common,
            text_encoder_2=parts.text_encoder_2,
            tokenizer_2=parts.tokenizer_2,
            force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
        )
    else:
        backbone = Backbone(**common)
    for net in backbone.frozen_networks():
        net.requires_grad_(False).eval()
    backbone.to(device)
    backbone.attention = set_attention(parts.unet, attention)
    log.info(
        "loaded %s (%s, %s, %s, attention=%s)",
        source,
        backbone.family,
        prediction_type,
        backbone.dtype,
        backbone.attention,
    )
    return backbone
