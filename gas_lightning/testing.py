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
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
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
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
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
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        **config,
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
    text = dict(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, **text)).save_pretrained(folder / "text_encoder")
    CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=48, intermediate_size=96, projection_dim=24, **text)
    ).save_pretrained(folder / "text_encoder_2")
    time_embed_dim = 8
    UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=32 + 48,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=24 + 6 * time_embed_dim,  # pooled + 6 time ids
    ).save_pretrained(folder / "unet")
    EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
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


# Published Stable Diffusion architectures, built with random weights (no download): enough for
# timing, memory and arithmetic checks (tools/bench/benchmark.py, tools/bench/precision_check.py), not for edits.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
ARCHITECTURES = {
    "sd15": {  # CLIP ViT-L/14 text encoder, epsilon prediction, 512 px
        "unet": SD15_UNET,
        "vae": {**SD_VAE, "sample_size": 512},
        "prediction_type": "epsilon",
        "text": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            hidden_act="quick_gelu",
        ),
    },
    "sd21": {  # OpenCLIP ViT-H text encoder, v-prediction, 768 px
        "unet": {
            **SD15_UNET,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae": {**SD_VAE, "sample_size": 768},
        "prediction_type": "v_prediction",
        "text": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
            projection_dim=512,
        ),
    },
    "sdxl": {  # SDXL base 1.0: CLIP ViT-L + OpenCLIP bigG (pooled, projected), size/crop conditioning, 1024 px
        "unet": dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=1280 + 6 * 256,
        ),
        "vae": {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "prediction_type": "epsilon",
        "text": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            hidden_act="quick_gelu",
        ),
        "text_2": dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            hidden_act="gelu",
            projection_dim=1280,
        ),
    },
}
GROUPS = 32  # the SD norm_num_groups: every scaled width stays a multiple of it


def _scaled(channels: tuple[int, ...], width_mult: float) -> tuple[int, ...]:
    return tuple(max(GROUPS, round(c * width_mult / GROUPS) * GROUPS) for c in channels)


def _scaled_heads(heads: int | tuple[int, ...], channels: tuple[int, ...]) -> tuple[int, ...]:
    """Keep each block's head count where it still divides the narrower width, else 64-wide heads."""
    heads = heads if isinstance(heads, tuple) else (heads,) * len(channels)
    return tuple(h if c % h == 0 else max(1, c // 64) for h, c in zip(heads, channels))


def build_arch_backbone(
    arch: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    width_mult: float = 1.0,
    seed: int = 0,
):
    """A Backbone with a published architecture's UNet, VAE and text encoder(s), random weights.

    `width_mult` < 1 narrows the UNet and VAE channels (multiples of 32, same depth, blocks and
    attention layout), so a CPU can run an SD-shaped network; 1 is the published size. The text
    encoders keep their published sizes (they run once per edit). The tokenizers are the character
    tokenizer above with the 77-token context.
    """
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from gas_lightning.backbone import Backbone, SDXLBackbone, VaeCodec, set_attention
    from gas_lightning.errors import GasError

    if arch not in ARCHITECTURES:
        raise GasError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if not 0 < width_mult <= 1:
        raise GasError(f"width_mult must be in (0, 1], got {width_mult}")
    spec = ARCHITECTURES[arch]
    unet_cfg = dict(spec["unet"])
    vae_cfg = dict(spec["vae"])
    if width_mult != 1:
        unet_cfg["block_out_channels"] = _scaled(unet_cfg["block_out_channels"], width_mult)
        unet_cfg["attention_head_dim"] = _scaled_heads(unet_cfg["attention_head_dim"], unet_cfg["block_out_channels"])
        vae_cfg["block_out_channels"] = _scaled(vae_cfg["block_out_channels"], width_mult)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_char_clip_tokenizer(Path(tmp), max_length=77)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    clip = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device(device):  # initialised where it runs: the published UNets have 0.9-2.6B parameters
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**clip, **spec["text"]))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip, **spec["text_2"])) if "text_2" in spec else None
    for net in (unet, vae, text, text_2):
        if net is not None:
            net.to(dtype).requires_grad_(False).eval()
    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=spec["prediction_type"],
    )
    common = dict(
        unet=unet,
        text_encoder=text,
        tokenizer=tokenizer,
        codec=VaeCodec(vae),
        alphas_cumprod=sched.alphas_cumprod.float().clone(),
        prediction_type=spec["prediction_type"],
        attention="sdpa",
        source=f"{arch} architecture x{width_mult:g} (random weights)",
    )
    if text_2 is None:
        backbone = Backbone(**common)
    else:
        backbone = SDXLBackbone(**common, text_encoder_2=text_2, tokenizer_2=tokenizer)
    backbone.to(device)
    backbone.attention = set_attention(unet, "auto")
    return backbone


