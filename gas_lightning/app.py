"""`gas-edit app`: edits from the browser, on the runner `gas-edit` and `edit()` share.

Upload -> request -> boxes from the configured detector (`plan_edit`), drawn over the image and
corrected by dragging or drawing (gradio_image_annotation) -> the edit in a background thread,
its previews handed over by the EditPreviews callback that writes TensorBoard's -> Stop (the
callbacks keep interrupted.ckpt) and Continue (`resume`) -> edited.png, plan.json, config.yaml.

`EditApp` holds what the page does without Gradio, so it is tested without a browser;
`build_ui` only wires it to components.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback

from gas_lightning.api import BUNDLED_MODEL, BUNDLED_PRESET, edit, load_model, plan_edit
from gas_lightning.errors import GasError
from gas_lightning.plan import WHOLE_IMAGE, EditPlan, check_box

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("gas_lightning")

EXAMPLE_IMAGE = "gas-lightning:example.png"
DOWNLOADS = ("edited.png", "plan.json", "config.yaml")


class EditStopped(Exception):
    """Raised inside the Trainer when the user presses Stop: Lightning then runs the callbacks'
    `on_exception`, and FinalCheckpoint keeps interrupted.ckpt for Continue."""


class PageHooks(Callback):
    """Connects one running edit to the page: previews from EditPreviews, the step count, the Stop button."""

    def __init__(self, events: queue.Queue, stop: threading.Event):
        self.events = events
        self.stop = stop

    def setup(self, trainer, pl_module, stage: str) -> None:
        from gas_lightning.callbacks import EditPreviews

        for cb in trainer.callbacks:
            if isinstance(cb, EditPreviews):
                cb.add_sink(lambda image, step: self.events.put(("preview", image, step)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.events.put(("step", trainer.global_step, trainer.max_steps))
        if self.stop.is_set():
            raise EditStopped(f"stopped at step {trainer.global_step}")


def load_upload(path: str | None) -> Image.Image:
    """An uploaded file, checked as `--image` is (format, size), with its own name in the message."""
    from gas_lightning.pipeline import load_image

    if not path:
        raise GasError("no image uploaded: drop a PNG, JPEG or WebP file on the Image box")
    try:
        return load_image(path)
    except GasError as e:
        raise GasError(str(e).replace(str(path), Path(path).name)) from None


def annotation(image: Image.Image, plan: EditPlan) -> dict[str, Any]:
    """The plan's boxes in the pixel coordinates the box editor uses, labelled with their objects.
    A whole-image box (a background's) is left out: drawn, it would tint the whole picture, and a
    subtask without a box edits the whole image anyway (plan_with_boxes)."""
    from gas_lightning.grounding.base import _COLOURS

    w, h = image.size
    boxes = []
    for i, s in enumerate(plan.subtasks):
        if (s.box or WHOLE_IMAGE) == WHOLE_IMAGE:
            continue
        x0, y0, x1, y1 = s.box
        boxes.append(
            {
                "xmin": round(x0 * w),
                "ymin": round(y0 * h),
                "xmax": round(x1 * w),
                "ymax": round(y1 * h),
                "label": s.source,
                "color": _COLOURS[i % len(_COLOURS)],
            }
        )
    return {"image": image, "boxes": boxes}


def check_rows(report: dict | None) -> list[list]:
    """The page's check table: one row per subtask (its number, objects, verdict and scores)."""
    return [
        [
            v["index"],
            f"{v['source']} -> {v['target']}",
            v["verdict"],
            ", ".join(f"{k} {x:.2f}" for k, x in v["scores"].items()),
        ]
        for v in (report or {}).get("verdicts", [])
    ]


def label_colours(plan: EditPlan) -> dict[str, tuple[int, int, int]]:
    """Each object's label and the colour of its boxes (the first subtask's), also for objects drawn without one."""
    from gas_lightning.grounding.base import _COLOURS

    colours: dict[str, tuple[int, int, int]] = {}
    for i, s in enumerate(plan.subtasks):
        colours.setdefault(s.source, _COLOURS[i % len(_COLOURS)])
    return colours


def plan_with_boxes(plan: EditPlan, boxes: Sequence[dict], size: tuple[int, int]) -> EditPlan:
    """The plan with the boxes as drawn. Boxes go by label to the subtasks whose object it names, in
    order; a newly drawn box replaces the object's earlier one (drawing adds a box, at the front of
    the editor's list, so drawing is how to redo one); a subtask left without a box edits the whole image."""
    w, h = size
    key = lambda text: " ".join(str(text).lower().split())  # noqa: E731
    names = ", ".join(repr(s.source) for s in plan.subtasks)
    slots: dict[str, list[int]] = {}
    for i, s in enumerate(plan.subtasks):
        slots.setdefault(key(s.source), []).append(i)
    drawn: dict[str, list[dict]] = {}
    for b in boxes:
        label = key(b.get("label") or "")
        if not label:
            raise GasError(f"a box has no label; click it and name the object it marks (one of {names})")
        if label not in slots:
            raise GasError(f"the box labelled {b['label']!r} marks no object of the request; label it one of {names}")
        drawn.setdefault(label, []).append(b)
    new: list = [WHOLE_IMAGE] * len(plan.subtasks)
    for label, found in drawn.items():
        for i, b in zip(slots[label], found[: len(slots[label])]):  # the newest boxes of each label
            pixels = (b["xmin"], b["ymin"], b["xmax"], b["ymax"])
            scaled = [min(max(float(v) / d, 0.0), 1.0) for v, d in zip(pixels, (w, h, w, h))]
            new[i] = check_box(scaled, f"the box of {plan.subtasks[i].source!r}")
    return plan.replace_subtasks([replace(s, box=b) for s, b in zip(plan.subtasks, new)])


class EditApp:
    """What the page does: find boxes, run, stop and continue edits; one model, loaded once.

    Args:
        model: a model id or folder; the bundled one by default.
        config: a gas-edit config for the edits (steps, guidance, detector); by default the bundled
            preset with the bundled model, gas-edit's defaults otherwise.
        output_dir: each edit writes a new folder below it.
        device: where the model runs ("auto": CUDA when present).
    """

    def __init__(
        self,
        model: str = BUNDLED_MODEL,
        config: str | None = None,
        output_dir: str = "outputs/app",
        device: str = "auto",
    ):
        from jsonargparse import ArgumentError

        from gas_lightning.callbacks.progress import step_progress_bar
        from gas_lightning.resolve import resolve_bundled
        from gas_lightning.runner import build_parser

        self.model, self.device = model, device
        self.config = config or (resolve_bundled(BUNDLED_PRESET) if model == BUNDLED_MODEL else None)
        parser = build_parser(exit_on_error=False)
        try:
            cfg = parser.parse_path(self.config) if self.config else parser.get_defaults()
        except ArgumentError as e:
            raise GasError(f"--config {self.config}: {' '.join(str(e).split())[:400]}") from None
        self._cfg = cfg
        self.default_request = cfg.request or ""
        self.default_steps = int(cfg.trainer.max_steps)
        self._terminal = lambda: step_progress_bar(cfg.trainer)
        self.output_dir = Path(output_dir)
        self._backbone = None
        self._stops: dict[str, threading.Event] = {}

    def backbone(self):
        if self._backbone is None:
            self._backbone = load_model(self.model, device=self.device)
        return self._backbone

    def find_boxes(self, image: Image.Image, request: str) -> tuple[EditPlan, str]:
        """The plan of `request` with detected boxes, and a note for the page; objects the detector
        cannot find, or all when the config names no detector, get the whole image, for the user to draw."""
        from gas_lightning.grounding.base import GroundingMiss
        from gas_lightning.resolve import PlanSpec, make_plan

        if not (request or "").strip():
            raise GasError("the request is empty: write one 'change A into B.' sentence per object")
        if self._cfg.detector is None and self._cfg.detector_backend == "transformers":
            spec = PlanSpec(
                request=request,
                planner=self._cfg.planner,
                llm_model=self._cfg.llm_model,
                llm_base_url=self._cfg.llm_base_url,
            )
            plan = make_plan(spec, image)
            return (
                plan.with_boxes([WHOLE_IMAGE] * len(plan.subtasks)),
                "no detector is configured (--config names none): draw each object's box",
            )
        try:
            return plan_edit(image, request, config=self.config), ""
        except GroundingMiss as miss:
            plan = plan_edit(image, request, config=self.config, grounding_fallback="whole_image")
            return plan, f"not found: {', '.join(miss.missing)}; each has the whole image as its box: draw it"

    def rerun(self, session: str, done_dir: str | Path, steps: int, seed: int = 0) -> Iterator[tuple]:
        """Run the subtasks of a finished edit that were not judged done again, on its result: a new
        edit of its edited.png, with the subtasks judged done held as keep terms (as a --refine pass).
        A kept object the edit lost is not restored here: edited.png, the reference, no longer holds it
        (--refine restores it from the source)."""
        import json

        from gas_lightning.checking import Verdict
        from gas_lightning.pipeline import load_image
        from gas_lightning.refine import failed, refine_plan

        out = Path(done_dir)
        if not (out / "report.json").is_file():
            raise GasError("this edit was not checked (no report.json), so nothing is known to have failed")
        plan = EditPlan.load(out / "plan.json")
        verdicts = [Verdict.from_dict(v) for v in json.loads((out / "report.json").read_text())["verdicts"]]
        if not failed(plan, verdicts):
            raise GasError("every subtask was judged done: nothing to run again")
        again = refine_plan(plan, verdicts, self._cfg.refine_boost, [1] * len(plan.subtasks), restore=False)
        yield from self.run(session, load_image(out / "edited.png"), again, steps, seed)

    def stop(self, session: str) -> bool:
        """Ask the session's running edit to stop after its current step; False when none runs."""
        event = self._stops.get(session)
        if event is None:
            return False
        event.set()
        return True

    def run(
        self,
        session: str,
        image: Image.Image,
        plan: EditPlan,
        steps: int,
        seed: int = 0,
        resume_dir: str | Path | None = None,
        **options: Any,
    ) -> Iterator[tuple]:
        """Edit in a background thread and yield ("step", n, total), ("preview", image, n) as they come,
        then ("done", EditResult) or ("stopped", output_dir, "stopped at step N"). `resume_dir`: continue a stopped edit
        there from its interrupted.ckpt. `options` are `edit()` keywords (tests shorten previews)."""
        try:
            steps, seed = int(steps), int(seed or 0)
        except (TypeError, ValueError):
            raise GasError(f"steps must be a whole number of at least 1, got {steps!r}") from None
        if steps < 1:
            raise GasError(f"steps must be a whole number of at least 1, got {steps}")
        if resume_dir is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            out = Path(tempfile.mkdtemp(prefix="edit-", dir=self.output_dir))
        else:
            out = Path(resume_dir)
            options["resume"] = str(out / "checkpoints" / "interrupted.ckpt")
        plan.save(out / "plan.json")  # named in config.yaml (as --plan), so that file repeats the edit
        events: queue.Queue = queue.Queue()
        stop = self._stops[session] = threading.Event()
        hooks = [PageHooks(events, stop), *self._terminal()]
        backbone = self.backbone()

        def work() -> None:
            try:
                events.put(
                    (
                        "done",
                        edit(
                            image,
                            plan=out / "plan.json",
                            model=backbone,
                            config=self.config,
                            steps=steps,
                            seed=seed,
                            output_dir=out,
                            callbacks=hooks,
                            **options,
                        ),
                    )
                )
            except EditStopped as e:
                events.put(("stopped", out, str(e)))
            except BaseException as e:  # handed to the page's thread, raised there
                events.put(("error", e))

        thread = threading.Thread(target=work, name="gas-edit", daemon=True)
        thread.start()
        try:
            while True:
                event = events.get()
                if event[0] == "error":
                    raise event[1]
                yield event
                if event[0] in ("done", "stopped"):
                    return
        finally:  # the page went away mid-edit: stop it, keep its checkpoint, free the device
            stop.set()
            thread.join()
            self._stops.pop(session, None)
