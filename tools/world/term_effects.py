"""Which guidance term moved each object of a shapes-world edit, and how far.

    python tools/world/term_effects.py --seed 3 --case 1 --methods gas --masks same_outline

With plain SGD the finished latent is the source latent plus the sum of every step's
-lr * loss_scale * gradient, and each step's gradient is the sum of its terms' gradients. So the
edit splits exactly into one change per term; this prints, for every object of the case (its
source pixels) and for the background, the mean RGB change (0..255 units) each term made, beside
the source and finished colours. It is how the "objects erased into the background" failures were
traced (docs/world_eval.md): a background term acting on a recoloured object's pixels, or an object
term at high noise painting its own object with the surrounding ground. Pixel-space models only
(the bundled world); the preserve-form (CDS) part of a term is not split out. `--by_t 200` splits
each term's change further by its drawn timestep, beside the text gaps on both branches.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_world  # noqa: E402

from gas_lightning.backbone import IdentityCodec  # noqa: E402
from gas_lightning.loading import load_backbone  # noqa: E402
from gas_lightning.worlds import MODEL_DIR, held_out_cases, score  # noqa: E402


def attach(module, by_t: dict | None = None, bin_width: int = 200) -> dict[str, torch.Tensor]:
    """Hooks on one ready edit: returns the dict that fills with each term's summed update of the latent.

    `by_t` (a dict, filled in place) also splits each term's update by its drawn timestep, in bins of
    `bin_width`: {(name, first t of the bin): [update, target gaps, source gaps]}, where a gap is the
    text's effect on the prediction inside the term's region, mean |e(z_t, null) - e(z_t, text)| per
    masked element, on the current latent with the target text and on the source with the source text.
    """
    effects: dict[str, torch.Tensor] = {}
    step: dict[str, list[tuple[int, torch.Tensor]]] = {}
    dds, training_step = module.guidance._dds, module.training_step

    def gap(e0, ec, mask):  # the guidance's own gap, per masked element
        return float(module.guidance._gap(e0, ec, mask) / (mask.sum() * e0.shape[1]).clamp_min(1e-12))

    def recording_dds(term, t, e0_src, e0_tgt, ec_src, ec_tgt):
        grad, log = dds(term, t, e0_src, e0_tgt, ec_src, ec_tgt)
        step.setdefault(term.name, []).append((int(t), grad.detach().clone()))
        if by_t is not None:
            entry = by_t.setdefault((term.name, int(t) // bin_width * bin_width), [0, [], []])
            entry[1].append(gap(e0_tgt, ec_tgt, term.mask))
            entry[2].append(gap(e0_src, ec_src, term.mask))
        return grad, log

    def recording_step(batch, batch_idx):
        if (
            type(module.optimizers().optimizer) is not torch.optim.SGD
            or module.optimizers().param_groups[0]["momentum"]
        ):
            raise SystemExit(
                "term_effects needs plain SGD (no momentum): only then is the edit a sum of the steps' gradients"
            )
        lr = module.optimizers().param_groups[0]["lr"]
        step.clear()
        out = training_step(batch, batch_idx)
        for name, grads in step.items():
            effects[name] = effects.get(name, 0) - lr * module.loss_scale * torch.stack([g for _, g in grads]).sum(0)
            if by_t is not None:
                for t, g in grads:
                    by_t[(name, t // bin_width * bin_width)][0] -= lr * module.loss_scale * g
        return out

    module.guidance._dds = recording_dds
    module.training_step = recording_step
    return effects


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--case", type=int, default=0)
    p.add_argument("--methods", default="gas", help=f"one of {', '.join(eval_world.METHODS)}")
    p.add_argument("--masks", default=None, choices=["all", "same_outline"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument(
        "--by_t",
        type=int,
        default=None,
        metavar="WIDTH",
        help="also split each term's change by its drawn timestep in bins of WIDTH, with the text gaps "
        "(target text on the current latent / source text on the source) inside the term's region",
    )
    a = p.parse_args(argv)
    if a.methods not in eval_world.METHODS:
        p.error(f"unknown method {a.methods!r}; choose from {', '.join(eval_world.METHODS)}")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    # every other edit setting as eval_world has it (the preset's lr, schedule and guidance)
    args = eval_world.parser().parse_args(
        ["--seed", str(a.seed), "--steps", str(a.steps), "--model", a.model] + (["--masks", a.masks] if a.masks else [])
    )
    backbone = load_backbone(a.model, device="cpu", attention="sdpa")
    if not isinstance(backbone.codec, IdentityCodec):
        raise SystemExit("term_effects reads latents as pixels: it needs a pixel-space model such as the bundled one")
    case = held_out_cases(a.case + 1, seed=a.seed)[a.case]
    method = eval_world.METHODS[a.methods]
    module, callbacks = eval_world.case_module(backbone, case, method, args)
    by_t: dict | None = {} if a.by_t else None
    effects = attach(module, by_t, a.by_t or 200)
    image, _ = eval_world.edit_case(backbone, case, method, args, ready=(module, callbacks))
    result = score(image, case)
    print(f"seed {a.seed} case {a.case}: {case.request}")
    print(
        "  "
        + "; ".join(
            f"{x['kind']} {x['requested']}: {x['got']} ({'ok' if x['ok'] else 'wrong'})" for x in result["attributes"]
        )
    )
    src = case.source_image.astype(np.float64)
    regions = [
        (
            f"object {i}: {o.colour} {o.shape} -> {case.target.objects[i].colour} {case.target.objects[i].shape}",
            case.source.mask(i) > 0.5,
        )
        for i, o in enumerate(case.source.objects)
    ]
    regions.append((f"background: {case.source.background} -> {case.target.background}", ~case.source.object_union))
    for label, m in regions:
        print(f"{label}\n  source {src[m].mean(0).round()}  finished {image[m].astype(np.float64).mean(0).round()}")
        for name, delta in effects.items():
            rgb = delta[0].permute(1, 2, 0).cpu().numpy() * 127.5  # latents are pixels in [-1, 1]
            print(f"    {name:40s} {rgb[m].mean(0).round(1)}")
            for (n, lo), (delta_t, tgt_gaps, src_gaps) in sorted((by_t or {}).items()):
                if n == name and np.abs(rgb[m].mean(0)).max() >= 0.05:  # terms that touch this region
                    part = delta_t[0].permute(1, 2, 0).cpu().numpy() * 127.5
                    print(
                        f"      t {lo:4d}-{lo + a.by_t - 1:4d} ({len(tgt_gaps):3d} draws) {part[m].mean(0).round(1)}"
                        f"  text gap {np.mean(tgt_gaps):.4f} target / {np.mean(src_gaps):.4f} source"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
