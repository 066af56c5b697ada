"""The page of `gas-edit app`: Gradio components wired to `EditApp` (gas_lightning/app.py), and its server.

Each handler turns a GasError into gr.Error, so a bad upload or request shows its message in the
page. Edits share one queue slot (`concurrency_id="device"`), so they run one at a time.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import inspect
import logging
import os
import sys
import warnings
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check

import gradio as gr  # noqa: E402
from gradio_image_annotation import image_annotator  # noqa: E402

from gas_lightning.app import (  # noqa: E402
    BUNDLED_MODEL,
    DOWNLOADS,
    EXAMPLE_IMAGE,
    EditApp,
    annotation,
    check_rows,
    label_colours,
    load_upload,
    plan_with_boxes,
)
from gas_lightning.errors import GasError  # noqa: E402
from gas_lightning.plan import EditPlan  # noqa: E402
from gas_lightning.resolve import resolve_bundled  # noqa: E402
from gas_lightning.terminal import setup_terminal  # noqa: E402

log = logging.getLogger("gas_lightning")

CSS = "#preview img, #edited img {image-rendering: pixelated; width: 100%; object-fit: contain}"  # small models
INTRO = """# gas-lightning
1. Upload an image, or use the bundled example.
2. Write the request, one sentence per object: `change A into B.` Objects it does not name are kept.
3. *Find the boxes* asks the detector where each object is (it runs by itself after an upload). Check the
   boxes: to redo one, draw a box over its object and choose the object's name (the newest box of an object
   counts); the hand tool moves and resizes boxes. An object without a box (a background) edits the whole image.
