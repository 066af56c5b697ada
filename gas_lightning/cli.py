"""`gas-edit`: one Ground-A-Score edit with the Lightning Trainer.

Built on Lightning's own argument parser (jsonargparse), so config files, `--print_config`,
`--trainer.*` flags and `class_path` callbacks behave as in LightningCLI. LightningCLI itself
is not used because an edit needs work before the module exists (plan, grounding, model
loading) and the module is built from tensors, not from config values.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from jsonargparse import ActionConfigFile, Namespace

from gas_lightning.errors import GasError, RunError

log = logging.getLogger("gas_lightning")

DEFAULT_CALLBACKS = [
    Namespace(class_path="gas_lightning.callbacks.NullTextPenalty", init_args=Namespace(area_threshold=0.15, coefficient=5.0)),
    Namespace(class_path="gas_lightning.callbacks.EditPreviews", init_args=Namespace(every_n_steps=50)),
]
CHECKPOINT_EVERY = 50
_DEBUG = contextvars.ContextVar("gas_edit_debug", default=False)  # set once --debug is parsed


def build_parser():
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser, LRSchedulerCallable, OptimizerCallable

    from gas_lightning.guidance import GuidanceConfig
    from gas_lightning.resolve import GroundingSpec, PlanSpec

    p = LightningArgumentParser(
        prog="gas-edit",
        description="Edit several objects of an image at once with Ground-A-Score (grounded score distillation).",
        default_env=False,
    )
    p.add_argument("--config", action=ActionConfigFile, help="YAML config file(s); later flags override them")
    p.add_argument("--model", type=Optional[str], default=None,
                   help="diffusers model: hub id, local folder, or gas-lightning:shapes-model (bundled)")
    p.add_argument("--image", type=Optional[str], default=None, help="image to edit (any size; see README: working size)")
    p.add_argument("--output_dir", type=str, default="outputs/edit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", type=str, default="batched", choices=["batched", "sequential"])
    p.add_argument("--resume", type=Optional[str], default=None, help="checkpoint to continue from, or 'last'")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an earlier edit's checkpoints in output_dir")
    p.add_argument("--plan_only", type=bool, default=False, help="write plan.json and grounding.png, then stop")
    p.add_argument("--resolution", type=Optional[int], default=None, help="short side of the working size (default: the model's)")
    p.add_argument("--dtype", type=str, default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--attention", type=str, default="auto", choices=["auto", "sdpa", "xformers"])
    p.add_argument("--allow_pickle_weights", type=bool, default=False,
                   help="also load .bin/.pth model weights (a pickle can run code); default: .safetensors only")
    p.add_argument("--debug", type=bool, default=False, help="show the traceback of an error instead of one line")
    p.add_argument("--loss_scale", type=float, default=2000.0)
    p.add_argument("--checkpoint_every", type=int, default=CHECKPOINT_EVERY, help="steps between kept checkpoints")
    p.add_argument("--optimizer", type=OptimizerCallable,
                   default=Namespace(class_path="torch.optim.SGD", init_args=Namespace(lr=0.1)))
    p.add_argument("--lr_scheduler", type=Optional[LRSchedulerCallable], default=None,
                   help="a torch.optim.lr_scheduler class stepped once per Trainer step, e.g. CosineAnnealingLR "
                        "with T_max = trainer.max_steps (configs/shapes.yaml)")
    p.add_class_arguments(PlanSpec, nested_key=None, as_group=True, fail_untyped=True)
    p.add_class_arguments(GroundingSpec, nested_key=None, as_group=True)
    p.add_class_arguments(GuidanceConfig, "guidance")
    p.add_lightning_class_args(Trainer, "trainer")
    p.set_defaults({"trainer.max_steps": 500, "trainer.max_epochs": -1, "trainer.log_every_n_steps": 1,
                    "trainer.callbacks": DEFAULT_CALLBACKS})
    return p


def _is_child_rank() -> bool:
    """Lightning's DDP launcher re-runs this command in each extra process with LOCAL_RANK set."""
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def _device_of(trainer) -> str:
    return str(trainer.strategy.root_device)


