"""Load time and peak memory of a Stable Diffusion 1.5-sized model folder, in a fresh process.

Why: diffusers reads weights with `low_cpu_mem_usage` only when `accelerate` is installed, and
otherwise prints a hint on every load. This measures what that hint is worth on the published SD 1.5
architecture (random weights, no download), so the choice to depend on accelerate or not rests on a
number. `--write` saves the folder once; each `--load` run is its own process, so the peak resident
set size is the load's alone.

    python tools/bench/load_check.py --write runs/sd15-random
    python tools/bench/load_check.py --load runs/sd15-random --json runs/load.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path


def write_folder(folder: Path) -> None:
    """The SD 1.5 architecture with random float32 weights, saved by diffusers' own pipeline."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from gas_lightning.testing import ARCHITECTURES, write_char_clip_tokenizer

    spec = ARCHITECTURES["sd15"]
    torch.manual_seed(0)
    clip = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with tempfile.TemporaryDirectory() as tmp:
        write_char_clip_tokenizer(Path(tmp), max_length=77)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    StableDiffusionPipeline(
        unet=UNet2DConditionModel(**spec["unet"]),
        vae=AutoencoderKL(**spec["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**clip, **spec["text"])),
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)


def load(folder: Path) -> dict:
    """Seconds and peak RSS of one `load_backbone` of the folder, imports excluded."""
    import torch  # noqa: F401  (imported before the clock and the RSS baseline)

    from gas_lightning.loading import load_backbone

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    backbone = load_backbone(str(folder), device="cpu", dtype="float32", attention="sdpa")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    params = sum(p.numel() for p in backbone.unet.parameters())
    return {
        "accelerate": importlib.util.find_spec("accelerate") is not None,
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(peak / 1024),
        "rss_before_mib": round(before / 1024),
        "unet_params": params,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="save the random SD 1.5 folder here")
    parser.add_argument("--load", type=Path, help="load this folder once and report seconds and peak RSS")
    parser.add_argument("--json", type=Path, help="append the load's result to this file (one JSON per line)")
    args = parser.parse_args(argv)
    if not (args.write or args.load):
        parser.error("give --write FOLDER or --load FOLDER")
    if args.write:
        write_folder(args.write)
    if args.load:
        result = load(args.load)
        print(json.dumps(result))
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
