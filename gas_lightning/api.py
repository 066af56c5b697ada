"""The Python API: one call per edit, usable from a notebook.

    from gas_lightning import edit
    result = edit("photo.png", "change the dog into a cat.", boxes=[[0.3, 0.4, 0.7, 0.9]],
                  model="/models/sd15", config="configs/sd15.yaml")
    result.image.save("cat.png")

Every keyword is a `gas-edit` flag (`guidance={"guidance_scale": 7.5}`, `schedule="sequential"`,
`detector="world"`, ...), validated by the same parser, so an API call and a command line run the
same code (runner.run_edit) and write the same outputs. Errors are raised as GasError, never
`sys.exit` (Ctrl-C raises EditInterrupted, a KeyboardInterrupt naming the checkpoint); library lines a
user cannot act on are off during the call only, and the logging configuration is left alone.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gas_lightning.errors import GasError
from gas_lightning.runner import EditResult
from gas_lightning.terminal import library_noise_off

if TYPE_CHECKING:
    from PIL import Image

    from gas_lightning.backbone import Backbone
    from gas_lightning.plan import EditPlan

BUNDLED_MODEL = "gas-lightning:shapes-model"
BUNDLED_PRESET = "gas-lightning:shapes.yaml"  # configs/shapes.yaml is a link to it
EDIT_KEYS = (
    "request",
    "source",
    "target",
    "plan",
    "sources",
    "targets",
    "source_prompt",
    "target_prompt",
    "preserve_form",
    "intensities",
    "boxes",
    "keep",
    "masks",
)

__all__ = ["edit", "plan_edit", "load_model", "EditResult"]


def load_model(
    model: str = BUNDLED_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    attention: str = "auto",
    allow_pickle_weights: bool = False,
    model_config: str | None = None,
) -> Backbone:
    """Load a model once and pass it as `edit(model=...)` to many edits (`device="auto"`: CUDA if present).
    A single-file checkpoint needs `model_config`, the local folder of its family's configs and tokenizers."""
    import torch

    from gas_lightning.loading import load_backbone
    from gas_lightning.resolve import resolve_bundled

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with library_noise_off():
        return load_backbone(
            resolve_bundled(model),
            device=device,
            dtype=dtype,
            attention=attention,
            allow_pickle_weights=allow_pickle_weights,
            model_config=model_config,
        )


