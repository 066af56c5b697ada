"""Score editing methods on held-out shapes-world cases, side by side, same seeds and step budget.

    python tools/world/eval_world.py --cases 50 --seed 0 --json results.json --figure world_eval.png

Every method edits every case with the same model, seed, step budget, optimiser and lr schedule
(defaults: configs/shapes.yaml's 150 steps of SGD from lr 0.2, cosine decay); only the guidance
differs. "dds" is full-prompt Delta Denoising Score (one term: whole source caption ->
whole target caption, no mask); "gas" is Ground-A-Score, batched schedule; "gas_sequential" the
reference schedule, both with this world's tuned settings (see `Method`); "gas_reference" uses
docs/method.md's constants. Further methods are one-change ablations of gas. Boxes are the cases' exact
boxes, except "gas_grounded", which starts from the request text and the weight-free WorldGrounder.
With --masks every method with object subtasks edits inside the objects' soft masks, found in the
source image by the WorldGrounder as `--segmenter world` finds them, instead of their boxes; its
results are recorded as "METHOD+masks".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw

from gas_lightning.callbacks import NullTextPenalty
from gas_lightning.errors import GasError
from gas_lightning.guidance import GuidanceConfig
from gas_lightning.loading import load_backbone
from gas_lightning.pipeline import build_edit, tensor_to_image
from gas_lightning.plan import EditPlan, Subtask
from gas_lightning.resolve import resolve_bundled
from gas_lightning.solvers import build_solver_edit, natural_solver
from gas_lightning.worlds import MODEL_DIR, aggregate, held_out_cases, render_pil, score
from gas_lightning.worlds.cases import KINDS, EditCase
from gas_lightning.worlds.latent_model import check_scene_size, world_size

METRICS = (
    "per_attribute",
    "all_attributes",
    "colour",
    "shape",
    "background",
    "erosion",
    "bg_psnr_in_boxes",
    "psnr_outside",
    "psnr_outside_objects",
    "preserved",
    "seconds_per_edit",
)


@dataclass(frozen=True)
class Method:
    """How one method turns a case into an edit: plan, schedule, guidance settings, penalty.

    The defaults are this world's tuned Ground-A-Score (configs/shapes.yaml): keep subtasks for
    the objects that must not change, guidance --guidance_scale (12.5) for object boxes and 7.5
    for background-sized boxes, overlap weight 0.3, no whole-scene term, no null-text penalty
    (chosen on validation cases, --seed 1), keep-aware sampling (seed 2) and target balance
    (seed 5). "gas_reference" is the method with the reference's constants (docs/method.md, guidance 7.5), for
    comparison; "dds_7.5" is DDS at that guidance.
    """

    name: str
    schedule: str = "batched"
    full_prompt_only: bool = False  # plain DDS
    full_prompt: bool = False
    penalty: bool = False
    keep: bool = True
    overlap_weight: float = 0.3
    # the edit subtasks' target-text guidance raised to the source text's strength (GuidanceConfig.target_balance):
    # the preset's since 2026-12-06 (validation seed 5, test seeds 112-114); records of `gas` and its ablations
    # from before that date are without it, as `gas_unbalanced` is now
    target_balance: bool = True
    guidance_scale: float | None = None  # None: --guidance_scale
    wide_guidance_scale: float | None = 7.5
    preserve_form: bool = False
    grounded: bool = False  # boxes from the request text and the WorldGrounder instead of the case
    keep_unmentioned: bool = (
        False  # grounded: keep subtasks for the objects the request does not name (gas-edit's default)
    )
    shape_context: bool = (
        False  # shape changes name the ground around them: "a red square on snow" -> "a red triangle on sand"
    )
    # batched schedule's sampling, as configs/shapes.yaml: keep_aware (per-term draws, a keep term sharing the
    # draw of the edit around it), chosen on validation seed 2 over shared (docs/method.md) and per_term.
    batched_noise: str = "keep_aware"
    # dds: the DDS solver (UNet models); flow: grounded FlowEdit on the flow twin (SD3 layout), its steps
    # FlowEdit's grid (--flow_steps, --flow_n_max; SD3's published 50 and 33 by default), not --steps
    solver: str = "dds"

    def plan(self, case: EditCase) -> EditPlan:
        if self.full_prompt_only:
            whole = Subtask(source=case.source.caption, target=case.target.caption, box=(0.0, 0.0, 1.0, 1.0))
            return EditPlan(case.source.caption, case.target.caption, (whole,))
        if self.grounded:
            from gas_lightning.grounding import ground_plan
            from gas_lightning.planners import parse_request
            from gas_lightning.worlds.grounder import WorldGrounder

            plan = parse_request(case.request_text(keep=self.keep))
            plan = replace(plan, source_prompt=case.source.caption, target_prompt=case.target.caption)
            plan = ground_plan(plan, render_pil(case.source), WorldGrounder())
            if self.keep_unmentioned:
                from gas_lightning.resolve import keep_unmentioned

                plan = keep_unmentioned(plan, WorldGrounder().objects(render_pil(case.source)))
        else:
            plan = case.edit_plan(keep=self.keep)
        if self.preserve_form:
            # keep the form of edited objects whose shape is not requested to change
            subtasks = [
                replace(s, preserve_form=kind == "same_shape")
                for s, kind in zip(plan.subtasks, subtask_kinds(case, plan))
            ]
            plan = plan.replace_subtasks(subtasks)
        return plan

    def guidance(self, args) -> GuidanceConfig:
        wide = self.wide_guidance_scale
        if wide is not None and args.wide_guidance_scale is not None:
            wide = args.wide_guidance_scale
        scale = args.guidance_scale if self.guidance_scale is None else self.guidance_scale
        return GuidanceConfig(
            guidance_scale=scale,
            full_prompt=self.full_prompt,
            batched_noise=self.batched_noise,
            overlap_weight=self.overlap_weight,
            wide_guidance_scale=wide,
            target_balance=self.target_balance,
        )


def subtask_kinds(case: EditCase, plan: EditPlan) -> list[str | None]:
    """Per subtask of a case's plan (edited objects first, in case.edit_plan's order): "reshaped" for an
    object whose shape changes, "same_shape" for one that keeps it, None for the background and keeps."""
    reshaped, objs = {c.index for c in case.changes if c.kind == "shape"}, case.edited_objects
    return [
        None if k >= len(objs) else "reshaped" if objs[k] in reshaped else "same_shape"
        for k in range(len(plan.subtasks))
    ]


METHODS = {
    m.name: m
    for m in (
        Method("dds", full_prompt_only=True, keep=False, wide_guidance_scale=None, target_balance=False),
        Method(
            "dds_7.5",
            full_prompt_only=True,
            keep=False,
            guidance_scale=7.5,
            wide_guidance_scale=None,
            target_balance=False,
        ),
        Method("gas"),
        Method("gas_unbalanced", target_balance=False),  # the preset before 2026-12-06
        Method("gas_sequential", schedule="sequential"),
        Method("gas_per_term", batched_noise="per_term"),
        Method("gas_keep_aware", batched_noise="keep_aware"),
        Method("gas_shared", batched_noise="shared"),
        Method(
            "gas_reference",
            full_prompt=True,
            penalty=True,
            keep=False,
            guidance_scale=7.5,
            wide_guidance_scale=None,
            target_balance=False,
            batched_noise="shared",  # configs/sd15.yaml's (records before 2026-12-07 have keep_aware)
        ),
        Method("gas_no_keep", keep=False),
        Method("gas_no_wide", wide_guidance_scale=None),
        Method("gas_overlap_0.1", overlap_weight=0.1),
        Method("gas_full_prompt", full_prompt=True),
        Method("gas_penalty", penalty=True),
        Method("gas_target_balance", target_balance=True),  # = gas; the name its validation and test records carry
        Method("gas_preserve", preserve_form=True),
        Method("gas_grounded", grounded=True),
        Method("gas_grounded_keep_unmentioned", grounded=True, keep_unmentioned=True),
        Method("gas_shape_context", shape_context=True),
        # the flow twin (--model results/flow_world/snapshot): plain FlowEdit with the whole caption, and the
        # grounded flow solver with configs/sd3.yaml's constants (boxes, the whole-scene term, no keep subtasks),
        # and the same with the cases' keep subtasks
        Method("flowedit", solver="flow", full_prompt_only=True, keep=False, target_balance=False),
        Method("gas_flow_reference", solver="flow", full_prompt=True, keep=False, target_balance=False),
        Method("gas_flow_keep", solver="flow", full_prompt=True, target_balance=False),
        Method("gas_flow_keep_local", solver="flow", target_balance=False),  # without the whole-scene term
    )
}
DEFAULT_METHODS = ("dds", "gas", "gas_sequential")
MASK_TAGS = {"all": "masks", "same_outline": "masks_same_outline"}  # --masks SCOPE: the results' and jobs' suffix


def case_plan(case: EditCase, method: Method, args) -> EditPlan:
    """The plan a method edits (edit_case) and writes as a job (write_jobs); with --masks, soft masks."""
    plan = (replace(method, keep=False) if getattr(args, "requests", "case") == "user" else method).plan(case)
    if args.masks:
        from gas_lightning.grounding.segmenter import segment_plan
        from gas_lightning.worlds.grounder import WorldGrounder

        plan = segment_plan(plan, render_pil(case.source), WorldGrounder(), scope=args.masks)
    if method.shape_context:  # after segmenting: the grounder reads one object per phrase
        plan = plan.replace_subtasks(
            [
                replace(
                    s,
                    source=f"{s.source} on {case.source.background}",
                    target=f"{s.target} on {case.target.background}",
                )
                if kind == "reshaped"
                else s
                for s, kind in zip(plan.subtasks, subtask_kinds(case, plan))
            ]
        )
    return plan


def edit_seed(args, case: EditCase) -> int:
    """The seed of one case's edit (its timesteps and noise); --noise_seed N draws another set for the same case."""
    return (
        args.seed * 1000 + (case.seed or 0) + 1_000_000 * getattr(args, "noise_seed", 0)
    )  # tools with their own args: 0


