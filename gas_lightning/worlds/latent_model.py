"""The bundled latent-space world model, laid out as a Stable Diffusion 1.x folder.

The pixel model (worlds.model) has no VAE, so it never exercises what users run on photos: VAE
encode/decode with a scaling factor, masks on a 1/8 grid, CDS on several up-block resolutions.
This model does: 128 px scenes, an AutoencoderKL with 8x downsampling and 4 latent channels
(16x16x4 latents), a UNet with cross-attention at 16x16 and 8x8, CLIP text encoder + tokenizer,
and SD 1.5's DDPM scheduler (scaled_linear, epsilon). It loads with the same from_pretrained
code as SD (gas_lightning.loading); the VAE's scaling_factor is measured on the world's images
(1 / std of the latents), as SD's 0.18215 was.
"""

from __future__ import annotations

import json
from pathlib import Path

from gas_lightning.errors import GasError
from gas_lightning.worlds import ASSETS_DIR
from gas_lightning.worlds import model as pixel_model

LATENT_MODEL_DIR = ASSETS_DIR / "shapes-latent-model"
"""Where the trained latent model ships inside the package (gas-lightning:shapes-latent)."""

IMAGE_SIZE = 128
LATENT_CHANNELS = 4
VAE_CHANNELS = (16, 32, 64, 64)  # four blocks: three downsamplings, 128 -> 16
UNET_CHANNELS = (64, 128, 128)


def build_vae(channels: tuple[int, ...] = VAE_CHANNELS, scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        mid_block_add_attention=False,  # flat scenes need no global mixing; halves the CPU cost
    )


def build_unet(channels: tuple[int, int, int] = UNET_CHANNELS):
    """Cross-attention at 16x16 and 8x8 on the way down and up (CDS hooks both up resolutions), as SD
    has it at its three finer resolutions; the text-pooled time embedding of the pixel model kept."""
    return pixel_model.build_unet(
        channels,
        sample_size=IMAGE_SIZE // 8,
        in_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )


def build_scheduler():
    """Stable Diffusion 1.5's training noise schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def save_folder(folder: str | Path, tokenizer, text_encoder, unet, scheduler, vae) -> Path:
    """Write the SD 1.x-layout folder: the pixel model's folder plus vae/ and SD's model_index.json."""
    folder = pixel_model.save_folder(folder, tokenizer, text_encoder, unet, scheduler)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(
        {
            "_class_name": "StableDiffusionPipeline",
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "gas_world": "shapes-latent",  # loading checks such folders for the measured vae scaling_factor
        }
    )
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def load_folder(folder: str | Path = LATENT_MODEL_DIR):
    """(tokenizer, text_encoder, unet, scheduler, vae) from a saved folder, in eval mode."""
    from diffusers import AutoencoderKL

    return (*pixel_model.load_folder(folder), AutoencoderKL.from_pretrained(str(Path(folder) / "vae")).eval())


def world_size(folder: str | Path) -> int:
    """The scene size (px) a world model folder draws: the UNet's (the flow twin's transformer's) sample size
    times the VAE's downsampling (1 without a VAE), read from the configs alone, before any weight is loaded."""
    folder = Path(folder)
    net = "transformer" if (folder / "transformer").is_dir() else "unet"
    unet = json.loads((folder / net / "config.json").read_text())
    vae = folder / "vae" / "config.json"
    factor = 2 ** (len(json.loads(vae.read_text())["block_out_channels"]) - 1) if vae.is_file() else 1
    return int(unet["sample_size"]) * factor


def check_scene_size(scene_size: int, model_size: int) -> None:
    """Scenes drawn smaller than the model's size would be upsampled into blurred edges the model never
    saw, and scored on a grid coarser than its own: refuse them."""
    if scene_size < model_size:
        raise GasError(
            f"scenes of {scene_size} px are smaller than this model's {model_size} px; draw the cases at "
            f"{model_size} px (leave --size out to use the model's size)"
        )
