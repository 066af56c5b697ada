"""Does a world edit depend on the number of torch threads? Same case, seed and settings, 1 and 2 threads.

    python tools/thread_check.py --cases 2 --seed 2

Prints, per case, the largest pixel difference between the two edited images and both runs' verdicts.
"""

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_world as ew  # noqa: E402

from gas_lightning.backbone import load_backbone  # noqa: E402
from gas_lightning.worlds import MODEL_DIR, held_out_cases, score  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--method", default="gas", choices=sorted(ew.METHODS))
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    bb = load_backbone(str(MODEL_DIR), device="cpu", attention="sdpa")
    args = argparse.Namespace(seed=a.seed, loss_scale=2000.0, lr=0.2, steps=150, lr_schedule="cosine", lr_final=0.0,
                              accelerator="cpu", guidance_scale=12.5, wide_guidance_scale=None)
    for case in held_out_cases(a.cases, seed=a.seed):
        images = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            images[threads], _ = ew.edit_case(bb, case, ew.METHODS[a.method], args)
        diff = np.abs(images[1].astype(int) - images[2].astype(int))
        s1, s2 = score(images[1], case), score(images[2], case)
        print(json.dumps({"max_pixel_diff": int(diff.max()), "mean_pixel_diff": float(diff.mean()),
                          "verdicts_1_thread": [x["ok"] for x in s1["attributes"]],
                          "verdicts_2_threads": [x["ok"] for x in s2["attributes"]],
                          "preserved": [s1["preserved"], s2["preserved"]]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
