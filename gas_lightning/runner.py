"""One edit from a parsed config: the steps `gas-edit`, `gas_lightning.edit()` and the batch runner share.

The config is jsonargparse's Namespace from `build_parser()` (the `gas-edit` flags), so a config
file, a command line and a Python call describe an edit the same way and write the same
config.yaml. What only the command line does (printing the config, exit codes) stays in cli.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from jsonargparse import ActionConfigFile, Namespace

from gas_lightning.errors import GasError
from gas_lightning.fitting import cpu_precision  # noqa: F401  (tests and tools/bench import it from here)
from gas_lightning.worlds import ASSETS_DIR, MODEL_DIR
from gas_lightning.worlds.vocab import check_known

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from gas_lightning.backbone import Backbone
    from gas_lightning.plan import EditPlan

log = logging.getLogger("gas_lightning")

DEFAULT_CALLBACKS = [
    Namespace(
        class_path="gas_lightning.callbacks.NullTextPenalty", init_args=Namespace(area_threshold=0.15, coefficient=5.0)
    ),
    Namespace(class_path="gas_lightning.callbacks.EditPreviews", init_args=Namespace(every_n_steps=50)),
]
CHECKPOINT_EVERY = 50


@dataclass
class EditResult:
    """What an edit gives back: the edited picture at the working size, the plan it followed (with
    its boxes), the optimised latent and the folder holding edited.png, plan.json, config.yaml."""

    image: Image.Image | None  # None for a plan-only run
    plan: EditPlan
    latent: torch.Tensor | None
    output_dir: Path
    attention: str | None = None
    steps: int = 0
    report: dict | None = None  # report.json's object when the edit was checked (docs/guide/checking.md)


def build_parser(exit_on_error: bool = True):
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser, LRSchedulerCallable, OptimizerCallable

    from gas_lightning.checking import CheckSpec
    from gas_lightning.guidance import GuidanceConfig
    from gas_lightning.guidance.flow import FlowConfig
    from gas_lightning.resolve import GroundingSpec, PlanSpec

    p = LightningArgumentParser(
        prog="gas-edit",
        description="Edit several objects of an image at once with Ground-A-Score (grounded score distillation).",
        default_env=False,
        exit_on_error=exit_on_error,
    )
    p.add_argument("--config", action=ActionConfigFile, help="YAML config file(s); later flags override them")
    p.add_argument(
        "--model",
        type=Optional[str],
        default=None,
        help="SD 1.x/2.x, SDXL, SD3 or FLUX model: hub id, local diffusers folder, a single-file .safetensors "
        "checkpoint (with --model_config), or gas-lightning:shapes-model (bundled)",
    )
    p.add_argument(
        "--model_config",
        type=Optional[str],
        default=None,
        help="for a single-file --model: a local diffusers-layout folder with its family's configs and tokenizers",
    )
    p.add_argument(
        "--image",
        type=Optional[str],
        default=None,
        help="image to edit (any size; see docs/guide/stable-diffusion.md, Working size)",
    )
    p.add_argument(
        "--output_dir",
        type=str,
        default="outputs/edit",
        help="the edit's folder: edited.png, comparison.png, plan.json, config.yaml, checkpoints/",
    )
    p.add_argument("--seed", type=int, default=0, help="the edit's timesteps and noise")
    p.add_argument(
        "--schedule",
        type=Literal["batched", "sequential"],
        default="batched",
        help="batched: all subtasks in one UNet call per step; sequential: the reference's one step per subtask",
    )
    p.add_argument("--resume", type=Optional[str], default=None, help="checkpoint to continue from, or 'last'")
    p.add_argument(
        "--overwrite",
        type=bool,
        default=False,
        help="replace an earlier edit in output_dir (without it, a folder holding an edit is refused)",
    )
    p.add_argument("--plan_only", type=bool, default=False, help="write plan.json and grounding.png, then stop")
    p.add_argument(
        "--resolution", type=Optional[int], default=None, help="short side of the working size (default: the model's)"
    )
    p.add_argument(
        "--dtype",
        type=Literal["auto", "float32", "float16", "bfloat16"],
        default="auto",
        help="the model's weights (auto: float16 on a GPU, float32 on the CPU)",
    )
    p.add_argument("--attention", type=Literal["auto", "sdpa", "xformers"], default="auto")
    p.add_argument(
        "--low_memory",
        type=bool,
        default=False,
        help="UNet calls of at most --micro_batch samples; text encoder and VAE on the CPU between uses",
    )
    p.add_argument(
        "--micro_batch",
        type=Optional[int],
        default=None,
        help="most samples per UNet call (default: all in one; 4 with --low_memory)",
    )
    p.add_argument(
        "--compile",
        type=Union[bool, Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]],
        default=False,
        help="torch.compile the UNet: true, or a mode (reduce-overhead adds CUDA graphs); minutes before the "
        "first step, once per model and batch size (the jobs of a batch share it)",
    )
    p.add_argument(
        "--allow_pickle_weights",
        type=bool,
        default=False,
        help="also load .bin/.pth model weights (a pickle can run code); default: .safetensors only",
    )
    p.add_argument("--debug", type=bool, default=False, help="show the traceback of an error instead of one line")
    p.add_argument("--loss_scale", type=float, default=2000.0)
    p.add_argument("--checkpoint_every", type=int, default=CHECKPOINT_EVERY, help="steps between kept checkpoints")
    p.add_argument(
        "--optimizer",
        type=OptimizerCallable,
        default=Namespace(class_path="torch.optim.SGD", init_args=Namespace(lr=0.1)),
    )
    p.add_argument(
        "--lr_scheduler",
        type=Optional[LRSchedulerCallable],
        default=None,
        help="a torch.optim.lr_scheduler class stepped once per Trainer step, e.g. CosineAnnealingLR "
        "with T_max = trainer.max_steps (configs/shapes.yaml)",
    )
    p.add_class_arguments(PlanSpec, nested_key=None, as_group=True, fail_untyped=True)
    p.add_class_arguments(GroundingSpec, nested_key=None, as_group=True)
    p.add_class_arguments(CheckSpec, nested_key=None, as_group=True)
    p.add_argument(
        "--solver",
        type=Optional[Literal["dds", "flow"]],
        default=None,
        help="dds: grounded DDS (SD 1.x/2.x, SDXL); flow: grounded FlowEdit (SD3, FLUX); default: the model's own",
    )
    p.add_class_arguments(GuidanceConfig, "guidance")
    p.add_class_arguments(FlowConfig, "flow")
    p.add_lightning_class_args(Trainer, "trainer")
    p.set_defaults(
        {
            "trainer.max_steps": 500,
            "trainer.max_epochs": -1,
            "trainer.log_every_n_steps": 1,
            "trainer.callbacks": DEFAULT_CALLBACKS,
        }
    )
    return p


def is_bundled_model(source: str | None) -> bool:
    return source is not None and Path(source).resolve() == MODEL_DIR.resolve()


def is_world_model(source: str | None) -> bool:
    """A model shipped in the package (the pixel or the latent shapes world): its images are world images."""
    return source is not None and Path(source).resolve().is_relative_to(ASSETS_DIR.resolve())


def is_child_rank() -> bool:
    """Lightning's DDP launcher re-runs the command in each extra process with LOCAL_RANK set."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def resolve_plan(cfg: Namespace, image: Image.Image, plan: EditPlan | None = None) -> EditPlan:
    """The request in whichever form the config holds (or `plan`), grounded: boxes from --boxes or the detector."""
    from gas_lightning.resolve import GroundingSpec, PlanSpec, ground, make_plan

    if plan is None:
        plan = make_plan(PlanSpec(**{k: cfg[k] for k in PlanSpec.__dataclass_fields__}), image)
    return ground(plan, image, GroundingSpec(**{k: cfg[k] for k in GroundingSpec.__dataclass_fields__}))


