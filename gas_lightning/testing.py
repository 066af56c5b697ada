"""Tiny random Stable Diffusion and SDXL layout models for tests and smoke runs.

No weights can be downloaded in CI, so tests write a randomly initialised model folder with
`save_pretrained` and load it back through `load_backbone`, exercising the real loading path.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TINY_RESOLUTION = 32


def write_char_clip_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A CLIP BPE tokenizer whose vocabulary is single characters (no merges): any ASCII text encodes."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,'-!?")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)


def build_tiny_sd(
    folder: str | Path,
    prediction_type: str = "epsilon",
    with_vae: bool = True,
    seed: int = 0,
) -> Path:
    """Write a tiny random SD-style model (unet, text_encoder, tokenizer, scheduler[, vae]) to `folder`."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    max_length = 16
    write_char_clip_tokenizer(folder / "tokenizer", max_length)
    vocab_size = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))
    text_cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    CLIPTextModel(text_cfg).save_pretrained(folder / "text_encoder")
    latent_channels = 4 if with_vae else 3
    vae_factor = 2 if with_vae else 1
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // vae_factor,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        # attention only at the lower resolution keeps a 32x32 pixel-space model cheap on CPU
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type=prediction_type,
    ).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "vae": [None, None],
    }
    if with_vae:
        _tiny_vae().save_pretrained(folder / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _tiny_vae(**config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=TINY_RESOLUTION, **config,
    )


def build_tiny_sdxl(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny random SDXL-layout model to `folder`: the folders and classes of
    stabilityai/stable-diffusion-xl-base-1.0 (unet, vae, text_encoder, text_encoder_2, tokenizer,
    tokenizer_2, scheduler, model_index.json), at sizes a CPU runs in milliseconds.

    The two encoders have different widths (32 and 48, as CLIP-L and bigG differ), so the joined
    token embeddings (80) and the pooled one (the second encoder's 24-wide projection) cannot be
    confused; the UNet takes them with addition_embed_type="text_time".
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    max_length = 16
    for name in ("tokenizer", "tokenizer_2"):
        write_char_clip_tokenizer(folder / name, max_length)
    vocab_size = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))
    text = dict(vocab_size=vocab_size, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, **text)).save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, intermediate_size=96, projection_dim=24, **text)
                                ).save_pretrained(folder / "text_encoder_2")
    time_embed_dim = 8
    UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=32 + 48, attention_head_dim=(2, 4),
        use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=24 + 6 * time_embed_dim,  # pooled + 6 time ids
    ).save_pretrained(folder / "unet")
    EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    _tiny_vae(scaling_factor=0.13025, force_upcast=True).save_pretrained(folder / "vae")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.30.0",
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": None,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
