"""The frozen text-to-image model as score distillation sees it: codec, conditioning, noise prediction.

One class per model family (SD 1/2, SDXL): each turns prompts into a `PromptEmbeddings` object
and knows how its UNet takes it, so guidance/ never branches on the family. A pixel-space
model (no VAE, such as the bundled shapes model) is a first-class case through an identity
codec. Loading from folders, hub ids and single files is in loading.py.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gas_lightning.errors import ModelLoadError

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


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
    """Latent diffusion: z = (VAE mean - shift) * scale, as in Stable Diffusion.

    Runs in the VAE's own dtype with autocast off: the SDXL VAE is kept in float32 because it
    overflows in float16, and a surrounding fp16 autocast would undo that.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        with torch.autocast(param.device.type, enabled=False), visiting(self.vae, image.device, self.offloaded):
            posterior = self.vae.encode(image.to(param.dtype)).latent_dist
            return ((posterior.mean - self.shift) * self.scale).float()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        with torch.autocast(param.device.type, enabled=False), visiting(self.vae, latent.device, self.offloaded):
            image = self.vae.decode((latent / self.scale + self.shift).to(param.dtype)).sample
            return image.float().clamp(-1, 1)


@dataclass(frozen=True, eq=False)
class PromptEmbeddings:
    """The text conditioning of a batch of prompts, in the form the backbone's UNet takes it.

    `hidden` (B, L, D) feeds cross-attention; `pooled` (B, P) is SDXL's pooled text embedding
    (None for SD 1/2). Guidance code only batches, slices and moves these objects, so the
    schedules do not depend on the model family.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    @classmethod
    def of(cls, value: PromptEmbeddings | torch.Tensor) -> PromptEmbeddings:
        """A bare (B, L, D) tensor is an SD-style conditioning without pooled embeddings."""
        return value if isinstance(value, PromptEmbeddings) else cls(value)

    @classmethod
    def cat(cls, items: Sequence[PromptEmbeddings | torch.Tensor]) -> PromptEmbeddings:
        items = [cls.of(x) for x in items]
        pooled = [x.pooled for x in items]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ValueError("cannot concatenate prompt embeddings with and without pooled embeddings")
        return cls(torch.cat([x.hidden for x in items]), None if pooled[0] is None else torch.cat(pooled))

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> PromptEmbeddings:
        """Rows of the batch; an integer keeps the batch axis (one prompt is a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return PromptEmbeddings(self.hidden[index], None if self.pooled is None else self.pooled[index])

    def expand(self, n: int) -> PromptEmbeddings:
        """A batch of one repeated n times (a view, no copy)."""
        return PromptEmbeddings(
            self.hidden.expand(n, -1, -1), None if self.pooled is None else self.pooled.expand(n, -1)
        )

    def to(self, *args: Any, **kwargs: Any) -> PromptEmbeddings:
        return PromptEmbeddings(
            self.hidden.to(*args, **kwargs), None if self.pooled is None else self.pooled.to(*args, **kwargs)
        )

    def zeros_like(self) -> PromptEmbeddings:
        return PromptEmbeddings(
            torch.zeros_like(self.hidden), None if self.pooled is None else torch.zeros_like(self.pooled)
        )

    @property
    def device(self) -> torch.device:
        return self.hidden.device


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: bool | str | None) -> str | None:
    """The torch.compile mode a `compile` setting asks for (None: eager)."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value not in COMPILE_MODES:
        raise ModelLoadError(f"compile must be true, false or one of {', '.join(COMPILE_MODES)}; got {value!r}")
    return value


def apply_tuning(backbone: Any, net: nn.Module, compile: bool | str, low_memory: bool, micro_batch: int | None) -> None:
    """Micro-batching, offloading and torch.compile of `net` (the denoiser): what every family's `tune` shares."""
    if micro_batch is not None and micro_batch < 1:
        raise ModelLoadError(f"micro_batch must be at least 1, got {micro_batch}")
    backbone.micro_batch = micro_batch if micro_batch is not None else (4 if low_memory else None)
    backbone.offload = bool(low_memory)
    backbone.codec.offloaded = backbone.offload
    backbone.to(backbone.device)
    mode = compile_mode(compile)
    if mode is not None and mode != backbone.compiled:
        # Static shapes: an edit's denoiser calls keep one batch size, and CUDA graphs need static
        # shapes; a batch job with another number of subtasks compiles once more (cached after).
        net.compile(mode=None if mode == "default" else mode, dynamic=False)
        backbone.compiled = mode