def run(argv: list[str] | None = None) -> int:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from gas_lightning.backbone import load_backbone
    from gas_lightning.callbacks import EditOutputs, FinalCheckpoint, NanGuard
    from gas_lightning.io import atomic_write, with_atomic_io
    from gas_lightning.pipeline import build_edit, load_image
    from gas_lightning.plan import EditPlan
    from gas_lightning.planners.llm import check_base_url
    from gas_lightning.resolve import GroundingSpec, PlanSpec, ground, make_plan, resolve_bundled

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # jsonargparse prints --print_config inside parse_args, before any check could run: parse without
    # it, check, then print, so a password in --llm_base_url never reaches the terminal either.
    printing = [a for a in argv if a == "--print_config" or a.startswith("--print_config=")]
    cfg = parser.parse_args([a for a in argv if a not in printing])
    check_base_url(cfg.llm_base_url)  # a password in it must not reach config.yaml or a log
    if printing:
        print(parser.dump(cfg, skip_validation=True), end="")
        return 0
    _DEBUG.set(bool(cfg.debug))
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    child = _is_child_rank()
    _refuse_file_in_path(out)

    if cfg.image is None:
        raise GasError("no image given: pass --image PATH (or --config configs/shapes.yaml for the bundled example)")
    image = load_image(resolve_bundled(cfg.image))
    plan_spec = PlanSpec(**{k: cfg[k] for k in PlanSpec.__dataclass_fields__})
    ground_spec = GroundingSpec(**{k: cfg[k] for k in GroundingSpec.__dataclass_fields__})

    resume = cfg.resume
    if resume == "last":
        resume = str(ckpt_dir / "last.ckpt")
    if resume is not None and not Path(resume).is_file():
        raise GasError(f"--resume {cfg.resume!r}: no checkpoint at {resume}; checkpoints of an edit are in OUTPUT_DIR/checkpoints/")
    if not child and resume is None and not cfg.plan_only and not cfg.overwrite and any(ckpt_dir.glob("*.ckpt")):
        raise GasError(f"{out} already holds checkpoints of an earlier edit; continue it with --resume last, "
                       "replace it with --overwrite true, or choose another --output_dir")

    if child and (out / "plan.json").is_file():
        plan = EditPlan.load(out / "plan.json")  # rank 0 resolved (and maybe asked an LLM) already
    else:
        plan = ground(make_plan(plan_spec, image), image, ground_spec)
    if resume is not None and not child:
        _check_resume(resume, plan)  # before plan.json/config.yaml are rewritten: a refused resume loses nothing
    _make_writable_dir(out)
    if not child and cfg.overwrite and resume is None:
        for old in ckpt_dir.glob("*.ckpt"):  # else Lightning would version names and "last" would be stale
            old.unlink()
    if not child:
        plan.save(out / "plan.json")
        with atomic_write(out / "config.yaml", "w") as f:
            f.write(parser.dump(cfg, skip_validation=True))
    if cfg.plan_only:
        from gas_lightning.grounding.base import draw_grounding

        draw_grounding(image, plan, out / "grounding.png")
        print(f"plan: {out / 'plan.json'}\ngrounding: {out / 'grounding.png'}")
        return 0
    if cfg.model is None:
        raise GasError("no model given: pass --model HUB_ID_OR_FOLDER (a diffusers Stable Diffusion layout), "
                       "or gas-lightning:shapes-model for the bundled one")

    init = parser.instantiate(cfg)
    _check_lr_scheduler(init.lr_scheduler, cfg.trainer.max_steps)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    callbacks = list(init.trainer.callbacks or [])
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                                         every_n_train_steps=cfg.checkpoint_every, save_top_k=-1, save_last=True,
                                         enable_version_counter=False))
    callbacks += [NanGuard(ckpt_dir), FinalCheckpoint(ckpt_dir), EditOutputs(out)]
    trainer_kwargs = {k: v for k, v in vars(init.trainer).items() if k != "callbacks"}
    if trainer_kwargs.get("logger") in (None, True):
        trainer_kwargs["logger"] = TensorBoardLogger(save_dir=str(out), name="", version="", default_hp_metric=False)
    if trainer_kwargs.get("default_root_dir") is None:
        trainer_kwargs["default_root_dir"] = str(out)
    trainer_kwargs["plugins"] = with_atomic_io(trainer_kwargs.get("plugins"))  # kill-safe writes, data-only loads
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs)

    backbone = load_backbone(resolve_bundled(cfg.model), device=_device_of(trainer), dtype=cfg.dtype, attention=cfg.attention,
                             allow_pickle_weights=cfg.allow_pickle_weights)
    log.info("attention backend: %s", backbone.attention)
    module = build_edit(backbone, image, plan, guidance_config=init.guidance, resolution=cfg.resolution,
                        schedule=cfg.schedule, seed=cfg.seed, loss_scale=cfg.loss_scale, optimizer=init.optimizer,
                        lr_scheduler=init.lr_scheduler)
    trainer.fit(module, ckpt_path=resume, weights_only=True)
    if trainer.is_global_zero:
        print(f"edited: {out / 'edited.png'}  (comparison.png, plan.json, config.yaml, checkpoints/ beside it; "
              f"attention={backbone.attention}; tensorboard --logdir {out})")
    return 0


