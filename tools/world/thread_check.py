"""Does a world edit depend on the machine? Same case, seed and settings, run two ways, compared.

    python tools/world/thread_check.py --cases 2 --seed 2                      # 1 against 2 torch threads
    python tools/world/thread_check.py --cases 2 --seed 2 --compare isa        # this CPU's best kernels against AVX2

`--compare isa` runs each side in a child process with torch's, oneDNN's and MKL's instruction-set
ceilings set (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS): a machine with
AVX-512 computes the edit as one with AVX2 only would, which is how a verdict's dependence on the
CPU can be checked on one machine. Each child reports the capability torch actually used.

Prints, per case, the largest pixel difference between the two edited images and both runs' verdicts.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_world as ew  # noqa: E402

from gas_lightning.worlds import MODEL_DIR, held_out_cases, score  # noqa: E402

ISA_CEILINGS = {  # name -> the environment that caps every CPU kernel library torch uses at it
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def edit_images(a, threads: int) -> list[np.ndarray]:
    import torch

    from gas_lightning.loading import load_backbone

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    bb = load_backbone(str(MODEL_DIR), device="cpu", attention="sdpa")
    args = argparse.Namespace(
        seed=a.seed,
        loss_scale=2000.0,
        lr=0.2,
        steps=a.steps,
        lr_schedule="cosine",
        lr_final=0.0,
        accelerator="cpu",
        guidance_scale=12.5,
        wide_guidance_scale=None,
        masks=None if a.masks == "none" else a.masks,
    )
    return [ew.edit_case(bb, case, ew.METHODS[a.method], args)[0] for case in held_out_cases(a.cases, seed=a.seed)]


def isa_side(a, name: str, out: Path) -> tuple[list[np.ndarray], str]:
    """One side of `--compare isa`, in a child whose CPU kernels are capped at `name`."""
    env = {**os.environ, **ISA_CEILINGS[name]}
    cmd = [
        sys.executable,
        __file__,
        "--cases",
        str(a.cases),
        "--seed",
        str(a.seed),
        "--method",
        a.method,
        "--steps",
        str(a.steps),
        "--masks",
        a.masks,
        "--save",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"thread_check: the {name} run failed:\n{proc.stderr[-2000:]}")
    saved = np.load(out)
    return [saved[k] for k in sorted(k for k in saved.files if k.startswith("case"))], str(saved["capability"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--method", default="gas", choices=sorted(ew.METHODS))
    p.add_argument("--steps", type=int, default=150, help="the preset's 150 unless a quick check needs fewer")
    p.add_argument(
        "--masks",
        default="same_outline",
        choices=["none", "all", "same_outline"],
        help="as eval_world --masks (default: the preset's same_outline)",
    )
    p.add_argument("--compare", default="threads", choices=["threads", "isa"])
    p.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)  # a child of --compare isa
    a = p.parse_args(argv)
    if a.save is not None:
        import torch

        images = edit_images(a, threads=1)
        np.savez(
            a.save,
            capability=torch.backends.cpu.get_cpu_capability(),
            **{f"case{i:04d}": img for i, img in enumerate(images)},
        )
        return 0
    if a.compare == "threads":
        sides = {"1_thread": edit_images(a, 1), "2_threads": edit_images(a, 2)}
        capabilities = {}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {name: isa_side(a, name, Path(tmp) / f"{name}.npz") for name in ISA_CEILINGS}
        sides = {name: images for name, (images, _) in runs.items()}
        capabilities = {name: cap for name, (_, cap) in runs.items()}
    (na, first), (nb, second) = sides.items()
    for case, x, y in zip(held_out_cases(a.cases, seed=a.seed), first, second):
        diff = np.abs(x.astype(int) - y.astype(int))
        sx, sy = score(x, case), score(y, case)
        print(
            json.dumps(
                {
                    "compare": a.compare,
                    **({"capability": capabilities} if capabilities else {}),
                    "max_pixel_diff": int(diff.max()),
                    "mean_pixel_diff": float(diff.mean()),
                    f"verdicts_{na}": [v["ok"] for v in sx["attributes"]],
                    f"verdicts_{nb}": [v["ok"] for v in sy["attributes"]],
                    "preserved": [sx["preserved"], sy["preserved"]],
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
