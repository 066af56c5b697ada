"""Request -> plan -> grounded plan: pick the planner and the box source the user asked for.

Kept apart from the CLI so that scripts (tools/world/eval_world.py, notebooks) resolve plans the
same way `gas-edit` does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

from gas_lightning.errors import GasError, PlannerError
from gas_lightning.plan import WHOLE_IMAGE, Box, EditPlan

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "gas-lightning:"
BUNDLED_ALIASES = {"shapes-latent": "shapes-latent-model"}  # short ids of bundled folders
PLAN_FORMS = (
    "give the edit in one of these forms:\n"
    "  --request 'change the dog into a cat. change the grass into snow.'\n"
    "  --source 'a dog on grass' --target 'a cat on snow'   (two whole-scene sentences)\n"
    "  --plan plan.json                                    (a saved plan)\n"
    "  --sources '[a dog, grass]' --targets '[a cat, snow]' (explicit lists)\n"
    "  --planner llm --llm_model NAME --request '<free text>' (an OpenAI-compatible endpoint)"
)


@dataclass
class PlanSpec:
    """Every way a user can describe an edit; exactly one of them may be used.

    Args:
        request: the edit, one sentence per object: 'change the dog into a cat. change the grass into snow.'
        source: the whole scene before the edit, as a sentence (with --target)
        target: the whole scene after the edit, as a sentence (with --source)
        plan: a plan.json (an earlier edit's, or written by hand)
        sources: the objects to change, as a list of phrases (with --targets)
        targets: what each becomes, one phrase per source
        source_prompt: the whole-scene sentence before the edit (default: the phrases joined)
        target_prompt: the whole-scene sentence after the edit
        preserve_form: 1 per subtask whose shape must stay (the contrastive term), 0 otherwise
        intensities: per subtask, a multiplier of its gradient (0 switches it off)
        boxes: one box per subtask, [x0, y0, x1, y1] in 0..1 of the image, null where the detector finds it
        masks: one PNG per subtask (null: its box), or one label-map PNG whose pixel value k marks subtask k
        keep: objects that must not change, e.g. '[the blue square]'
        planner: auto, rules (the 'change A into B.' sentences) or llm (--llm_model on an OpenAI-compatible endpoint)
        llm_model: the model name the endpoint serves
        llm_base_url: the endpoint (default: OPENAI_BASE_URL or OpenAI's); the key comes from OPENAI_API_KEY
    """

    request: str | None = None
    source: str | None = None
    target: str | None = None
    plan: str | None = None
    sources: list[str] | None = None
    targets: list[str] | None = None
    source_prompt: str | None = None
    target_prompt: str | None = None
    preserve_form: list[int] | None = None
    intensities: list[float] | None = None
    boxes: list[list[float] | None] | None = None  # null entries: found by the detector
    # one PNG per subtask (null: that subtask keeps its box), or one label-map PNG whose pixel value k marks
    # subtask k (1 = the first; 0 = none). Masks replace boxes as the regions the gradients act on.
    masks: list[str | None] | str | None = None
    keep: list[str] | None = None  # objects that must not change (keep subtasks, found by the detector)
    planner: str = "auto"  # auto | rules | llm
    llm_model: str | None = None
    llm_base_url: str | None = None


@dataclass
class GroundingSpec:
    """Where boxes come from when the plan has none.

    Args:
        detector: "world" for the bundled shapes world, or a GroundingDINO hub id / local folder for photos
        segmenter: "world", or a local SAM folder: each object's mask instead of its box
        segment: all objects get masks, or same_outline: only kept objects and recolours (a shape change keeps its box)
        keep_unmentioned: keep every object the detector lists that the request does not name (world detector)
        grounding_fallback: error, or whole_image: a phrase the detector cannot find edits the whole image
    """

    detector: str | None = None  # hub id / path of a GroundingDINO, or "world" for the bundled shapes world
    detector_backend: str = "transformers"  # transformers | groundingdino-py
    detector_config: str | None = None  # groundingdino-py: the original config .py
    detector_checkpoint: str | None = None  # groundingdino-py: the original .pth
    detector_text_encoder: str | None = None  # groundingdino-py: a local bert-base-uncased folder (offline)
    detector_device: str = "cpu"
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    grounding_fallback: str = "error"  # error | whole_image
    # turns each subtask's box into an object mask: a local SAM folder (transformers' SamModel), or "world"
    # for the bundled shapes world's exact masks. Whole-image boxes (backgrounds) keep the whole image.
    segmenter: str | None = None
    segmenter_device: str = "cpu"
    # all: every object subtask gets its mask; same_outline: only kept objects, preserve-form swaps and
    # recolours, while a shape change keeps its box (its mask would be the old shape)
    segment: Literal["all", "same_outline"] = "all"
    # objects the detector lists that no subtask names get keep subtasks (a user asking for one change expects
    # the rest to stay); the world detector lists a scene's objects, GroundingDINO lists none
    keep_unmentioned: bool = True


def resolve_bundled(path: str | None) -> str | None:
    """'gas-lightning:NAME' names a file or folder shipped inside the package (worlds/assets/NAME)."""
    if path is None or not str(path).startswith(BUNDLED_PREFIX):
        return path
    from gas_lightning.worlds import ASSETS_DIR

    name = str(path)[len(BUNDLED_PREFIX) :]
    target = ASSETS_DIR / BUNDLED_ALIASES.get(name, name)
    if not target.exists():
        raise GasError(f"{path!r} is not shipped with this installation (looked in {ASSETS_DIR})")
    return str(target)


def make_plan(spec: PlanSpec, image: Image.Image | None = None) -> EditPlan:
    """Turn whichever description the user gave into an EditPlan (boxes from --boxes only)."""
    from gas_lightning.planners import diff_sentences, is_structured_request, parse_request
    from gas_lightning.planners.request import strip_quotes

    given = [
        name
        for name, used in (
            ("--request", spec.request is not None),
            ("--source/--target", spec.source is not None or spec.target is not None),
            ("--plan", spec.plan is not None),
            ("--sources/--targets", spec.sources is not None or spec.targets is not None),
        )
        if used
    ]
    if len(given) != 1:
        what = "no edit was given" if not given else f"{' and '.join(given)} were both given"
        raise PlannerError(f"{what}; {PLAN_FORMS}")

    if spec.request is not None and not spec.request.strip():
        raise PlannerError(f"--request is empty; {PLAN_FORMS}")
    if spec.plan is not None:
        plan = EditPlan.load(spec.plan)
    elif spec.sources is not None or spec.targets is not None:
        if spec.sources is None or spec.targets is None:
            raise PlannerError("--sources and --targets go together (one target phrase per source phrase)")
        plan = EditPlan.from_lists(
            spec.sources,
            spec.targets,
            spec.source_prompt,
            spec.target_prompt,
            preserve_form=spec.preserve_form,
            intensities=spec.intensities,
        )
    elif spec.source is not None or spec.target is not None:
        if spec.source is None or spec.target is None:
            raise PlannerError("--source and --target go together: the whole-scene sentence before and after the edit")
        plan = diff_sentences(spec.source, spec.target)
    else:
        use_llm = spec.planner == "llm" or (
            spec.planner == "auto" and spec.llm_model and not is_structured_request(spec.request)
        )
        if use_llm:
            plan = _llm_plan(spec, image)
        elif is_structured_request(spec.request) or spec.planner == "rules":
            plan = parse_request(spec.request)
        else:
            raise PlannerError(
                f"the request {spec.request!r} mixes forms or is free text, and no LLM planner is configured. "
                f"Either write every sentence as 'change A into B.', or {PLAN_FORMS.splitlines()[-1].strip()}"
            )
    if spec.preserve_form is not None and spec.sources is None:
        plan = _apply_list(plan, "preserve_form", [bool(v) for v in spec.preserve_form])
    if spec.intensities is not None and spec.sources is None:
        plan = _apply_list(plan, "intensity", [float(v) for v in spec.intensities])
    if spec.sources is None and (spec.source_prompt or spec.target_prompt):
        from dataclasses import replace

        plan = replace(
            plan,
            source_prompt=spec.source_prompt or plan.source_prompt,
            target_prompt=spec.target_prompt or plan.target_prompt,
        )
    if spec.keep:
        plan = plan.with_keep([strip_quotes(k) for k in spec.keep])
    if spec.boxes is not None:
        plan = plan.with_boxes(spec.boxes)
    if spec.masks is not None:
        plan = _apply_masks(plan, spec.masks)
    return plan


def _apply_masks(plan: EditPlan, masks: list[str | None] | str) -> EditPlan:
    """--masks: a list gives one PNG per subtask; one path is a label map (value k: subtask k).
    Paths are made absolute, so the plan.json an edit writes runs again from anywhere."""
    if not isinstance(masks, str):
        return plan.with_masks([None if m is None else _absolute(m) for m in masks])
    from gas_lightning.masks import label_values

    n = len(plan.subtasks)
    extra = [v for v in label_values(masks, "--masks label map") if v > n]
    if extra:
        raise PlannerError(
            f"--masks label map {masks!r} has the labels {extra} but the plan has {n} subtasks "
            "(pixel value k marks subtask k, 1 = the first; 0 = none); relabel it, or pass "
            "one PNG per subtask as a list: --masks '[a.png, b.png]'"
        )
    return plan.with_masks([_absolute(masks)] * n, labels=list(range(1, n + 1)))


def _absolute(path: str) -> str:
    from pathlib import Path

    return path if path.startswith("data:") else str(Path(path).expanduser().absolute())


def _apply_list(plan: EditPlan, key: str, values: Sequence[Any]) -> EditPlan:
    from dataclasses import replace

    if len(values) != len(plan.subtasks):
        raise PlannerError(f"{len(values)} values for --{key} but the plan has {len(plan.subtasks)} subtasks")
    return plan.replace_subtasks([replace(s, **{key: v}) for s, v in zip(plan.subtasks, values)])


def _llm_plan(spec: PlanSpec, image: Image.Image | None) -> EditPlan:
    from gas_lightning.planners.llm import LLMPlanner

    if not spec.llm_model:
        raise PlannerError("--planner llm needs --llm_model NAME (the model name your endpoint serves)")
    if image is None:
        raise PlannerError("the LLM planner needs the image (--image)")
    return LLMPlanner(model=spec.llm_model, base_url=spec.llm_base_url).plan(image, spec.request)


def make_grounder(spec: GroundingSpec):
    """The box source for subtasks without boxes, or None when the user configured none."""
    if spec.detector is None and spec.detector_backend == "transformers":
        return None
    if spec.detector == "world":
        from gas_lightning.worlds.grounder import WorldGrounder

        return WorldGrounder()
    from gas_lightning.grounding import build_grounder

    return build_grounder(
        backend=spec.detector_backend,
        detector=spec.detector,
        config=spec.detector_config,
        checkpoint=spec.detector_checkpoint,
        device=spec.detector_device,
        box_threshold=spec.box_threshold,
        text_threshold=spec.text_threshold,
        text_encoder=spec.detector_text_encoder,
    )


def make_segmenter(spec: GroundingSpec):
    """The mask source for boxed subtasks, or None when the user configured none."""
    if spec.segmenter is None:
        return None
    if spec.segmenter == "world":
        from gas_lightning.worlds.grounder import WorldGrounder

        return WorldGrounder()
    from gas_lightning.grounding.segmenter import SamSegmenter

    return SamSegmenter(resolve_bundled(spec.segmenter), device=spec.segmenter_device)


def ground(plan: EditPlan, image: Image.Image, spec: GroundingSpec) -> EditPlan:
    """Check the plan's masks, fill the boxes it lacks from the configured detector, then turn
    boxes into masks with the configured segmenter."""
    from gas_lightning.grounding import fallback_whole_image, ground_plan
    from gas_lightning.masks import check_plan_masks

    fallback = fallback_whole_image(spec.grounding_fallback)
    plan = check_plan_masks(plan, image.size)  # a bad mask fails here, before any model loads
    lists = spec.keep_unmentioned and spec.detector == "world"  # the detectors that can list objects
    grounder = make_grounder(spec) if lists or not plan.grounded else None
    if not plan.grounded:
        plan = ground_plan(plan, image, grounder, fallback_whole_image=fallback)
    if lists and isinstance(grounder, ObjectLister):
        plan = keep_unmentioned(plan, grounder.objects(image))
    segmenter = make_segmenter(spec)
    if segmenter is not None:
        from gas_lightning.grounding.segmenter import segment_plan

        plan = segment_plan(plan, image, segmenter, scope=spec.segment)
    return plan


@runtime_checkable
class ObjectLister(Protocol):
    """A detector that can say which objects an image holds, as (phrase, box) pairs."""

    def objects(self, image: Image.Image) -> list[tuple[str, Box]]: ...


def _iou(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def keep_unmentioned(plan: EditPlan, objects: Sequence[tuple[str, Box]]) -> EditPlan:
    """A keep subtask for every listed object that no subtask's box covers (IoU under 0.5).

    Without them a background edit drags every object the request does not name along with it;
    a user should not have to name each object to keep it. Whole-image boxes (a background, a
    scene) name no object.
    """
    named = [s.box for s in plan.subtasks if s.box is not None and s.box != WHOLE_IMAGE]
    extra = [(p, b) for p, b in objects if all(_iou(b, n) < 0.5 for n in named)]
    if not extra:
        return plan
    log.info(
        "keeping what the request does not name: %s (--keep_unmentioned false edits without them)",
        ", ".join(p for p, _ in extra),
    )
    return plan.with_keep([p for p, _ in extra], [b for _, b in extra])