def run_edit(
    cfg: Namespace,
    parser,
    image: Image.Image | None = None,
    backbone: Backbone | None = None,
    callbacks: Sequence[Any] = (),
    plan: EditPlan | None = None,
) -> EditResult:
    """Plan, ground, fit and write the outputs of one edit.

    `image`, `backbone` and `plan` are for callers that hold them already (the Python API, the
    batch runner, the app): an in-memory picture, a model loaded once for many edits, a plan the
    user corrected. `callbacks` are added to the Trainer's.
    """
    import lightning as L

    from gas_lightning.checking import CheckSpec
    from gas_lightning.fitting import build_pass, fit, make_trainer
    from gas_lightning.io import atomic_write
    from gas_lightning.pipeline import load_image, tensor_to_image
    from gas_lightning.plan import EditPlan
    from gas_lightning.report import find_lpips
    from gas_lightning.resolve import resolve_bundled

    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    child = is_child_rank()
    refuse_file_in_path(out)

    if image is None:
        if cfg.image is None:
            raise GasError(
                "no image given: pass --image PATH (or --config configs/shapes.yaml for the bundled example)"
            )
        image = load_image(resolve_bundled(cfg.image))

    resume = cfg.resume
    if resume == "last":
        resume = str(newest_checkpoint(ckpt_dir))
    if cfg.resume == "last" and not Path(resume).is_file():
        raise GasError(
            f"--resume last: {ckpt_dir} holds no checkpoint yet (an edit saves one every --checkpoint_every "
            "steps, at its end and when stopped); start the edit without --resume"
        )
    if resume is not None and not Path(resume).is_file():
        raise GasError(
            f"--resume {cfg.resume!r}: no checkpoint at {resume}; checkpoints of an edit are in OUTPUT_DIR/checkpoints/"
        )
    holds_edit = any(ckpt_dir.glob("*.ckpt")) or (out / "edited.png").is_file()
    if not child and resume is None and not cfg.plan_only and not cfg.overwrite and holds_edit:
        raise GasError(
            f"{out} already holds an earlier edit; continue it with --resume last, "
            "replace it with --overwrite true, or choose another --output_dir"
        )

    given_plan = plan is not None
    if child and (out / "plan.json").is_file():
        plan = EditPlan.load(out / "plan.json")  # rank 0 resolved (and maybe asked an LLM) already
    else:
        plan = resolve_plan(cfg, image, plan)
    if resume is not None and not child:
        check_resume(resume, plan)  # before plan.json/config.yaml are rewritten: a refused resume loses nothing
    make_writable_dir(out)
    if not child and cfg.overwrite and resume is None:
        stale = [*ckpt_dir.glob("*.ckpt"), out / "edited.png", out / "report.json", out / "report.png"]
        for old in stale:  # else Lightning would version names, and "last" and the report would be stale
            old.unlink(missing_ok=True)
    if not child:
        plan.save(out / "plan.json")
        if given_plan:  # a plan held in memory: config.yaml names the saved one, so it repeats the edit
            for key in (
                "request",
                "source",
                "target",
                "sources",
                "targets",
                "boxes",
                "keep",
                "preserve_form",
                "intensities",
            ):
                cfg[key] = None
            cfg.plan = str(out / "plan.json")
        with atomic_write(out / "config.yaml", "w") as f:
            f.write(parser.dump(cfg, skip_validation=True))
    if cfg.plan_only:
        from gas_lightning.grounding.base import draw_grounding

        draw_grounding(image, plan, out / "grounding.png")
        return EditResult(image=None, plan=plan, latent=None, output_dir=out)
    if cfg.model is None and backbone is None:
        raise GasError(
            "no model given: pass --model HUB_ID_OR_FOLDER (a diffusers SD 1.x/2.x or SDXL layout), "
            "or gas-lightning:shapes-model for the bundled one"
        )
    if is_bundled_model(backbone.source if backbone is not None else resolve_bundled(cfg.model)):
        check_known(
            [p for s in plan.subtasks for p in (s.source, s.target)]
            + ([plan.source_prompt, plan.target_prompt] if cfg.guidance.full_prompt else [])
        )

    init = parser.instantiate(cfg)
    check_lr_scheduler(init.lr_scheduler, cfg.trainer.max_steps)
    check = CheckSpec(**{k: cfg[k] for k in CheckSpec.__dataclass_fields__})
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer, final = make_trainer(cfg, init, out, ckpt_dir, callbacks)
    device = str(trainer.strategy.root_device)
    if check.refine and trainer.world_size > 1:
        raise GasError("--refine runs on one device; set --trainer.devices 1 (or --refine 0)")
    # before any step: a checker model that cannot load, or --refine on a photo with no checker, stops here
    checker = None if child else build_checker(cfg, check, backbone, device)
    lpips = find_lpips(check.check_lpips, device) if checker is not None else (None, None)
    if backbone is not None:  # load_backbone says which attention it set up; a given model is named here
        log.info("attention backend: %s", backbone.attention)
    if backbone is None:
        from gas_lightning.loading import load_backbone

        backbone = load_backbone(
            resolve_bundled(cfg.model),
            device=device,
            dtype=cfg.dtype,
            attention=cfg.attention,
            allow_pickle_weights=cfg.allow_pickle_weights,
            model_config=cfg.model_config,
            compile=cfg.compile,
            low_memory=cfg.low_memory,
            micro_batch=cfg.micro_batch,
        )
    elif str(backbone.device) != device:
        raise GasError(
            f"the model is on {backbone.device} but the Trainer runs on {device}; load the model on the "
            "Trainer's device (load_model(device=...)) or set trainer accelerator/devices to match"
        )
    elif (
        cfg.compile or cfg.low_memory or cfg.micro_batch is not None
    ):  # asked for this edit: applied to the given model
        backbone.tune(compile=cfg.compile, low_memory=cfg.low_memory, micro_batch=cfg.micro_batch)
    module = build_pass(backbone, image, plan, cfg, init)
    fit(trainer, module, final, out, resume)
    edited = tensor_to_image(module.decode().cpu()) if trainer.is_global_zero else None
    result = EditResult(
        image=edited,
        plan=plan,
        latent=module.latent.detach().cpu(),
        output_dir=out,
        attention=backbone.attention,
        steps=trainer.global_step,
    )
    if checker is None or not trainer.is_global_zero:
        return result
    from gas_lightning.refine import check_and_refine

    return check_and_refine(cfg, parser, image, module, trainer, result, checker, lpips, backbone, callbacks)


