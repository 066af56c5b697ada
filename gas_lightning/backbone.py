"""Load a frozen text-to-image diffusion model (Stable Diffusion family) for score distillation.

Components are loaded one by one with diffusers/transformers `from_pretrained` so that a hub
id and a local folder take the same path, and so that a pixel-space model (no `vae/`, such as
the bundled shapes model) is a first-class case through an identity codec.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from gas_lightning.errors import ModelLoadError

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@contextmanager
def visiting(net: nn.Module, device: torch.device, offloaded: bool) -> Iterator[None]:
    """Run `net` on `device` and, when it is offloaded, send it back to the CPU afterwards."""
    if not offloaded or torch.device(device).type == "cpu":
        yield
        return
    net.to(device)
    try:
        yield
    finally:
        net.to("cpu")


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on `device` without waiting for the accelerator: a copy from pageable memory
    blocks until every queued kernel has run, a copy from pinned memory does not."""
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class LatentCodec(nn.Module):
    """Maps images in [-1, 1] to the space the denoiser works in, and back."""

    downscale: int = 1
    offloaded: bool = False  # waits on the CPU and visits the input's device for each encode/decode

    def encode(self, image: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, latent: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class IdentityCodec(LatentCodec):
    """Pixel-space diffusion: the image itself is the latent."""

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent.clamp(-1, 1)


class VaeCodec(LatentCodec):
    """Latent diffusion: z = (VAE mean - shift) * scale, as in Stable Diffusion."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        with visiting(self.vae, image.device, self.offloaded):
            posterior = self.vae.encode(image.to(dtype)).latent_dist
            return ((posterior.mean - self.shift) * self.scale).float()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        with visiting(self.vae, latent.device, self.offloaded):
            image = self.vae.decode((latent / self.scale + self.shift).to(dtype)).sample
            return image.float().clamp(-1, 1)


@dataclass
class Backbone:
    """The frozen networks of one diffusion model plus what guidance needs to know about it."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    codec: LatentCodec
    alphas_cumprod: torch.Tensor  # (T,), float32
    prediction_type: str  # "epsilon" | "v_prediction"
    attention: str  # the attention backend that is in use
    source: str  # id or path it was loaded from
    micro_batch: int | None = None  # most samples per UNet call; None: the whole batch in one call
    offload: bool = False  # text encoder and VAE wait on the CPU, visiting the UNet's device when used

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def default_resolution(self) -> int:
        """The model's own working resolution: UNet sample size times the codec's downscale."""
        return int(self.unet.config.sample_size) * self.codec.downscale

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this for the UNet's down/up-sampling to line up."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1) * self.codec.downscale

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str) -> "Backbone":
        self.unet.to(device)
        for net in (self.text_encoder, self.codec):
            net.to("cpu" if self.offload else device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def tune(self, compile: bool = False, low_memory: bool = False, micro_batch: int | None = None,
             channels_last: bool = False) -> "Backbone":
        """Speed and memory switches that leave the results unchanged (up to float rounding).

        `low_memory`: UNet calls of at most `micro_batch` (default 4, the sequential schedule's call
        size) samples, and the text encoder and VAE kept on the CPU between uses. Attention is not
        sliced: SDPA and xformers already run attention without the (tokens x tokens) matrix.
        `compile`: torch.compile of the UNet in place (hooks and attribute access keep working).
        `channels_last`: the UNet's weights in NHWC order (no gain measured on the CPU; for GPUs see
        tools/gpu_bench.sh).
        """
        if micro_batch is not None and micro_batch < 1:
            raise ModelLoadError(f"micro_batch must be at least 1, got {micro_batch}")
        self.micro_batch = micro_batch if micro_batch is not None else (4 if low_memory else None)
        self.offload = bool(low_memory)
        self.codec.offloaded = self.offload
        self.to(self.device)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if compile:
            self.unet.compile()
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (len(prompts), L, D); warns when a prompt is cut by the encoder's length."""
        max_len = min(int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings))
        for p in prompts:
            n = len(self.tokenizer(p, truncation=False).input_ids)
            if n > max_len:
                log.warning("prompt %r is %d tokens; the text encoder keeps only %d", p, n, max_len)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        )
        with visiting(self.text_encoder, self.device, self.offload):
            out = self.text_encoder(tokens.input_ids.to(self.device))
            hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
            return hidden.to(self.dtype)

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Noise prediction in float32, converting v-prediction models (eps = a v + s z_t).

        With `micro_batch` the batch goes through the UNet in slices: each sample's prediction
        depends on that sample alone (GroupNorm and attention are per sample), so the result is
        the one call's up to float rounding, at the memory of a slice.
        """
        k = self.micro_batch or z_t.shape[0]
        parts = [self.unet(z.to(self.dtype), tt, encoder_hidden_states=e).sample
                 for z, tt, e in zip(z_t.split(k), t.split(k), embeddings.split(k))]
        out = (parts[0] if len(parts) == 1 else torch.cat(parts)).float()
        if self.prediction_type == "epsilon":
            return out
        if self.prediction_type == "v_prediction":
            a, s = alpha_sigma(self.alphas_cumprod, t, z_t.ndim)
            return a * out + s * z_t.float()
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alphabar_t) and sqrt(1 - alphabar_t), shaped to broadcast over a batch of latents."""
    ab = alphas_cumprod.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))
    return ab.sqrt(), (1 - ab).sqrt()