def flow_config(args):
    """FlowEdit's settings of the flow methods: --flow_* where given, else the family's published ones."""
    from gas_lightning.guidance.flow import FlowConfig

    return FlowConfig(
        steps=args.flow_steps,
        n_max=args.flow_n_max,
        n_avg=args.flow_n_avg,
        source_guidance_scale=args.flow_source_guidance_scale,
        target_guidance_scale=args.flow_target_guidance_scale,
    )


def case_module(backbone, case: EditCase, method: Method, args):
    """The ready edit of one case (not yet run) and the callbacks its method needs."""
    if method.solver == "flow":
        module = build_solver_edit(
            backbone,
            render_pil(case.source),
            case_plan(case, method, args),
            solver="flow",
            guidance_config=method.guidance(args),
            flow_config=flow_config(args),
            schedule=method.schedule,
            seed=edit_seed(args, case),
        )
        return module, []
    module = build_edit(
        backbone,
        render_pil(case.source),
        case_plan(case, method, args),
        guidance_config=method.guidance(args),
        schedule=method.schedule,
        seed=edit_seed(args, case),
        loss_scale=args.loss_scale,
        optimizer=lambda params: torch.optim.SGD(params, lr=args.lr),
        lr_scheduler=scheduler_factory(args),
    )
    return module, [NullTextPenalty()] if method.penalty else []


