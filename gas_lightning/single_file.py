"""Community checkpoints in one file (`--model model.safetensors --model_config FOLDER`).

Fine-tuned SD 1.x and SDXL models are mostly shared as one file in the original (LDM/SGM) key
layout. diffusers' `from_single_file` converts them; it needs the family's diffusers configs and
tokenizers, which `--model_config` supplies as a local folder (nothing is fetched). The file's
family is read from its key names before loading, so an SDXL file with an SD 1.5 config folder, a
FLUX file with an SD config folder (or the reverse) or a LoRA each get one message instead of a
conversion traceback. An SD3/FLUX file is a transformer: flow_loading.py takes the rest of the model
from the config folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from gas_lightning.components import (
    PICKLE_SUFFIXES,
    SINGLE_FILE_SUFFIXES,
    Components,
    check_components,
    model_family,
    settle_vae,
    vae_dtype,
)
from gas_lightning.errors import ModelLoadError

log = logging.getLogger(__name__)

FAMILY_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "FLUX.1"}
FLOW_BASES = {"sd3": "stabilityai/stable-diffusion-3-medium-diffusers", "flux": "black-forest-labs/FLUX.1-dev"}
CONFIG_HINT = (
    "a diffusers-layout folder with the configs and tokenizers of the checkpoint's base model, e.g. "
    "`hf download stabilityai/stable-diffusion-xl-base-1.0 --include '*.json' '*.txt' --local-dir sdxl-config` "
    "(stable-diffusion-v1-5/stable-diffusion-v1-5 for SD 1.5)"
)


def checkpoint_family(keys: set[str]) -> str | None:
    """'sd', 'sdxl', 'sd3', 'flux' or None (unknown) from key names; refuses what cannot be a whole model.

    SD3 and FLUX files are transformer checkpoints, in the original layout (joint_blocks / double_blocks,
    possibly under model.diffusion_model.) or in diffusers' (FLUX's single_transformer_blocks, SD3's pos_embed).
    """
    bare = {k.removeprefix("model.diffusion_model.") for k in keys}
    if any(k.startswith(("double_blocks.", "single_transformer_blocks.")) for k in bare):
        return "flux"
    if any(k.startswith("joint_blocks.") for k in bare) or (
        any(k.startswith("pos_embed.") for k in bare) and any(k.startswith("transformer_blocks.") for k in bare)
    ):
        return "sd3"
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelLoadError(
            "this single file holds no UNet weights (no model.diffusion_model.* keys): a LoRA, an "
            "embedding or one component cannot be an edit's --model; pass a full SD 1.x/2.x or SDXL "
            "checkpoint, or a diffusers folder"
        )
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd"
    return None


def _keys(path: Path) -> set[str] | None:
    if path.suffix != ".safetensors":
        return None  # reading a pickle's keys means loading it: diffusers does that once, below
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(
            f"--model {str(path)!r} is not a readable .safetensors file ({e}); it may be truncated: download it again"
        ) from None


def _config_index(model_config: str | None, path: Path) -> dict:
    from diffusers import DiffusionPipeline

    if model_config is None:
        raise ModelLoadError(
            f"--model {str(path)!r} is a single-file checkpoint; it needs --model_config FOLDER, {CONFIG_HINT}"
        )
    if not Path(model_config).is_dir():
        raise ModelLoadError(f"--model_config {model_config!r} is not a folder; pass {CONFIG_HINT}")
    try:
        return DiffusionPipeline.load_config(model_config, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"--model_config {model_config!r} has no readable model_index.json ({type(e).__name__}); pass {CONFIG_HINT}"
        ) from None


def single_file_family(path: str, model_config: str | None, allow_pickle_weights: bool) -> tuple[str, dict]:
    """The family of a single-file checkpoint and its config folder's model_index.json, after refusing a
    file that is no checkpoint, a pickle (unless allowed), and a file whose family is not the folder's."""
    file = Path(path)
    if file.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"--model {path!r} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}); "
            "pass a .safetensors checkpoint or a diffusers model folder"
        )
    if file.suffix in PICKLE_SUFFIXES and not allow_pickle_weights:
        raise ModelLoadError(
            f"--model {path!r} is a pickle checkpoint; gas-edit loads .safetensors only, because loading "
            "a pickle can run code. Use the model's .safetensors file, or pass --allow_pickle_weights "
            "true if you trust where it came from"
        )
    index = _config_index(model_config, file)
    family = model_family(model_config, index)
    if family in ("sd", "sdxl"):  # a flow family's folder is checked by flow_loading, which loads the rest from it
        check_components(model_config, index, flag="--model_config")
    keys = _keys(file)
    found = checkpoint_family(keys) if keys is not None else None
    if found is not None and found != family:
        hint = (
            CONFIG_HINT
            if found not in FLOW_BASES
            else (
                f"the diffusers folder of its base model (text encoders and VAE included), e.g. "
                f"`hf download {FLOW_BASES[found]} --local-dir FOLDER`"
            )
        )
        raise ModelLoadError(
            f"--model {path!r} is a checkpoint of {FAMILY_NAMES[found]} but --model_config {model_config!r} "
            f"is a config folder of {FAMILY_NAMES[family]}; pass {hint}"
        )
    return family, index


def load_single_file(
    path: str, model_config: str | None, dtype_for: Callable[[str], torch.dtype], allow_pickle_weights: bool
) -> Components:
    """UNet, VAE and text encoders from the file; tokenizers and scheduler from the config folder.
    `dtype_for(family)`: the weights' dtype, which depends on the family read from the config folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from diffusers.utils import logging as diffusers_logging

    family, index = single_file_family(path, model_config, allow_pickle_weights)
    torch_dtype = dtype_for(family)
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    common = {"config": model_config, "local_files_only": True}
    extra = (
        {"add_watermarker": False}
        if family == "sdxl"
        else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # a bar over 5-7 components says nothing and splits an error message
    try:
        scheduler = DDPMScheduler.from_pretrained(model_config, subfolder="scheduler", local_files_only=True)
        vae = AutoencoderKL.from_single_file(
            path, subfolder="vae", torch_dtype=vae_dtype(family, torch_dtype), **common
        )
        pipe = pipeline_class.from_single_file(
            path, torch_dtype=torch_dtype, vae=vae, scheduler=scheduler, **common, **extra
        )
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as e:
        first = " ".join(str(e).split())[:300]
        if isinstance(e, RuntimeError) and "size mismatch" not in first:
            raise
        raise ModelLoadError(
            f"--model {path!r} could not be loaded with the configs in --model_config {model_config!r} "
            f"({type(e).__name__}: {first}); the checkpoint and the config folder must be the same "
            f"architecture: pass {CONFIG_HINT}"
        ) from None
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    log.info("loaded single-file %s checkpoint %s with configs from %s", FAMILY_NAMES[family], path, model_config)
    return Components(
        family=family,
        unet=pipe.unet,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=scheduler,
        vae=settle_vae(pipe.vae, torch_dtype),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )
