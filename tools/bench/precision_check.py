"""How far one step's Ground-A-Score gradient moves when the UNet runs in half precision.

    python tools/bench/precision_check.py                       # bundled model + SD 1.5 architecture, CPU
    python tools/bench/precision_check.py --arch sd15 --device cuda --resolution 512

DDS is driven by small differences between two noise predictions (target text on the edited
latent minus source text on the source latent), so rounding that is harmless for sampling can
matter here. For each precision the same batched gradient (same z, z_src, t, noise, terms) is
computed and compared with float32: cosine similarity and relative L2 error, median over
timesteps. Precisions: `bf16` / `fp16` weights (what `--dtype` does), and `bf16-autocast` /
`fp16-autocast` (float32 weights under torch.autocast: the reference's way on CUDA, and what
`--trainer.precision bf16-mixed` / `16-mixed` does).

The SD 1.5 architecture is built from its published UNet config with random weights (no
download): enough for arithmetic agreement, not for edit quality. Prompts are random embeddings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from gas_lightning.backbone import Backbone, IdentityCodec
from gas_lightning.guidance import GroundedScoreGuidance, GuidanceConfig, Term
from gas_lightning.loading import load_backbone
from gas_lightning.masks import subtask_masks
from gas_lightning.testing import SD15_UNET

BOXES = [(0.30, 0.45, 0.65, 0.95), (0.0, 0.70, 1.0, 1.0), (0.05, 0.05, 0.60, 0.55)]
PRECISIONS = ("bf16", "bf16-autocast", "fp16", "fp16-autocast")


def sd15_backbone(device: str) -> tuple[Backbone, int]:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    bb = Backbone(
        unet=unet,
        text_encoder=torch.nn.Identity(),
        tokenizer=None,
        codec=IdentityCodec(),
        alphas_cumprod=sched.alphas_cumprod.float(),
        prediction_type="epsilon",
        attention="sdpa",
        source="sd15-architecture (random weights)",
    )
    return bb.to(device), 768


def bundled_backbone(device: str) -> tuple[Backbone, int]:
    from gas_lightning.worlds import MODEL_DIR

    bb = load_backbone(str(MODEL_DIR), device=device, dtype="float32", attention="sdpa")
    return bb, int(bb.text_encoder.config.hidden_size)


def gradient(bb: Backbone, precision: str, inputs: dict, t: int) -> torch.Tensor:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision.split("-")[0]]
    autocast = precision.endswith("autocast")
    bb.unet.to(torch.float32 if autocast else dtype)
    ctx = torch.autocast(bb.device.type, dtype=dtype) if autocast else contextlib.nullcontext()
    terms = [
        Term(name=f"t{k}", src_emb=s.to(bb.dtype), tgt_emb=g.to(bb.dtype), mask=m, weight=1.0)
        for k, (s, g, m) in enumerate(zip(inputs["src"], inputs["tgt"], inputs["masks"]))
    ]
    guidance = GroundedScoreGuidance(bb, GuidanceConfig(), null_embedding=inputs["null"].to(bb.dtype))
    with ctx:
        grad, _ = guidance.batched_gradient(inputs["z"], inputs["z_src"], terms, t, inputs["eps"])
    return grad.float()


def compare(bb: Backbone, dim: int, latent: int, timesteps: list[int], precisions: list[str]) -> dict:
    gen = torch.Generator().manual_seed(0)
    dev = bb.device
    channels = int(bb.unet.config.in_channels)
    z_src = torch.randn(1, channels, latent, latent, generator=gen).to(dev)
    inputs = {
        "z_src": z_src,
        "z": z_src + 0.1 * torch.randn(z_src.shape, generator=gen).to(dev),
        "eps": torch.randn(z_src.shape, generator=gen).to(dev),
        "null": torch.randn(1, 77, dim, generator=gen).to(dev),
        "src": [torch.randn(1, 77, dim, generator=gen).to(dev) for _ in BOXES],
        "tgt": [torch.randn(1, 77, dim, generator=gen).to(dev) for _ in BOXES],
        "masks": list(subtask_masks(BOXES, latent, latent).to(dev)),
    }
    out: dict = {}
    for t in timesteps:
        ref = gradient(bb, "fp32", inputs, t)
        for p in precisions:
            g = gradient(bb, p, inputs, t)
            cos = torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0).item()
            rel = ((g - ref).norm() / ref.norm()).item()
            out.setdefault(p, []).append({"t": t, "cosine": cos, "relative_error": rel})
    summary = {}
    for p, rows in out.items():
        cos = sorted(r["cosine"] for r in rows)
        rel = sorted(r["relative_error"] for r in rows)
        summary[p] = {
            "cosine_median": cos[len(cos) // 2],
            "cosine_min": cos[0],
            "relative_error_median": rel[len(rel) // 2],
            "relative_error_max": rel[-1],
            "per_t": rows,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="bundled,sd15", help="comma list of bundled, sd15")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=256, help="SD 1.5 pixel resolution (latent = /8)")
    p.add_argument("--timesteps", default="100,300,500,700,900")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    timesteps = [int(v) for v in args.timesteps.split(",")]
    precisions = [v for v in args.precisions.split(",") if v]
    result = {"device": args.device, "timesteps": timesteps, "archs": {}}
    for arch in args.arch.split(","):
        if arch == "sd15":
            bb, dim = sd15_backbone(args.device)
            latent = args.resolution // 8
        else:
            bb, dim = bundled_backbone(args.device)
            latent = int(bb.unet.config.sample_size)
        with torch.no_grad():
            result["archs"][arch] = {"latent": latent, **compare(bb, dim, latent, timesteps, precisions)}
        for prec, r in result["archs"][arch].items():
            if prec == "latent":
                continue
            print(
                f"{arch} {prec}: cosine median {r['cosine_median']:.5f} (min {r['cosine_min']:.5f}), "
                f"relative error median {r['relative_error_median']:.4f} (max {r['relative_error_max']:.4f})",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