def edit(
    image: str | Path | Image.Image,
    request: str | None = None,
    *,
    source: str | None = None,
    target: str | None = None,
    plan: str | Path | EditPlan | None = None,
    sources: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    boxes: Sequence[Sequence[float] | None] | None = None,
    masks: str | Path | Sequence[Any] | None = None,
    model: str | Backbone | None = None,
    steps: int | None = None,
    seed: int = 0,
    output_dir: str | Path | None = None,
    config: str | Path | None = None,
    callbacks: Sequence[Any] = (),
    trainer_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> EditResult:
    """Edit `image` and return the edited picture, the plan with its boxes, the latent and the folder.

    Give the edit as a `request` ("change A into B." sentences), `source`+`target` sentences, a
    `plan` (EditPlan or plan.json) or `sources`+`targets` lists. Without `model` and `config` the
    bundled model runs with its tuned settings (the CPU is enough). `model` may be an id, a folder
    or a model from `load_model()` (reused, not reloaded). `output_dir` defaults to a new temporary
    folder (or the config's own `output_dir`); `callbacks` are Lightning callbacks added to the Trainer's.
    `masks` confine subtasks to regions instead of boxes: a label-map path, or one entry per subtask
    (a PNG path, a painted PIL image, an (H, W) array or tensor, or None for the subtask's box).
    """
    from lightning.pytorch.callbacks import ProgressBar

    from gas_lightning.callbacks.progress import step_progress_bar
    from gas_lightning.runner import build_parser, run_edit

    parser = build_parser(exit_on_error=False)
    backbone = model if _is_backbone(model) else None
    painted = masks is not None and not isinstance(masks, (str, Path)) and any(_in_memory(m) for m in masks)
    if masks is not None and not painted:
        options = {
            **options,
            "masks": str(masks) if isinstance(masks, (str, Path)) else [None if m is None else str(m) for m in masks],
        }
    cfg = _config(
        parser,
        config,
        model,
        output_dir,
        steps,
        seed,
        trainer_kwargs,
        backbone,
        options,
        request=request,
        source=source,
        target=target,
        sources=sources,
        targets=targets,
        boxes=boxes,
        plan=None if plan is None or _is_plan(plan) else str(plan),
        replace_edit=_is_plan(plan),
    )
    pil = _in_memory_image(image, cfg)
    if painted:
        cfg.masks = _saved_masks(masks, Path(cfg.output_dir))
    if not any(isinstance(c, ProgressBar) for c in callbacks):  # the step bar, not Lightning's "Epoch 0/-2"
        callbacks = [*callbacks, *step_progress_bar(cfg.trainer)]
    with library_noise_off():  # as quiet as gas-edit, the caller's logging and warnings left as they were
        return run_edit(
            cfg, parser, image=pil, backbone=backbone, callbacks=callbacks, plan=plan if _is_plan(plan) else None
        )


def plan_edit(
    image: str | Path | Image.Image,
    request: str | None = None,
    *,
    config: str | Path | None = None,
    **options: Any,
) -> EditPlan:
    """The plan an edit would follow, with its boxes (detected where none were given), without editing:
    for showing the boxes to a user before the edit, as the app does."""
    from gas_lightning.pipeline import load_image
    from gas_lightning.resolve import resolve_bundled
    from gas_lightning.runner import build_parser, resolve_plan

    parser = build_parser(exit_on_error=False)
    cfg = _config(parser, config, None, None, None, 0, None, None, options, request=request)
    pil = image if _is_pil(image) else load_image(resolve_bundled(str(image)))
    with library_noise_off():
        return resolve_plan(cfg, pil)


def _config(
    parser, config, model, output_dir, steps, seed, trainer_kwargs, backbone, options, replace_edit=False, **plan_form
):
    """Parser defaults (or a config file, or the bundled preset), then the call's keywords on top."""
    from jsonargparse import ArgumentError

    from gas_lightning.planners.llm import check_base_url
    from gas_lightning.resolve import resolve_bundled

    preset = config is None and model is None
    forms = {k: v for k, v in plan_form.items() if k != "boxes" and v is not None}
    try:
        cfg = (
            parser.parse_path(resolve_bundled(BUNDLED_PRESET) if preset else str(config))
            if preset or config
            else parser.get_defaults()
        )
        previous_steps = cfg.trainer.max_steps
        # An edit given in the call replaces the config's whole description of one (its request, boxes,
        # whole-scene sentences), which belonged to another edit.
        overrides: dict[str, Any] = dict.fromkeys(EDIT_KEYS) if forms or replace_edit else {}
        overrides.update({k: v for k, v in plan_form.items() if v is not None})
        overrides.update(options)
        if isinstance(overrides.get("trainer"), dict):
            overrides["trainer"] = dict(overrides["trainer"])  # added to below; the caller's dict stays as it was
        overrides["seed"] = seed
        if backbone is not None:
            overrides["model"] = backbone.source
            overrides["model_config"] = backbone.config_source
            overrides.setdefault("trainer", {}).update(_trainer_on(backbone))
        elif model is not None:
            overrides["model"] = str(model)
        if output_dir is not None:
            overrides["output_dir"] = str(output_dir)
        elif preset or cfg.output_dir == parser.get_default("output_dir"):  # a config's own output_dir is kept
            overrides["output_dir"] = tempfile.mkdtemp(prefix="gas-edit-")
        if trainer_kwargs:
            overrides.setdefault("trainer", {}).update(trainer_kwargs)
        if steps is not None:
            overrides.setdefault("trainer", {})["max_steps"] = int(steps)
        cfg = parser.parse_object(overrides, namespace=cfg)
    except ArgumentError as e:
        raise GasError(f"edit(): {' '.join(str(e).split())[:400]}") from None
    check_base_url(cfg.llm_base_url)
    _follow_steps(cfg, previous_steps)
    return cfg


def _follow_steps(cfg, previous_steps: int) -> None:
    """A cosine schedule sized to the config's step count follows `steps=`: an edit of other length
    would otherwise stop before the learning rate decays, or climb back up after it ends."""
    sched = cfg.lr_scheduler
    init = getattr(sched, "init_args", None)
    if init is not None and getattr(init, "T_max", None) == previous_steps and cfg.trainer.max_steps != previous_steps:
        init.T_max = cfg.trainer.max_steps


def _trainer_on(backbone) -> dict[str, Any]:
    device = backbone.device
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    return {"accelerator": device.type, "devices": 1}


def _in_memory_image(image, cfg) -> Image.Image | None:
    """A path goes into the config as `image` (so config.yaml repeats the edit); a picture in memory
    is saved as source.png in the output folder and named there, for the same reason."""
    from gas_lightning.io import atomic_write
    from gas_lightning.pipeline import to_rgb
    from gas_lightning.runner import make_writable_dir, refuse_file_in_path

    if not _is_pil(image):
        if hasattr(image, "shape"):  # a numpy array or tensor
            raise GasError("edit(image=...) takes a path or a PIL image; convert an array with PIL.Image.fromarray")
        cfg.image = str(image)
        return None
    out = Path(cfg.output_dir)
    refuse_file_in_path(out)
    make_writable_dir(out)
    picture = to_rgb(image)
    with atomic_write(out / "source.png") as f:
        picture.save(f, format="PNG")
    cfg.image = str(out / "source.png")
    return picture


def _in_memory(mask) -> bool:
    return mask is not None and not isinstance(mask, (str, Path))


def _saved_masks(masks: Sequence[Any], out: Path) -> list[str | None]:
    """Painted masks are saved as mask{k}.png beside source.png and named in config.yaml, so that the
    config repeats the edit; 8-bit grey keeps soft edges."""
    from gas_lightning.io import atomic_write
    from gas_lightning.masks import mask_image, read_mask
    from gas_lightning.runner import make_writable_dir

    make_writable_dir(out)
    paths: list[str | None] = []
    for k, mask in enumerate(masks):
        if not _in_memory(mask):
            paths.append(None if mask is None else str(mask))
            continue
        weights = read_mask(mask, what=f"masks[{k}]")  # a bad mask is one error here, before any model loads
        with atomic_write(out / f"mask{k}.png") as f:
            mask_image(weights).save(f, format="PNG")
        paths.append(str(out / f"mask{k}.png"))
    return paths


def _is_pil(x) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def _is_plan(x) -> bool:
    from gas_lightning.plan import EditPlan

    return isinstance(x, EditPlan)


def _is_backbone(x) -> bool:
    from gas_lightning.backbone import Backbone
    from gas_lightning.flow_backbone import FlowBackbone

    return isinstance(x, (Backbone, FlowBackbone))