def edit_case(backbone, case: EditCase, method: Method, args, ready=None) -> tuple[np.ndarray, float]:
    """Edit one case; `ready`: case_module's (module, callbacks) for it, e.g. with hooks attached."""
    module, callbacks = ready if ready is not None else case_module(backbone, case, method, args)
    trainer = L.Trainer(
        # FlowEdit: one step per grid step
        max_steps=module.guidance.config.n_max if method.solver == "flow" else args.steps,
        accelerator=args.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module)
    seconds = time.perf_counter() - start
    image = np.asarray(tensor_to_image(module.decode().cpu()))
    return image, seconds


def write_jobs(path: Path, numbered: list[tuple[int, EditCase]], names: list[str], args) -> None:
    """The cases as a `gas-edit batch` jobs file with edit_case's settings, one job per method and case
    (images and plans beside it), so a batch on many devices runs the same edits."""
    from dataclasses import asdict

    lines = []
    for name in names:
        method = METHODS[name]
        for k, case in numbered:
            job = f"{name}{'_' + MASK_TAGS[args.masks] if args.masks else ''}_s{args.seed}_c{k:03d}"
            image, plan = path.parent / "images" / f"s{args.seed}_c{k:03d}.png", path.parent / "plans" / f"{job}.json"
            image.parent.mkdir(parents=True, exist_ok=True)
            render_pil(case.source).save(image)
            case_plan(case, method, args).save(plan)
            sched = (
                None
                if args.lr_schedule == "constant"
                else {
                    "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                    "init_args": {"T_max": args.steps, "eta_min": args.lr * args.lr_final},
                }
            )
            lines.append(
                {
                    "name": job,
                    "image": f"images/{image.name}",
                    "plan": f"plans/{plan.name}",
                    "seed": edit_seed(args, case),
                    "schedule": method.schedule,
                    "loss_scale": args.loss_scale,
                    "resolution": None,
                    "guidance": asdict(method.guidance(args)),
                    "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": args.lr}},
                    "lr_scheduler": sched,
                    "trainer": {
                        "max_steps": args.steps,
                        "precision": "32-true",
                        "callbacks": [{"class_path": "gas_lightning.callbacks.NullTextPenalty"}]
                        if method.penalty
                        else [],
                    },
                }
            )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(
        f"{len(lines)} jobs: gas-edit batch --model {args.model} --attention sdpa --trainer.accelerator "
        f"{args.accelerator} --jobs {path} --output_dir runs/world_batch",
        file=sys.stderr,
    )


