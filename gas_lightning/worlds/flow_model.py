"""The rectified-flow twin of the latent world, laid out as a Stable Diffusion 3 folder.

The grounded flow solver (guidance/flow.py) is otherwise only ever run with tiny random weights. This
twin lets it be scored on the shapes world: the latent world's VAE (16x16x4 latents of 128 px scenes),
an SD3Transformer2DModel trained with flow matching on those latents, SD3's three text encoders and
SD3's scheduler config (FlowMatchEulerDiscreteScheduler, shift 3), loaded by the same code as SD3
(gas_lightning.flow_loading).

The text side is the latent world's fine-tuned CLIP, twice (SD3's CLIP-L and CLIP-G slots, each with an
identity projection so the pooled embedding is CLIP's own), and a small T5 encoder with fixed random
weights, frozen: the world's captions need no third encoder, but SD3's conditioning layout (both CLIPs'
states zero-padded to T5's width, then T5's tokens) does. All three use the world's tokenizer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

T5_WIDTH = 256  # at least both CLIPs' widths together (2 x 128): their states are zero-padded to it
TRANSFORMER_LAYERS = 6
TRANSFORMER_HEADS = 4
HEAD_DIM = 32
SHIFT = 3.0  # SD3's scheduler config, kept as the latent world keeps SD 1.5's noise schedule


def build_transformer(
    layers: int = TRANSFORMER_LAYERS, heads: int = TRANSFORMER_HEADS, head_dim: int = HEAD_DIM, clip_width: int = 128
):
    """An SD3 MMDiT on 16x16x4 latents (2x2 patches: 64 image tokens)."""
    from diffusers import SD3Transformer2DModel

    from gas_lightning.worlds.latent_model import IMAGE_SIZE, LATENT_CHANNELS

    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * clip_width,
        pos_embed_max_size=IMAGE_SIZE // 16,
    )


def build_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def clip_with_projection(text_encoder):
    """The world's CLIPTextModel as SD3's CLIPTextModelWithProjection, the projection the identity."""
    import torch
    from transformers import CLIPTextModelWithProjection

    cfg = text_encoder.config
    cfg.projection_dim = cfg.hidden_size
    model = CLIPTextModelWithProjection(cfg)
    inner = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 flattened CLIPTextModel
    model.text_model.load_state_dict(inner.state_dict())
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(cfg.hidden_size))
    return model.eval()


def build_t5(vocab_size: int, seed: int = 0):
    """A one-layer T5 encoder with fixed random weights (seeded): SD3's third text encoder, frozen."""
    import torch
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=32, d_ff=512, num_layers=1, num_heads=4)
        return T5EncoderModel(cfg).eval()


def save_folder(folder: str | Path, tokenizer, clip, t5, transformer, scheduler, vae) -> Path:
    """Write the SD3-layout folder (StableDiffusion3Pipeline's model_index.json and components)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "_2", "_3"):
        shutil.rmtree(folder / f"tokenizer{suffix}", ignore_errors=True)
        tokenizer.save_pretrained(str(folder / f"tokenizer{suffix}"))
    for name in ("text_encoder", "text_encoder_2"):
        clip.save_pretrained(str(folder / name), safe_serialization=True)
    t5.save_pretrained(str(folder / "text_encoder_3"), safe_serialization=True)
    transformer.save_pretrained(str(folder / "transformer"), safe_serialization=True)
    scheduler.save_pretrained(str(folder / "scheduler"))
    vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "gas_world": "shapes-flow",  # loading checks such folders for the measured vae scaling_factor
    }
    for suffix, encoder in (
        ("", "CLIPTextModelWithProjection"),
        ("_2", "CLIPTextModelWithProjection"),
        ("_3", "T5EncoderModel"),
    ):
        index[f"text_encoder{suffix}"] = ["transformers", encoder]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def sample_images(
    backbone, prompts: list[str], steps: int = 28, guidance: float = 4.0, seed: int = 0, batch_size: int = 16
):
    """Text-to-image with Euler steps along the model's own time grid and classifier-free guidance, as SD3's
    pipeline samples; uint8 (N, H, W, 3) numpy array of the decoded samples."""
    import numpy as np
    import torch

    size = int(backbone.transformer.config.sample_size)
    channels = int(backbone.transformer.config.in_channels)
    grid = backbone.time_grid(steps, (size, size))
    gen = torch.Generator().manual_seed(seed)
    null = backbone.null_embeddings()
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        n = len(chunk)
        cond = backbone.encode_prompts(chunk)
        both = type(cond).cat([type(cond)(null.hidden.expand(n, -1, -1), null.pooled.expand(n, -1)), cond])
        z = torch.randn(n, channels, size, size, generator=gen)
        with torch.no_grad():
            for t, t_next in zip(grid[:-1], grid[1:]):
                v_null, v_text = backbone.velocity(torch.cat([z, z]), t.repeat(2 * n), both).chunk(2)
                z = z + (t_next - t) * (v_null + guidance * (v_text - v_null))
            x = backbone.codec.decode(z)
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)