# loading ------------------------------------------------------------------------------------


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA and float32 on CPU.

    Not bfloat16: DDS follows small differences between two noise predictions, and one step's
    gradient in bf16 is 8x further from float32 than in fp16 (relative error 0.19 against 0.023
    on the SD 1.5 architecture, 0.061 against 0.0085 on the bundled model; tools/precision_check.py).
    The reference runs fp16 autocast on CUDA too.
    """
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _from_pretrained(cls: Any, source: str, subfolder: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError, RuntimeError) as e:
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
    return (f"the weights in '{Path(source) / subfolder}' are corrupted or incomplete ({why}); "
            "download the model again (an interrupted copy leaves a truncated .safetensors file)")


def _load_failure(source: str, subfolder: str, kwargs: dict, e: Exception, first: str) -> str:
    """Say which of the usual causes it is: pickle-only weights, a config that does not fit the
    weights, a damaged file, a missing component, or a hub id that cannot be reached."""
    folder = Path(source) / subfolder
    if not Path(source).exists():
        return (f"could not load {source!r} from the Hugging Face hub (offline, or no such model); "
                f"download the model once and pass the local folder with --model /path/to/model ({first})")
    if isinstance(e, RuntimeError):
        mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), first)
        return (f"the weights in '{folder}' do not fit its config.json ({mismatch[:300]}); the config was edited "
                "or belongs to another model: restore the config.json saved with these weights")
    pickles = sorted(f.name for f in folder.glob("*") if f.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if kwargs.get("use_safetensors") and pickles:
        return (f"'{folder}' holds only pickle weights ({', '.join(pickles)}); gas-edit loads .safetensors only, "
                "because loading a pickle can run code. Convert the model to safetensors (save_pretrained), "
                "or pass --allow_pickle_weights true if you trust where it came from")
    if "Unable to load weights" in first or "header" in first.lower():
        return _corrupted(source, subfolder, first)
    return f"the folder {source!r} has no loadable '{subfolder}/' component ({type(e).__name__}: {first})"


def _model_index(source: str, local_files_only: bool) -> dict:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(source, local_files_only=local_files_only)
    except (OSError, ValueError, EnvironmentError) as e:
        if Path(source).exists():
            raise ModelLoadError(
                f"{source!r} is not a diffusers model folder (no readable model_index.json); "
                "save the model with save_pretrained or point --model at the folder that holds unet/, text_encoder/ ..."
            ) from None
        from gas_lightning.io import looks_like_path

        if looks_like_path(source):
            raise ModelLoadError(
                f"--model {source!r}: no such folder; pass the folder that holds unet/, text_encoder/ ... "
                "(a diffusers save_pretrained layout), or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
            ) from None
        raise ModelLoadError(
            f"could not reach model {source!r} (offline, or no such hub id): {type(e).__name__}. "
            "Pass a local folder with --model /path/to/model (a diffusers save_pretrained layout)."
        ) from None


def _check_components(model: str, index: dict) -> None:
    """A local folder must hold every component model_index.json names; say which are missing at once."""
    if not Path(model).is_dir():
        return
    needed = ["unet", "text_encoder", "tokenizer", "scheduler"] + (["vae"] if (index.get("vae") or [None])[0] else [])
    missing = [c for c in needed if not (Path(model) / c).is_dir()]
    if missing:
        raise ModelLoadError(
            f"the model folder {model!r} lacks {', '.join(m + '/' for m in missing)}; copy the whole model "
            "(every folder model_index.json names), e.g. with `hf download MODEL_ID --local-dir FOLDER`"
        )


def set_attention(unet: nn.Module, backend: str) -> str:
    """Select the attention kernel; returns the backend actually in use.

    `auto` uses xformers when it imports and the UNet is on CUDA, PyTorch SDPA otherwise.
    Asking for `xformers` where it cannot run falls back to SDPA with a warning rather than
    failing the edit: both compute the same attention.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    if backend not in ATTENTION_BACKENDS:
        raise ModelLoadError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    on_cuda = next(unet.parameters()).device.type == "cuda"
    have_xformers = importlib.util.find_spec("xformers") is not None
    if backend in ("auto", "xformers") and have_xformers and on_cuda:
        try:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as e:  # xformers built for another torch/CUDA fails here, not at import
            log.warning("xformers could not be enabled (%s: %s); using PyTorch SDPA", type(e).__name__, e)
    elif backend == "xformers":
        why = "it is not installed (pip install 'gas-lightning[xformers]')" if not have_xformers else "it needs CUDA"
        log.warning("attention backend 'xformers' requested but %s; using PyTorch SDPA", why)
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def load_backbone(
    model: str,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    attention: str = "auto",
    local_files_only: bool | None = None,
    allow_pickle_weights: bool = False,
    compile: bool = False,
    low_memory: bool = False,
    micro_batch: int | None = None,
) -> Backbone:
    """Load UNet, text encoder, tokenizer, scheduler constants and (if present) the VAE.

    Weights are read from .safetensors only unless `allow_pickle_weights` (a pickle can run code).
    `compile`, `low_memory` and `micro_batch`: see `Backbone.tune`.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    model = os.fspath(model)
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    torch_dtype = resolve_dtype(dtype, device)
    kw = {"local_files_only": local_files_only}
    weights = {**kw, "use_safetensors": None if allow_pickle_weights else True}
    index = _model_index(model, local_files_only)
    _check_components(model, index)

    unet = _from_pretrained(UNet2DConditionModel, model, "unet", torch_dtype=torch_dtype, **weights)
    text_encoder = _from_pretrained(CLIPTextModel, model, "text_encoder", dtype=torch_dtype, **weights)
    tokenizer = _from_pretrained(AutoTokenizer, model, "tokenizer", **kw)
    scheduler = _from_pretrained(DDPMScheduler, model, "scheduler", **kw)
    vae_entry = index.get("vae")
    if vae_entry and vae_entry[0] is not None:
        codec: LatentCodec = VaeCodec(_from_pretrained(AutoencoderKL, model, "vae", torch_dtype=torch_dtype, **weights))
    else:
        codec = IdentityCodec()

    for net in (unet, text_encoder, codec):
        net.requires_grad_(False).eval()
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"{model!r} uses prediction_type={prediction_type!r}; only epsilon and v_prediction are supported")
    backbone = Backbone(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        codec=codec,
        alphas_cumprod=scheduler.alphas_cumprod.float().clone(),
        prediction_type=prediction_type,
        attention="sdpa",
        source=model,
    ).to(device)
    backbone.attention = set_attention(unet, attention)
    backbone.tune(compile=compile, low_memory=low_memory, micro_batch=micro_batch)
    log.info("loaded %s (%s, %s, attention=%s)", model, prediction_type, torch_dtype, backbone.attention)
    return backbone