def scheduler_factory(args):
    """--lr_schedule cosine: torch's cosine decay over the step budget to --lr_final * lr."""
    if args.lr_schedule == "constant":
        return None
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=args.steps, eta_min=args.lr * args.lr_final
    )


def figure(rows: list[list[np.ndarray]], header: list[str], path: Path) -> None:
    scale = max(1, 128 // rows[0][0].shape[0])  # 32 px scenes shown 4x, the latent world's 128 px as they are
    size = rows[0][0].shape[0] * scale
    pad, top = 4, 14
    width = len(header) * (size + pad) + pad
    canvas = Image.new("RGB", (width, top + len(rows) * (size + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(header):
        draw.text((pad + j * (size + pad), 2), name, fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            tile = Image.fromarray(im).resize((size, size), Image.Resampling.NEAREST)
            canvas.paste(tile, (pad + j * (size + pad), top + i * (size + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def parser() -> argparse.ArgumentParser:
    """The command line; also the one source of the edit settings' defaults for tools that edit a case."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=50)
    p.add_argument(
        "--first_case",
        type=int,
        default=0,
        help="edit cases first_case..cases-1 only (to split one seed's cases over processes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--noise_seed",
        type=int,
        default=0,
        help="edit the same cases with another draw of timesteps and noise (0: the usual one); results are "
        "recorded as METHOD+noiseN, to measure how many verdicts flip by the draw alone",
    )
    p.add_argument(
        "--kinds",
        default=None,
        help="comma list of change kinds (colour, shape, background): edit only the cases that ask for one "
        "of them, for a study of those changes (the other cases' numbers stay unmeasured)",
    )
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument(
        "--model",
        default=str(MODEL_DIR),
        help="a world model folder or gas-lightning:NAME "
        "(shapes-model, the pixel world; shapes-latent, the latent world in SD's layout)",
    )
    p.add_argument("--size", type=int, default=None, help="scene size in px (default: the model's own, 32 or 128)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--lr_schedule", choices=("constant", "cosine"), default="cosine")
    p.add_argument("--lr_final", type=float, default=0.0, help="cosine: the last steps' lr as a fraction of --lr")
    p.add_argument("--loss_scale", type=float, default=2000.0)
    p.add_argument(
        "--flow_steps", type=int, default=None, help="flow methods: FlowEdit's grid (default: the family's, 50)"
    )
    p.add_argument(
        "--flow_n_max", type=int, default=None, help="flow methods: grid steps run (default: the family's, 33)"
    )
    p.add_argument("--flow_n_avg", type=int, default=1, help="flow methods: noise draws per step")
    p.add_argument("--flow_source_guidance_scale", type=float, default=None, help="flow methods (default: 3.5 on SD3)")
    p.add_argument("--flow_target_guidance_scale", type=float, default=None, help="flow methods (default: 13.5 on SD3)")
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=12.5,
        help="CFG scale of the methods that do not fix their own (all but gas_reference, dds_7.5)",
    )
    p.add_argument(
        "--wide_guidance_scale",
        type=float,
        default=None,
        help="override the background-sized boxes' scale of the methods that have one",
    )
    p.add_argument(
        "--accelerator",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: for wide validation sweeps; the published numbers are CPU runs (float results differ slightly)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results object here ('-' for stdout)")
    p.add_argument(
        "--progress",
        type=Path,
        default=None,
        help="append each case's scores to this JSON-lines file as soon as it is done",
    )
    p.add_argument(
        "--masks",
        nargs="?",
        const="all",
        default=None,
        choices=["all", "same_outline"],
        help="object subtasks edit inside the objects' soft masks (WorldGrounder) instead of their boxes; "
        "same_outline: only kept objects and recolours, shape changes keep their boxes",
    )
    p.add_argument(
        "--requests",
        choices=("case", "user"),
        default="case",
        help="user: the cases' requests without their keep sentences, as a user types them (no method gets "
        "the case's keep subtasks); results are recorded as METHOD+user",
    )
    p.add_argument(
        "--keeping_only",
        action="store_true",
        help="edit only the cases that keep an object, the only ones where --requests user leaves one "
        "unnamed (elsewhere gas_grounded and gas_grounded_keep_unmentioned edit the same plan)",
    )
    p.add_argument("--figure", type=Path, default=Path("outputs/world_eval.png"))
    p.add_argument("--figure_cases", type=int, default=6)
    p.add_argument(
        "--write_jobs",
        type=Path,
        default=None,
        help="write the cases as a gas-edit batch jobs file (same settings) instead of editing them",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    kinds = {k.strip() for k in (args.kinds or "").split(",") if k.strip()}
    if kinds - set(KINDS):
        p.error(f"unknown --kinds {sorted(kinds - set(KINDS))}; choose from {', '.join(KINDS)}")
    if not 0 <= args.first_case < args.cases:
        p.error(
            f"--first_case {args.first_case} leaves no case of --cases {args.cases}: --cases is the last case + 1 "
            f"(cases 25-49: --cases 50 --first_case 25)"
        )
    for path in (args.progress, args.json, args.figure):  # made before the edits, not found missing after them
        if path is not None and str(path) != "-":
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    try:
        folder = resolve_bundled(args.model)
        size = args.size or world_size(folder)
        check_scene_size(size, world_size(folder))
    except (GasError, OSError) as e:
        p.error(f"--model {args.model}: {e}")
    numbered = list(enumerate(held_out_cases(args.cases, seed=args.seed, size=size)))[args.first_case :]
    if args.kinds:
        numbered = [(i, c) for i, c in numbered if any(ch.kind in kinds for ch in c.changes)]
    if args.keeping_only:
        numbered = [(i, c) for i, c in numbered if c.kept_objects]
    cases = [c for _, c in numbered]
    if args.write_jobs is not None:
        write_jobs(args.write_jobs, numbered, names, args)
        return 0
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = load_backbone(folder, device="cuda" if args.accelerator == "gpu" else "cpu", attention="sdpa")
    solver = natural_solver(backbone)
    other = [n for n in names if METHODS[n].solver != solver]
    if other:
        p.error(
            f"--model {args.model} runs the {solver} solver; {', '.join(other)} need"
            + (" the flow twin (results/flow_world/snapshot)" if solver == "dds" else " a UNet world model")
        )
    results: dict[str, dict] = {}
    per_case: dict[str, list[dict]] = {}
    fig_rows = [[c.source_image, c.target_image] for c in cases[: args.figure_cases]]
    for method_name in names:
        name = (
            method_name
            + ("+" + MASK_TAGS[args.masks] if args.masks else "")
            + (f"+noise{args.noise_seed}" if args.noise_seed else "")
            + ("+user" if args.requests == "user" else "")
        )
        scores, times = [], []
        for k, (index, case) in enumerate(numbered):
            image, seconds = edit_case(backbone, case, METHODS[method_name], args)
            scores.append(score(image, case))
            times.append(seconds)
            per_case.setdefault(name, []).append({"case": index, "seconds": seconds, **scores[-1]})
            if args.progress is not None:  # one JSON line per case: a run stopped part-way keeps what it did
                with args.progress.open("a") as f:
                    f.write(json.dumps({"method": name, "seed": args.seed, **per_case[name][-1]}) + "\n")
            if k < args.figure_cases:
                fig_rows[k].append(image)
        agg = aggregate(scores)
        agg["seconds_per_edit"] = float(np.mean(times))
        results[name] = agg
        print(f"{name}: " + ", ".join(f"{k}={fmt(agg.get(k))}" for k in METRICS), file=sys.stderr, flush=True)

    print("| method | " + " | ".join(METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    for name, agg in results.items():
        print(f"| {name} | " + " | ".join(fmt(agg.get(k)) for k in METRICS) + " |")
    if fig_rows:
        figure(fig_rows, ["source", "ideal"] + list(results), args.figure)
        print(f"figure: {args.figure}", file=sys.stderr)
    payload = {
        "methods": results,
        "per_case": per_case,
        "cases": args.cases,
        "first_case": args.first_case,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "settings": {
            "steps": args.steps,
            "lr": args.lr,
            "lr_schedule": args.lr_schedule,
            "lr_final": args.lr_final,
            "loss_scale": args.loss_scale,
            "guidance_scale": args.guidance_scale,
            "wide_guidance_scale": args.wide_guidance_scale,
            "masks": args.masks,
            "requests": args.requests,
            "keeping_only": args.keeping_only,
            "model": args.model,
            "size": size,
            "flow": {  # the flow methods' FlowEdit settings (None: the family's published value)
                "steps": args.flow_steps,
                "n_max": args.flow_n_max,
                "n_avg": args.flow_n_avg,
                "source_guidance_scale": args.flow_source_guidance_scale,
                "target_guidance_scale": args.flow_target_guidance_scale,
            },
        },
    }
    if args.json is not None:
        text = json.dumps(payload, indent=2)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
