"""Does a keep term pull its object back toward the source? Its gradient inside its own mask, beside an
overlapping edit term's, at a finished edit's latent.

    python tools/world/keep_pull.py --edit outputs/latent-no-whole-scene --keep_guidance_scale 1

Reads an edit's output folder (config.yaml's model, guidance and image, plan.json with its masks,
latent.pt) and, at latents between the source and the edit's result, averages each term's DDS
gradient over `--draws` noise draws per timestep. For the keep term it reports the gradient's norm in
the keep mask, the share of it that points from the latent back to the source (the projection of
minus the gradient on z_src - z, over the norm) and its cosine with the edit term that overlaps it
most. A keep term holds its object when that share is clearly positive at every timestep.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from PIL import Image

from gas_lightning.guidance import GuidanceConfig
from gas_lightning.guidance.dds import shielded_term
from gas_lightning.loading import load_backbone
from gas_lightning.pipeline import build_edit
from gas_lightning.plan import EditPlan
from gas_lightning.resolve import resolve_bundled


def pull(guidance, z, z_src, term, t: int, draws: int, gen: torch.Generator) -> torch.Tensor:
    """The term's gradient at z, averaged over `draws` noise draws at timestep t."""
    total = torch.zeros_like(z)
    for _ in range(draws):
        eps = torch.randn(z.shape, generator=gen)
        total += guidance.term_gradient(z, z_src, term, t, eps)[0]
    return total / draws


def measure(edit_dir: Path, keep_scale: float | None, draws: int, timesteps, fractions) -> list[dict]:
    config = yaml.safe_load((edit_dir / "config.yaml").read_text())
    guidance = {k: v for k, v in (config.get("guidance") or {}).items() if k != "cds"}
    if keep_scale is not None:
        guidance["keep_guidance_scale"] = keep_scale
    cfg = GuidanceConfig(**guidance)
    backbone = load_backbone(resolve_bundled(config["model"]))
    image = Image.open(resolve_bundled(config["image"])).convert("RGB")
    module = build_edit(backbone, image, EditPlan.load(edit_dir / "plan.json"), guidance_config=cfg)
    terms, z_src = module.terms, module.z_src
    z_end = torch.load(edit_dir / "latent.pt")["latent"].to(z_src.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k, keep in enumerate(terms):
        if not keep.keep:
            continue
        other = shielded_term(terms, k)
        inside = (keep.mask > 0.5).float()
        for fraction in fractions:
            z = z_src + fraction * (z_end - z_src)
            back = (z_src - z) * inside
            for t in timesteps:
                g_keep = pull(module.guidance, z, z_src, keep, t, draws, gen) * inside
                g_other = pull(module.guidance, z, z_src, terms[other], t, draws, gen) * inside
                norm = float(g_keep.norm())
                rows.append(
                    {
                        "keep": keep.name,
                        "beside": terms[other].name,
                        "fraction": fraction,
                        "t": t,
                        "keep_norm": norm,
                        "beside_norm": float(g_other.norm()),
                        "toward_source": float((-g_keep * back).sum() / (back.norm() * norm + 1e-12)),
                        "cosine": float((g_keep * g_other).sum() / (norm * g_other.norm() + 1e-12)),
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--edit", type=Path, required=True, help="an edit's output folder (config.yaml, plan.json, latent.pt)"
    )
    p.add_argument(
        "--keep_guidance_scale", type=float, default=None, help="the keep terms' CFG (default: the config's)"
    )
    p.add_argument("--draws", type=int, default=8, help="noise draws averaged per timestep")
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0], help="of the way from source to result")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    missing = [n for n in ("config.yaml", "plan.json", "latent.pt") if not (args.edit / n).is_file()]
    if missing:
        raise SystemExit(f"{args.edit} is not a finished edit's folder: no {', '.join(missing)}")
    torch.set_num_threads(args.threads)
    rows = measure(args.edit, args.keep_guidance_scale, args.draws, args.timesteps, args.fractions)
    for r in rows:
        print(
            f"{r['keep']} at {r['fraction']:.2f} of the way, t={r['t']:3d}: norm {r['keep_norm']:.2e} "
            f"(beside {r['beside']}: {r['beside_norm']:.2e}), toward the source {r['toward_source']:+.2f}, "
            f"cosine {r['cosine']:+.2f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
