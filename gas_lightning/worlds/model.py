"""The bundled pixel-space text-to-image model: architecture and diffusers-format folder.

The shipped folder looks like a Stable Diffusion pipeline without a VAE (unet/, text_encoder/,
tokenizer/, scheduler/, model_index.json), so the engine loads it with the same code path and
treats the missing VAE as an identity codec: the latent is the image scaled to [-1, 1].

The UNet adds an attention-pooled text embedding to the time embedding
(`addition_embed_type="text"`). It still reads the prompt only from `encoder_hidden_states`, so
callers use the ordinary `unet(x, t, encoder_hidden_states=...)`, but every pixel is conditioned
on the prompt, which is what makes whole-image attributes (the background) reliable.
"""

from __future__ import annotations

import json
from pathlib import Path

from gas_lightning.worlds.vocab import MAX_LENGTH, write_tokenizer

MODEL_DIR = Path(__file__).resolve().parent / "assets" / "shapes-model"  # same as gas_lightning.worlds.MODEL_DIR
"""Where the trained model ships inside the package."""

IMAGE_SIZE = 32
TEXT_HIDDEN = 128


def text_encoder_config(vocab_size: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def build_unet(
    channels: tuple[int, int, int] = (32, 64, 64),
    sample_size: int = IMAGE_SIZE,
    in_channels: int = 3,
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim: int = 4,
):
    """The worlds' UNet; the defaults are the pixel model's, the latent model passes its own layout."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(channels),
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=attention_head_dim,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=True,
    )


def build_all(tokenizer_dir: str | Path, channels: tuple[int, int, int] = (32, 64, 64)):
    """Fresh (untrained) tokenizer, text encoder, UNet and scheduler."""
    from transformers import CLIPTextModel, CLIPTokenizer

    write_tokenizer(tokenizer_dir)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    text = CLIPTextModel(text_encoder_config(len(tok), tok.bos_token_id, tok.eos_token_id))
    return tok, text, build_unet(channels), build_scheduler()


def save_folder(folder: str | Path, tokenizer, text_encoder, unet, scheduler) -> Path:
    """Write the diffusers-format model folder (safetensors weights, no VAE)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer", config=False)  # vocab.json + merges.txt for older transformers
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "GasPixelDiffusion",
        "_diffusers_version": __import__("diffusers").__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "vae": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def load_folder(folder: str | Path = MODEL_DIR):
    """(tokenizer, text_encoder, unet, scheduler) from a saved folder, in eval mode."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    text = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    sched = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    return tok, text, unet, sched


def encode(tokenizer, text_encoder, prompts: list[str]):
    """Prompt embeddings exactly as in training: padded to model_max_length, no attention mask."""
    import torch

    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def sample_images(
    tokenizer,
    text_encoder,
    unet,
    scheduler,
    prompts: list[str],
    steps: int = 50,
    guidance: float = 6.0,
    seed: int = 0,
    batch_size: int = 64,
    vae=None,
):
    """Text-to-image with DDIM and classifier-free guidance; uint8 (N, H, W, 3) numpy array.
    With a `vae` (the latent world) the samples are latents, decoded at the end."""
    import numpy as np
    import torch
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        cond = encode(tokenizer, text_encoder, chunk)
        uncond = encode(tokenizer, text_encoder, [""]).expand_as(cond)
        x = torch.randn(len(chunk), unet.config.in_channels, size, size, generator=gen)
        ddim.set_timesteps(steps)
        with torch.no_grad():
            for t in ddim.timesteps:
                eps = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                e0, ec = eps.chunk(2)
                x = ddim.step(e0 + guidance * (ec - e0), t, x).prev_sample
            if vae is not None:
                x = vae.decode(x / vae.config.scaling_factor).sample
        img = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        out.append(img)
    return np.concatenate(out)