@dataclass
class Backbone:
    """The frozen networks of one diffusion model plus what guidance needs to know about it.

    This class is the Stable Diffusion 1.x/2.x family (one CLIP text encoder, its last hidden
    state); `SDXLBackbone` adds SDXL's second encoder and added conditioning. Only the backbone
    knows how its family's UNet is called: guidance goes through `denoise`/`predict_eps`.
    """

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    codec: LatentCodec
    alphas_cumprod: torch.Tensor  # (T,), float32
    prediction_type: str  # "epsilon" | "v_prediction"
    attention: str  # the attention backend that is in use
    source: str  # id or path it was loaded from
    config_source: str | None = None  # the --model_config folder of a single-file checkpoint
    micro_batch: int | None = None  # most samples per UNet call; None: the whole batch in one call
    offload: bool = False  # text encoders and VAE wait on the CPU, visiting the UNet's device when used
    compiled: str | None = None  # the torch.compile mode the UNet was compiled with (None: not compiled)

    family = "sd"

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

    def frozen_networks(self) -> list[nn.Module]:
        return [self.unet, self.text_encoder, self.codec]

    def to(self, device: torch.device | str) -> Backbone:
        self.unet.to(device)
        for net in self.frozen_networks():
            if net is not self.unet:
                net.to("cpu" if self.offload else device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def tune(
        self,
        compile: bool | str = False,
        low_memory: bool = False,
        micro_batch: int | None = None,
        channels_last: bool = False,
    ) -> Backbone:
        """Speed and memory switches that leave the results unchanged (up to float rounding).

        `low_memory`: UNet calls of at most `micro_batch` (default 4, the sequential schedule's call
        size) samples, and the text encoder and VAE kept on the CPU between uses. Attention is not
        sliced: SDPA and xformers already run attention without the (tokens x tokens) matrix.
        `compile`: torch.compile of the UNet in place (hooks and attribute access keep working); True
        is torch's "default" mode, or one of COMPILE_MODES ("reduce-overhead" adds CUDA graphs). Asking
        again for the mode in use does nothing, so the edits of a batch share one compilation.
        `channels_last`: the UNet's weights in NHWC order (no gain measured on the CPU; for GPUs see
        tools/bench/gpu_bench.sh).
        """
        apply_tuning(self, self.unet, compile, low_memory, micro_batch)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        return self

    def _tokens(self, tokenizer: Any, encoder: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids padded to the encoder's length; warns when a prompt is cut."""
        max_len = min(int(tokenizer.model_max_length), int(encoder.config.max_position_embeddings))
        for p in prompts:
            n = len(tokenizer(p, truncation=False).input_ids)
            if n > max_len:
                log.warning("prompt %r is %d tokens; the text encoder keeps only %d", p, n, max_len)
        tokens = tokenizer(
            list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        )
        return tokens.input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """The text encoder's last hidden state for each prompt, as SD 1/2 pipelines use it."""
        with visiting(self.text_encoder, self.device, self.offload):
            out = self.text_encoder(self._tokens(self.tokenizer, self.text_encoder, prompts))
            hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
            return PromptEmbeddings(hidden.to(self.dtype))

    def null_embeddings(self) -> PromptEmbeddings:
        """The unconditional ("null text") conditioning of classifier-free guidance."""
        return self.encode_prompts([""])

    def added_cond_kwargs(self, cond: PromptEmbeddings, z_t: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Extra UNet conditioning beside the token embeddings; SD 1/2 has none."""
        return None

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: PromptEmbeddings | torch.Tensor) -> torch.Tensor:
        """The raw UNet output (model dtype) for noisy latents `z_t` at timesteps `t` under `cond`.

        With `micro_batch` the batch goes through the UNet in slices: each sample's prediction
        depends on that sample alone (GroupNorm and attention are per sample), so the result is
        the one call's up to float rounding, at the memory of a slice.
        """
        cond = PromptEmbeddings.of(cond)
        k = self.micro_batch or z_t.shape[0]
        parts = []
        for start in range(0, z_t.shape[0], k):
            z, c = z_t[start : start + k], cond[start : start + k]
            extra = self.added_cond_kwargs(c, z)
            kwargs = {} if extra is None else {"added_cond_kwargs": extra}
            parts.append(
                self.unet(z.to(self.dtype), t[start : start + k], encoder_hidden_states=c.hidden, **kwargs).sample
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def predict_eps(
        self, z_t: torch.Tensor, t: torch.Tensor, embeddings: PromptEmbeddings | torch.Tensor
    ) -> torch.Tensor:
        """Noise prediction in float32, converting v-prediction models (eps = a v + s z_t)."""
        out = self.denoise(z_t, t, embeddings).float()
        if self.prediction_type == "epsilon":
            return out
        if self.prediction_type == "v_prediction":
            a, s = alpha_sigma(self.alphas_cumprod, t, z_t.ndim)
            return a * out + s * z_t.float()
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")


@dataclass
class SDXLBackbone(Backbone):
    """SDXL: two CLIP text encoders and the size/crop micro-conditioning (StableDiffusionXLPipeline's conventions).

    Token embeddings are both encoders' penultimate hidden states joined on the last axis; the
    pooled embedding is the second encoder's projected output. `time_ids` are
    original_size + crop top-left + target_size; an edit is neither cropped nor rescaled in the
    model's eyes, so both sizes are the working size (read off the latent) and the crop is (0, 0).
    """

    text_encoder_2: nn.Module = None  # type: ignore[assignment]
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True  # the pipeline's null text is all-zero embeddings

    family = "sdxl"

    def frozen_networks(self) -> list[nn.Module]:
        return [*super().frozen_networks(), self.text_encoder_2]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            with visiting(encoder, self.device, self.offload):
                out = encoder(self._tokens(tokenizer, encoder, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (B, projection_dim)
        return PromptEmbeddings(torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype))

    def null_embeddings(self) -> PromptEmbeddings:
        emb = self.encode_prompts([""])
        return emb.zeros_like() if self.force_zeros_for_empty_prompt else emb

    def time_ids(self, height: int, width: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """(batch, 6): original (h, w), crop top-left (0, 0), target (h, w), in pixels."""
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=self.device)
        return ids.expand(batch, -1)

    def added_cond_kwargs(self, cond: PromptEmbeddings, z_t: torch.Tensor) -> dict[str, torch.Tensor]:
        if cond.pooled is None:
            raise ValueError("SDXL needs pooled text embeddings; encode prompts with this backbone's encode_prompts")
        h, w = (int(v) * self.codec.downscale for v in z_t.shape[-2:])
        return {"text_embeds": cond.pooled, "time_ids": self.time_ids(h, w, z_t.shape[0], cond.pooled.dtype)}


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alphabar_t) and sqrt(1 - alphabar_t), shaped to broadcast over a batch of latents."""
    ab = alphas_cumprod.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))
    return ab.sqrt(), (1 - ab).sqrt()


def resolve_dtype(dtype: str, device: str | torch.device, family: str = "sd") -> torch.dtype:
    """The weights' dtype. 'auto' is float32 on the CPU; on CUDA float32 for SD 1.x/2.x, float16 for SDXL and
    SD3 (FlowEdit runs SD3 in float16) and bfloat16 for FLUX (diffusers' FLUX dtype: float16 overflows there).

    SD 1.x/2.x as the reference: float32 weights, the DDS UNet call in fp16 under the trainer's
    `16-mixed` autocast, and the VAE and the preserve-form (CDS) forward and backward in float32
    (guidance runs CDS with autocast off), so CDS's small gradients do not underflow. SDXL's UNet
    is 2.6B parameters (10 GB in float32): it keeps float16 weights, and CDS there runs under a
    loss scale (guidance/dds.py, `CDS_HALF_LOSS_SCALE`).
    Not bfloat16: DDS follows small differences between two noise predictions, and one step's
    gradient in bf16 is 8x further from float32 than in fp16 (relative error 0.19 against 0.023
    on the SD 1.5 architecture, 0.061 against 0.0085 on the bundled model; tools/bench/precision_check.py).
    """
    if dtype == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        return {"sdxl": torch.float16, "sd3": torch.float16, "flux": torch.bfloat16}.get(family, torch.float32)
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


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
