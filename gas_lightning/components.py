"""What a model folder or a single checkpoint file yields before it becomes a Backbone, and the checks on
it that the loaders share: the family (SD 1/2, SDXL, SD3, FLUX; refused otherwise), the folder's components, the
VAE's dtype, `from_pretrained` with its one-line errors. Below loading.py, single_file.py and flow_loading.py, so
none imports another's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gas_lightning.errors import ModelLoadError

SUPPORTED = (
    "gas-lightning loads Stable Diffusion 1.x/2.x and SDXL base models (a UNet with CLIP text encoders, "
    "epsilon or v-prediction) and the rectified-flow SD3/SD3.5 and FLUX.1 dev/schnell models"
)
# model_index.json's transformer class -> the rectified-flow family it belongs to (flow_backbone.py)
FLOW_TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
CLIP_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")


@dataclass
class Components:
    """What a model folder or a single file yields, before it becomes a Backbone."""

    family: str  # "sd" | "sdxl"
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    vae: nn.Module | None
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True


def model_family(source: str, index: dict) -> str:
    """'sd', 'sdxl', 'sd3' or 'flux' from model_index.json; anything else is refused before any weight is read."""
    name = index.get("_class_name") or "no _class_name"
    present = {k for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None}
    why = None
    if "transformer" in present and index["transformer"][1] in FLOW_TRANSFORMERS:
        return FLOW_TRANSFORMERS[index["transformer"][1]]
    if "transformer" in present:
        why = f"its diffusion transformer ({index['transformer'][1]}) is not SD3's or FLUX's"
    elif "unet" not in present:
        why = "it has no unet/"
    elif "text_encoder" not in present:
        why = "no first text encoder (the SDXL refiner and image-conditioned models are not text-to-image base models)"
    elif index["text_encoder"][1] not in CLIP_ENCODERS or (
        "text_encoder_2" in present and index["text_encoder_2"][1] not in CLIP_ENCODERS
    ):
        why = "its text encoder is not CLIP"
    if why is not None:
        raise ModelLoadError(
            f"{source!r} ({name}) is not supported: {why}. {SUPPORTED}; pass one of "
            "those with --model (a diffusers folder, a hub id, or a .safetensors file with --model_config)"
        )
    return "sdxl" if "text_encoder_2" in present else "sd"


def check_components(model: str, index: dict, flag: str = "--model") -> None:
    """A local folder must hold every component model_index.json names; say which are missing at once."""
    if not Path(model).is_dir():
        return
    needed = ["unet", "text_encoder", "tokenizer", "scheduler"]
    needed += [c for c in ("text_encoder_2", "tokenizer_2", "vae") if (index.get(c) or [None])[0] is not None]
    missing = [c for c in needed if not (Path(model) / c).is_dir()]
    if missing:
        raise ModelLoadError(
            f"the {flag} folder {model!r} lacks {', '.join(m + '/' for m in missing)}; copy the whole model "
            "(every folder model_index.json names), e.g. with `hf download MODEL_ID --local-dir FOLDER`"
        )


def vae_dtype(family: str, torch_dtype: torch.dtype) -> torch.dtype:
    """The dtype to load the VAE in: float32 under float16 weights (see `settle_vae`), as the reference's VAE."""
    return torch.float32 if torch_dtype == torch.float16 else torch_dtype


def settle_vae(vae: nn.Module, torch_dtype: torch.dtype) -> nn.Module:
    """A VAE whose config asks for float32 (force_upcast: SDXL's overflows in float16, and diffusers' default
    for SD 1.x/2.x) stays in float32, as the reference runs its VAE. A VAE fixed for float16 (force_upcast
    false, e.g. madebyollin/sdxl-vae-fp16-fix) goes to float16."""
    if not getattr(vae.config, "force_upcast", True):
        vae.to(torch_dtype)
    return vae


def without_accelerate() -> dict[str, bool]:
    """Without accelerate, ask diffusers for its plain load outright: it would fall back to it anyway,
    after a "pip install accelerate" hint on every load. Measured on the SD 1.5 architecture, accelerate
    made loading neither faster nor lighter (tools/bench/load_check.py; docs/speed.md)."""
    from diffusers.utils import is_accelerate_available

    return {} if is_accelerate_available() else {"low_cpu_mem_usage": False}


def from_pretrained(cls: Any, source: str, subfolder: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        first = " ".join(str(e).split())[:300]
        if isinstance(e, RuntimeError) and "size mismatch" not in str(e):
            raise  # not a loading problem the user can fix
        raise ModelLoadError(_load_failure(source, subfolder, kwargs, e, first)) from None
    except Exception as e:
        from safetensors import SafetensorError

        if not isinstance(e, SafetensorError):
            raise
        raise ModelLoadError(_corrupted(source, subfolder, f"{type(e).__name__}: {e}")) from None


def _corrupted(source: str, subfolder: str, why: str) -> str:
    return (
        f"the weights in '{Path(source) / subfolder}' are corrupted or incomplete ({why}); "
        "download the model again (an interrupted copy leaves a truncated .safetensors file)"
    )


def _load_failure(source: str, subfolder: str, kwargs: dict, e: Exception, first: str) -> str:
    """Say which of the usual causes it is: pickle-only weights, a config that does not fit the
    weights, a damaged file, a missing component, or a hub id that cannot be reached."""
    folder = Path(source) / subfolder
    if not Path(source).exists():
        return (
            f"could not load {source!r} from the Hugging Face hub (offline, or no such model); "
            f"download the model once and pass the local folder with --model /path/to/model ({first})"
        )
    if isinstance(e, RuntimeError):
        mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), first)
        return (
            f"the weights in '{folder}' do not fit its config.json ({mismatch[:300]}); the config was edited "
            "or belongs to another model: restore the config.json saved with these weights"
        )
    pickles = sorted(f.name for f in folder.glob("*") if f.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if kwargs.get("use_safetensors") and pickles:
        return (
            f"'{folder}' holds only pickle weights ({', '.join(pickles)}); gas-edit loads .safetensors only, "
            "because loading a pickle can run code. Convert the model to safetensors (save_pretrained), "
            "or pass --allow_pickle_weights true if you trust where it came from"
        )
    if "Unable to load weights" in first or "header" in first.lower():
        return _corrupted(source, subfolder, first)
    return f"the folder {source!r} has no loadable '{subfolder}/' component ({type(e).__name__}: {first})"