def _refuse_file_in_path(out: Path) -> None:
    """Before any work: an --output_dir below a file can never be created."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise GasError(f"--output_dir {str(out)!r} cannot be created: {str(folder)!r} is a file, not a folder; "
                               "choose another --output_dir")
            return


def _make_writable_dir(out: Path) -> None:
    """Create --output_dir and prove it takes a file, so no output is lost at the end of the edit."""
    probe = out / f".gas-edit-write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        raise GasError(f"--output_dir {str(out)!r} is not writable ({e.strerror or e}); "
                       "choose a folder you can write to, or fix its permissions") from None


def _check_resume(path: str, plan) -> None:
    """Read the checkpoint as data and refuse one that is unreadable, not gas-edit's, or made for
    another plan, with one message each; Lightning would only fail after the outputs were rewritten."""
    from gas_lightning.io import AtomicCheckpointIO

    try:
        ckpt = AtomicCheckpointIO().load_checkpoint(path)
    except GasError:
        raise
    except Exception as e:  # truncated, empty or not a torch file at all
        raise GasError(f"--resume {path}: the file cannot be read as a checkpoint ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:160]}); it may be truncated. Resume from another file in "
                       "OUTPUT_DIR/checkpoints/ or start a new run without --resume") from None
    meta = ckpt.get("gas_lightning") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "plan" not in meta or "state_dict" not in ckpt:
        raise GasError(f"--resume {path}: not a checkpoint written by gas-edit (no edit plan or latent in it); "
                       "resume from OUTPUT_DIR/checkpoints/last.ckpt of an earlier edit")
    if meta["plan"] != plan.to_dict():
        raise GasError("the checkpoint was made for a different edit plan; resume with the same --plan/--request/boxes "
                       "(its plan.json is next to the checkpoints) or start a new run without --resume")


def _check_lr_scheduler(factory, max_steps: int) -> None:
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
        raise GasError("--lr_scheduler ReduceLROnPlateau needs a validation metric and an edit has none; "
                       "use a step-based scheduler such as torch.optim.lr_scheduler.CosineAnnealingLR")
    if isinstance(probe, torch.optim.lr_scheduler.OneCycleLR) and 0 < probe.total_steps < max_steps:
        # OneCycleLR raises once stepped past its end, which would stop the edit part-way.
        raise GasError(f"--lr_scheduler OneCycleLR has total_steps {probe.total_steps} < trainer.max_steps {max_steps}; "
                       f"set --lr_scheduler.total_steps {max_steps}")
    length = getattr(probe, "T_max", None) or getattr(probe, "total_iters", None) or getattr(probe, "total_steps", None)
    if length is not None and max_steps > 0 and length != max_steps:
        log.warning("the lr schedule %s spans %d steps but trainer.max_steps is %d; set its T_max/total_iters to %d "
                    "(also when raising max_steps to continue an edit)", name, length, max_steps, max_steps)


def _quiet_library_noise() -> None:
    import warnings

    # We checkpoint the latent after its update on purpose; this advice does not apply.
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    # The "data" is a stream of dummy ticks; DataLoader workers would only add processes.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so main() called twice in one process (tests,
    notebooks) never logs into a stream an earlier call captured and closed."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    _quiet_library_noise()
    _DEBUG.set(False)
    try:
        code = run(argv)
    except KeyboardInterrupt:
        print("gas-edit: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:
        if _DEBUG.get():
            raise
        code = _report(e)
    sys.exit(code)


def _report(error: Exception) -> int:
    """One line on stderr; the exit status is 2 for bad input, 1 for a failure while running or a bug."""
    first = " ".join(str(error).split())[:300]
    if isinstance(error, GasError):
        print(f"gas-edit: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, RunError) else 2
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        print(f"gas-edit: error: out of memory ({first}); lower --resolution, use --trainer.precision 16-mixed, "
              "or close what else uses the memory", file=sys.stderr)
        return 1
    print(f"gas-edit: internal error: {type(error).__name__}: {first} (run with --debug true for the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