4. Edit: previews arrive while it runs; Stop keeps a checkpoint, Continue resumes it."""


def _page_errors(fn):
    """GasError -> gr.Error (the message in the page); anything else is logged and shown in one line."""

    def show(e: Exception):
        if isinstance(e, (GasError, gr.Error)):
            return e if isinstance(e, gr.Error) else gr.Error(str(e))
        log.exception("the app failed")
        return gr.Error(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]}")

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:
                raise show(e) from None

        return gen

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise show(e) from None

    return call


def build_ui(app: EditApp) -> gr.Blocks:
    @_page_errors
    def take_image(path):
        image = load_upload(path)
        return image_annotator(value={"image": image, "boxes": []}), {"image": image}

    def take_example():
        path = resolve_bundled(EXAMPLE_IMAGE)
        return (*take_image(path), path)  # the Image box shows the example's file, as after an upload

    @_page_errors
    def find_boxes(request, state):
        if not state.get("image"):
            raise GasError("upload an image first")
        plan, note = app.find_boxes(state["image"], request)
        colours = label_colours(plan)
        value = annotation(state["image"], plan)
        status = note or f"{len(plan.subtasks)} objects found; correct their boxes, then press Edit."
        return (
            image_annotator(value=value, label_list=list(colours), label_colors=list(colours.values())),
            status,
            {**state, "plan": plan.to_dict(), "request": request},
        )

    def outputs_of(event):
        kind = event[0]
        if kind == "step":
            return gr.skip(), f"step {event[1]}/{event[2]}", gr.skip(), gr.skip(), gr.skip()
        if kind == "preview":
            return event[1], f"step {event[2]}: preview", gr.skip(), gr.skip(), gr.skip()
        if kind == "stopped":
            out = event[1]
            return (
                gr.skip(),
                f"{event[2]}; the checkpoint is kept in {out / 'checkpoints'}: Continue resumes it.",
                gr.skip(),
                [str(out / n) for n in DOWNLOADS[1:]],
                gr.skip(),
            )
        result = event[1]
        out = result.output_dir
        checked = [n for n in ("report.json", "report.png") if (out / n).is_file()]
        return (
            gr.skip(),
            f"done: {result.steps} steps; the edit is in {out}",
            str(out / "edited.png"),
            [str(out / n) for n in (*DOWNLOADS, *checked)],
            check_rows(result.report),
        )

    def run_events(state, events):
        for event in events:
            if event[0] == "stopped":
                state = {**state, "stopped": str(event[1])}
            elif event[0] == "done":
                state = {**state, "stopped": None, "done": str(event[1].output_dir)}
            yield (*outputs_of(event), state)

    @_page_errors
    def start(request, boxes, steps, seed, state, req: gr.Request):
        if not state.get("plan"):
            raise GasError("find the boxes first (press Find the boxes)")
        if " ".join((request or "").split()) != " ".join(state["request"].split()):
            raise GasError("the request changed since the boxes were found; press Find the boxes again")
        if boxes and boxes.get("orientation"):
            raise GasError("the image was rotated in the box editor; rotate it back (the edit uses it as uploaded)")
        plan = plan_with_boxes(EditPlan.from_dict(state["plan"]), (boxes or {}).get("boxes") or [], state["image"].size)
        state = {**state, "run_plan": plan.to_dict(), "steps": steps, "seed": seed, "stopped": None}
        yield None, "starting", None, None, [], state
        yield from run_events(state, app.run(req.session_hash, state["image"], plan, steps, seed))

    @_page_errors
    def resume(state, req: gr.Request):
        if not state.get("stopped"):
            raise GasError("nothing to continue: Continue resumes an edit you stopped")
        plan = EditPlan.from_dict(state["run_plan"])
        yield gr.skip(), "continuing", gr.skip(), gr.skip(), gr.skip(), state
        yield from run_events(
            state,
            app.run(req.session_hash, state["image"], plan, state["steps"], state["seed"], resume_dir=state["stopped"]),
        )

    @_page_errors
    def again(steps, seed, state, req: gr.Request):
        if not state.get("done"):
            raise GasError("nothing to run again: finish an edit first")
        yield gr.skip(), "running the failed subtasks again", gr.skip(), gr.skip(), gr.skip(), state
        yield from run_events(state, app.rerun(req.session_hash, state["done"], steps, seed))

    def stop(req: gr.Request):
        return "stopping after this step..." if app.stop(req.session_hash) else "no edit is running"

    with gr.Blocks(title="gas-lightning", analytics_enabled=False) as demo:
        state = gr.State({})
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="upload")
                example = gr.Button("Use the bundled example", size="sm", elem_id="example")
                request = gr.Textbox(label="Request", value=app.default_request, lines=3, elem_id="request")
                find = gr.Button("Find the boxes", elem_id="find")
                # the title above the editor, not over it: a box at the picture's top edge keeps its label in view
                gr.Markdown("Boxes (draw to redo one, hand tool to move)", elem_id="boxes-title")
                boxes = image_annotator(
                    show_label=False, sources=[], image_type="pil", show_clear_button=False, height=420, elem_id="boxes"
                )
            with gr.Column():
                with gr.Row():
                    steps = gr.Number(label="Steps", value=app.default_steps, precision=0, minimum=1, elem_id="steps")
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                with gr.Row():
                    run = gr.Button("Edit", variant="primary", elem_id="run")
                    halt = gr.Button("Stop", variant="stop", elem_id="stop")
                    cont = gr.Button("Continue", elem_id="continue")
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    preview = gr.Image(label="Preview", type="pil", interactive=False, height=300, elem_id="preview")
                    edited = gr.Image(label="Edited", type="filepath", interactive=False, height=300, elem_id="edited")
                checks = gr.Dataframe(
                    headers=["#", "subtask", "verdict", "scores"],
                    label="Check: a verdict per subtask (docs/guide/checking.md)",
                    interactive=False,
                    elem_id="checks",
                )
                rerun = gr.Button("Run the failed subtasks again", elem_id="rerun")
                downloads = gr.File(
                    label="Downloads: edited.png, plan.json, config.yaml",
                    file_count="multiple",
                    interactive=False,
                    elem_id="downloads",
                )

        found = dict(fn=find_boxes, inputs=[request, state], outputs=[boxes, status, state])
        upload.upload(take_image, [upload], [boxes, state]).success(**found)
        example.click(take_example, None, [boxes, state, upload]).success(**found)
        find.click(**found)
        request.submit(**found)
        edit_outputs = [preview, status, edited, downloads, checks, state]
        run.click(
            start, [request, boxes, steps, seed, state], edit_outputs, concurrency_limit=1, concurrency_id="device"
        )
        cont.click(resume, [state], edit_outputs, concurrency_limit=1, concurrency_id="device")
        rerun.click(again, [steps, seed, state], edit_outputs, concurrency_limit=1, concurrency_id="device")
        halt.click(stop, None, status, queue=False)
    return demo


def main(argv: list[str] | None = None) -> int:
    """`gas-edit app [--host H] [--port P] [--model M] [--config C] [--output_dir D] [--device D]`."""
    p = argparse.ArgumentParser(prog="gas-edit app", description="Edit images from the browser (Gradio).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default=BUNDLED_MODEL, help="model id or folder (default: the bundled model)")
    p.add_argument("--config", default=None, help="gas-edit config for the edits (default: the bundled preset)")
    p.add_argument("--output_dir", default="outputs/app", help="each edit writes a new folder below it")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    setup_terminal()
    try:
        app = EditApp(model=args.model, config=args.config, output_dir=args.output_dir, device=args.device)
        demo = serve(app, args.host, args.port, block=False)
    except GasError as e:
        print(f"gas-edit app: error: {e}", file=sys.stderr)
        return 2
    print(f"gas-edit app: open http://{args.host}:{args.port} (edits in {app.output_dir}; Ctrl-C stops)", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    demo.close()
    return 0


def serve(app: EditApp, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the page; with `block=False` return the running Gradio app (tests close it)."""
    _quiet_gradio()
    app.output_dir.mkdir(parents=True, exist_ok=True)
    demo = build_ui(app).queue(default_concurrency_limit=1)
    system_fonts = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # no font CDN: works offline
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            quiet=True,
            show_error=True,
            prevent_thread_lock=not block,
            # the edits, and the example's file, which the Image box shows after "Use the bundled example"
            allowed_paths=[str(app.output_dir.resolve()), str(Path(resolve_bundled(EXAMPLE_IMAGE)).resolve())],
            max_file_size="64mb",
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            enable_monitoring=False,
            theme=system_fonts,
            css=CSS,
        )
    except OSError as e:
        raise GasError(f"cannot listen on {host}:{port} ({e}); choose another --port") from None
    return demo


def _quiet_gradio() -> None:
    """Gradio's route for custom-component files (the box editor's) prints a debug line per file:
    `print` is shadowed in that module only, its other messages kept. Its queue's pandas calls warn
    of pandas' own coming changes."""
    import gradio.routes

    warnings.filterwarnings("ignore", module="gradio.queueing")

    def print_but_component_files(*args, **kwargs):
        if not (args and str(args[0]).startswith("id=") and "environment=" in str(args[0])):
            builtins.print(*args, **kwargs)

    gradio.routes.print = print_but_component_files