def _tiny_t5(folder: Path, vocab_size: int, d_model: int) -> None:
    """A one-layer random T5 encoder (the third text encoder of SD3, the second of FLUX)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    T5EncoderModel(cfg).save_pretrained(folder)


def _tiny_clip(folder: Path, vocab_size: int, hidden: int, projection: int | None, max_length: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection or hidden,
    )
    (CLIPTextModel if projection is None else CLIPTextModelWithProjection)(cfg).save_pretrained(folder)


def build_tiny_sd3(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD3-layout model: the folders and classes of stabilityai/stable-diffusion-3-medium-diffusers
    (transformer, vae, two CLIPs with projection, T5, their tokenizers, a FlowMatchEulerDiscreteScheduler with
    shift 3). The CLIPs are 16 and 24 wide and T5 48, so the joined CLIP states are zero-padded (40 -> 48) as in
    the real model. The tokenizers are character-level CLIP tokenizers (the T5 one included): no download."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    for name, length in (("tokenizer", 16), ("tokenizer_2", 16), ("tokenizer_3", 24)):
        write_char_clip_tokenizer(folder / name, length)
    vocab = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))
    _tiny_clip(folder / "text_encoder", vocab, 16, 8, 16)
    _tiny_clip(folder / "text_encoder_2", vocab, 24, 8, 16)
    _tiny_t5(folder / "text_encoder_3", vocab, 48)
    SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 2,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=16,
    ).save_pretrained(folder / "transformer")
    # no attention in the VAE's mid-block (the real one has it): a decoded pixel then depends mostly on nearby
    # latents (GroupNorm still couples all of them), so a test can see which part of the image an edit moved
    _tiny_vae(scaling_factor=1.5305, shift_factor=0.0609, mid_block_add_attention=False).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(folder / "scheduler")
    encoders = ["CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    _write_flow_index(folder, "StableDiffusion3Pipeline", "SD3Transformer2DModel", encoders)
    return folder


def build_tiny_flux(folder: str | Path, dev: bool = True, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1-layout model (black-forest-labs/FLUX.1-dev's folders and classes; `dev=False`:
    schnell's, without the guidance embedding and with its unshifted scheduler). 4 latent channels packed 2x2
    into 16-wide tokens; CLIP 16 wide (pooled), T5 32 wide; character-level tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    write_char_clip_tokenizer(folder / "tokenizer", 16)
    write_char_clip_tokenizer(folder / "tokenizer_2", 24)
    vocab = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))
    _tiny_clip(folder / "text_encoder", vocab, 16, None, 16)
    _tiny_t5(folder / "text_encoder_2", vocab, 32)
    FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=dev,
        axes_dims_rope=(2, 2, 4),
    ).save_pretrained(folder / "transformer")
    _tiny_vae(scaling_factor=0.3611, shift_factor=0.1159, mid_block_add_attention=False).save_pretrained(folder / "vae")
    shifting = (
        dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        if dev
        else dict(shift=1.0, use_dynamic_shifting=False)
    )
    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, base_image_seq_len=256, max_image_seq_len=4096, **shifting
    ).save_pretrained(folder / "scheduler")
    _write_flow_index(folder, "FluxPipeline", "FluxTransformer2DModel", ["CLIPTextModel", "T5EncoderModel"])
    return folder


def _write_flow_index(folder: Path, pipeline: str, transformer: str, encoders: list[str]) -> None:
    """model_index.json of a flow model: its transformer, VAE, scheduler, and one character-level CLIP tokenizer per
    text encoder (the real models' T5 tokenizer is a T5TokenizerFast)."""
    index = {
        "_class_name": pipeline,
        "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", transformer],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    for i, encoder in enumerate(encoders):
        suffix = "" if i == 0 else f"_{i + 1}"
        index[f"text_encoder{suffix}"] = ["transformers", encoder]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
