"""Does the latent world's VAE keep the world exact? Round trip held-out scenes and score them.

    python tools/world/latent_vae_check.py --vae runs/latent_world/vae/ema-latest --cases 200 --seed 8

For the source scene of each held-out case (seed < 100: validation), decode(encode(x).mean) is
read as an image, as an edit that changed nothing would be: its PSNR against the scene, and the
exact scorer's verdict on a case with no change (every object must keep colour and shape, and
the ground its name). The codec must not flip verdicts, or edit scores measure the VAE.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from gas_lightning.worlds import held_out_cases, score
from gas_lightning.worlds.cases import make_case
from gas_lightning.worlds.scenes import BACKGROUNDS, PALETTE, nearest_colour_names


@torch.no_grad()
def round_trip(vae, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 decode(encode(x).mean), the latent path an edit takes."""
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 60.0 if mse == 0 else min(60.0, 10 * np.log10(255.0**2 / mse))


def check(vae, cases) -> dict:
    sources = np.stack([c.source_image for c in cases])
    decoded = round_trip(vae, sources)
    psnrs, kept, ground = [], [], []
    names = list(PALETTE)
    for case, img in zip(cases, decoded):
        unchanged = make_case(case.source, [])
        kept.append(score(img, unchanged)["preserved"] == 1.0)
        labels = nearest_colour_names(img, PALETTE)[~case.source.object_union]
        got = names[int(np.bincount(labels.ravel(), minlength=len(names)).argmax())]
        ground.append(got == case.source.background and got in BACKGROUNDS)
        psnrs.append(psnr(img, case.source_image))
    return {
        "cases": len(cases),
        "psnr_db_mean": float(np.mean(psnrs)),
        "psnr_db_std": float(np.std(psnrs)),
        "psnr_db_min": float(np.min(psnrs)),
        "objects_unchanged": float(np.mean(kept)),
        "ground_unchanged": float(np.mean(ground)),
        "all_unchanged": float(np.mean([k and g for k, g in zip(kept, ground)])),
    }


def main(argv=None) -> dict:
    from diffusers import AutoencoderKL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="a vae/ folder (AutoencoderKL), e.g. MODEL/vae")
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=8, help="held-out case seed; seeds >= 100 are kept for test runs")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    result = {
        **check(vae, held_out_cases(args.cases, seed=args.seed, size=args.size)),
        "seed": args.seed,
        "vae": args.vae,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
