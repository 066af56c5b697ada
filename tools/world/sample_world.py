"""Sample accuracy of a shapes-world model: does it draw what the caption says?

    python tools/world/sample_world.py --model gas_lightning/worlds/assets/shapes-model --n 96
    python tools/world/sample_world.py --model gas-lightning:shapes-latent --n 96 --steps 20 --guidance 4
    python tools/world/sample_world.py --model results/flow_world/snapshot --n 48 --steps 28 --guidance 4

Draws N single-object captions ("a red circle on snow"), balanced over colours, shapes and
backgrounds, samples them with DDIM (the flow twin: Euler steps on its time grid) and classifier-free guidance, and reads every sample with
the world's nearest-named-colour logic: object colour (majority over object-coloured pixels),
shape (fill ratio of the largest component of that colour) and background (majority over
background-coloured pixels). Prints the rates and, with --json, writes them; --grid saves the
samples as an image.

Two readings, because training uses partial captions: "a red circle on snow" is also the caption
of a scene that holds a red circle among other objects, so a well-trained model may draw extra
objects for it. The strict reading (colour, shape, all) takes the majority object colour of the
whole sample, so any extra object can win it; the "present" reading asks whether the named object
is drawn: a component of the named colour (at least 2% of the image) whose largest component has
the named shape. `extra_objects` is the fraction of samples with more than one object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gas_lightning.loading import load_backbone
from gas_lightning.resolve import resolve_bundled
from gas_lightning.worlds import flow_model, latent_model
from gas_lightning.worlds.grounder import classify_shape, components
from gas_lightning.worlds.model import MODEL_DIR, load_folder, sample_images
from gas_lightning.worlds.scenes import BACKGROUNDS, COLOURS, PALETTE, SHAPES, nearest_colour_names

N_OBJ = len(COLOURS)


def read_sample(img: np.ndarray) -> dict:
    """What a sample shows: its main object colour and shape, and its background."""
    labels = nearest_colour_names(img, PALETTE)
    obj = labels[labels < N_OBJ]
    bg = labels[labels >= N_OBJ]
    out = {"colour": None, "shape": None, "background": None, "colours": {}, "objects": 0}
    if bg.size:
        out["background"] = list(BACKGROUNDS)[int(np.bincount(bg - N_OBJ, minlength=len(BACKGROUNDS)).argmax())]
    comps = [components(labels == k) for k in range(N_OBJ)]
    if obj.size >= 0.02 * labels.size:
        k = int(np.bincount(obj, minlength=N_OBJ).argmax())
        out["colour"] = list(COLOURS)[k]
        out["shape"] = classify_shape(max(comps[k], key=len))
    for k, name in enumerate(COLOURS):
        large = [c for c in comps[k] if len(c) >= 0.02 * labels.size]
        if large:
            out["colours"][name] = classify_shape(max(large, key=len))
            out["objects"] += len(large)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=str(MODEL_DIR), help="a world model folder or gas-lightning:NAME (a latent one has vae/)"
    )
    ap.add_argument("--n", type=int, default=96, help="number of captions (balanced over the world)")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument(
        "--guidance",
        type=float,
        default=2.0,
        help="CFG scale; above ~3, or with many steps, the pixel-space samples overshoot (see the model card)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the rates to this file")
    ap.add_argument("--grid", default=None, help="save the samples as a grid image (PNG)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng([args.seed, 424242])
    combos = list(itertools.product(COLOURS, SHAPES, BACKGROUNDS))
    order = rng.permutation(len(combos))
    picks = [combos[order[i % len(combos)]] for i in range(args.n)]
    prompts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s} on {b}" for c, s, b in picks]

    t0 = time.time()
    folder = Path(resolve_bundled(args.model))
    if (folder / "transformer").is_dir():  # the flow twin (SD3 layout): Euler steps on its own time grid
        backbone = load_backbone(str(folder), device="cpu", attention="sdpa")
        images = flow_model.sample_images(backbone, prompts, steps=args.steps, guidance=args.guidance, seed=args.seed)
    else:
        parts = latent_model.load_folder(folder) if (folder / "vae").is_dir() else (*load_folder(folder), None)
        images = sample_images(
            *parts[:4],
            prompts,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            vae=parts[4],
            batch_size=16 if parts[4] is not None else 64,
        )
    seconds = time.time() - t0
    reads = [read_sample(im) for im in images]
    rates = {
        "colour": float(np.mean([r["colour"] == c for r, (c, s, b) in zip(reads, picks)])),
        "shape": float(np.mean([r["shape"] == s for r, (c, s, b) in zip(reads, picks)])),
        "background": float(np.mean([r["background"] == b for r, (c, s, b) in zip(reads, picks)])),
        "all": float(np.mean([(r["colour"], r["shape"], r["background"]) == p for r, p in zip(reads, picks)])),
        "colour_present": float(np.mean([c in r["colours"] for r, (c, s, b) in zip(reads, picks)])),
        "shape_present": float(np.mean([r["colours"].get(c) == s for r, (c, s, b) in zip(reads, picks)])),
        "all_present": float(
            np.mean([r["colours"].get(c) == s and r["background"] == b for r, (c, s, b) in zip(reads, picks)])
        ),
        "extra_objects": float(np.mean([r["objects"] > 1 for r in reads])),
        "n": args.n,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "seconds": round(seconds, 1),
        "model": args.model,
    }
    print(json.dumps(rates, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(rates, indent=2) + "\n")
    if args.grid:
        cols = 12
        rows = (len(images) + cols - 1) // cols
        s = images.shape[1]
        grid = np.zeros((rows * (s + 2), cols * (s + 2), 3), dtype=np.uint8)
        for i, im in enumerate(images):
            r, c = divmod(i, cols)
            grid[r * (s + 2) : r * (s + 2) + s, c * (s + 2) : c * (s + 2) + s] = im
        zoom = max(1, 128 // s)
        Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(args.grid)
    return rates


if __name__ == "__main__":
    main()