def newest_checkpoint(ckpt_dir: Path) -> Path:
    """What `--resume last` means: the later of last.ckpt (the last periodic or final save) and
    interrupted.ckpt (Ctrl-C or an error), by step, so no step is redone; last.ckpt when neither exists."""
    import torch

    found = [p for p in (ckpt_dir / "last.ckpt", ckpt_dir / "interrupted.ckpt") if p.is_file()]
    if len(found) < 2:
        return found[0] if found else ckpt_dir / "last.ckpt"

    def step(path: Path) -> tuple[int, int]:
        try:
            return int(
                torch.load(path, map_location="cpu", weights_only=True).get("global_step", -1)
            ), path.stat().st_mtime_ns
        except Exception:  # an unreadable file loses to a readable one; check_resume explains it if chosen
            return -1, 0

    return max(found, key=step)


def refuse_file_in_path(out: Path) -> None:
    """Before any work: an --output_dir below a file can never be created."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise GasError(
                    f"--output_dir {str(out)!r} cannot be created: {str(folder)!r} is a file, not a folder; "
                    "choose another --output_dir"
                )
            return


def make_writable_dir(out: Path) -> None:
    """Create --output_dir and prove it takes a file, so no output is lost at the end of the edit."""
    probe = out / f".gas-edit-write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        raise GasError(
            f"--output_dir {str(out)!r} is not writable ({e.strerror or e}); "
            "choose a folder you can write to, or fix its permissions"
        ) from None


def check_resume(path: str, plan) -> None:
    """Read the checkpoint as data and refuse one that is unreadable, not gas-edit's, or made for
    another plan, with one message each; Lightning would only fail after the outputs were rewritten."""
    from gas_lightning.io import AtomicCheckpointIO

    try:
        ckpt = AtomicCheckpointIO().load_checkpoint(path)
    except GasError:
        raise
    except Exception as e:  # truncated, empty or not a torch file at all
        raise GasError(
            f"--resume {path}: the file cannot be read as a checkpoint ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:160]}); it may be truncated. Resume from another file in "
            "OUTPUT_DIR/checkpoints/ or start a new run without --resume"
        ) from None
    meta = ckpt.get("gas_lightning") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "plan" not in meta or "state_dict" not in ckpt:
        raise GasError(
            f"--resume {path}: not a checkpoint written by gas-edit (no edit plan or latent in it); "
            "resume from OUTPUT_DIR/checkpoints/last.ckpt of an earlier edit"
        )
    if meta["plan"] != plan.to_dict():
        raise GasError(
            "the checkpoint was made for a different edit plan; resume with the same --plan/--request/boxes "
            "(its plan.json is next to the checkpoints) or start a new run without --resume"
        )


def check_lr_scheduler(factory, max_steps: int) -> None:
    """Refuse schedulers an edit cannot step, and warn when the schedule's length is not the run's:
    a cosine that ends before max_steps climbs back up, one that ends after never decays."""
    if factory is None:
        return
    import torch

    try:
        probe = factory(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
    except (TypeError, ValueError) as e:
        raise GasError(f"--lr_scheduler could not be built: {e}") from None
    name = type(probe).__name__
    if isinstance(probe, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise GasError(
            "--lr_scheduler ReduceLROnPlateau needs a validation metric and an edit has none; "
            "use a step-based scheduler such as torch.optim.lr_scheduler.CosineAnnealingLR"
        )
    if isinstance(probe, torch.optim.lr_scheduler.OneCycleLR) and 0 < probe.total_steps < max_steps:
        # OneCycleLR raises once stepped past its end, which would stop the edit part-way.
        raise GasError(
            f"--lr_scheduler OneCycleLR has total_steps {probe.total_steps} < trainer.max_steps {max_steps}; "
            f"set --lr_scheduler.total_steps {max_steps}"
        )
    key = next((k for k in ("T_max", "total_iters", "total_steps") if getattr(probe, k, None)), None)
    length = getattr(probe, key) if key else None
    if length is not None and max_steps > 0 and length != max_steps:
        log.warning(
            "the lr schedule %s spans %d steps but --trainer.max_steps is %d; add --lr_scheduler.%s %d "
            "(also when raising max_steps to continue an edit)",
            name,
            length,
            max_steps,
            key,
            max_steps,
        )


def build_checker(cfg: Namespace, check, backbone, device: str):
    """The edit's checker (None when it is not checked): the world's for world images, else the photo one
    from the configured detector and --check_clip. Loaded before the edit, so a model that cannot load
    costs no step."""
    from gas_lightning.checking import make_checker, wanted
    from gas_lightning.resolve import GroundingSpec, make_grounder, resolve_bundled

    model = backbone.source if backbone is not None else resolve_bundled(cfg.model)
    world = cfg.detector == "world" or is_world_model(model)
    detector = None
    if wanted(check, world) and not (world and check.check_clip is None):
        detector = make_grounder(GroundingSpec(**{k: cfg[k] for k in GroundingSpec.__dataclass_fields__}))
    return make_checker(check, world, detector, device)
