"""The web app's work without a browser: upload checks, boxes from the page, stop and continue."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from PIL import Image

from gas_lightning.app import EditApp, annotation, label_colours, load_upload, plan_with_boxes
from gas_lightning.errors import GasError
from gas_lightning.plan import EditPlan


def _plan(*pairs):
    return EditPlan.from_lists([s for s, _ in pairs], [t for _, t in pairs])


# uploads ------------------------------------------------------------------------------------


def test_upload_that_is_not_an_image_names_the_file_not_the_temp_folder(tmp_path):
    bad = tmp_path / "gradio-cache-123" / "holiday.png"
    bad.parent.mkdir()
    bad.write_text("not a picture")
    with pytest.raises(GasError) as e:
        load_upload(str(bad))
    assert "holiday.png" in str(e.value) and "gradio-cache-123" not in str(e.value)
    assert "PNG or JPEG" in str(e.value)


def test_upload_too_large_and_missing(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is then over twice the limit
    with pytest.raises(GasError, match="too large to edit safely"):
        load_upload(str(path))
    with pytest.raises(GasError, match="no image uploaded"):
        load_upload(None)


def test_upload_is_decoded_like_a_cli_input(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("LA", (30, 20), (100, 0)).save(path)  # transparent grey: laid over white, as --image
    image = load_upload(str(path))
    assert image.mode == "RGB" and image.size == (30, 20)
    assert image.getpixel((0, 0)) == (255, 255, 255)


# boxes from the page ---------------------------------------------------------------------------


def test_drawn_boxes_become_normalised_plan_boxes():
    plan = _plan(("the dog", "a cat"), ("the grass", "snow"))
    drawn = [{"label": "The  Dog", "xmin": 10, "ymin": 20, "xmax": 30, "ymax": 40, "color": (0, 0, 0)}]
    out = plan_with_boxes(plan, drawn, (100, 50))
    assert out.subtasks[0].box == pytest.approx((0.10, 0.40, 0.30, 0.80))  # 10/100, 20/50, 30/100, 40/50
    assert out.subtasks[1].box == (0.0, 0.0, 1.0, 1.0)  # no box drawn: the whole image
    assert [s.target for s in out.subtasks] == ["a cat", "snow"]


def test_boxes_dragged_past_the_edge_are_clipped_and_repeated_labels_fill_in_order():
    plan = _plan(("the dog", "a cat"), ("the dog", "a fox"))
    drawn = [
        {"label": "the dog", "xmin": -5, "ymin": 0, "xmax": 50, "ymax": 60},
        {"label": "the dog", "xmin": 60, "ymin": 10, "xmax": 120, "ymax": 50},
    ]
    out = plan_with_boxes(plan, drawn, (100, 50))
    assert out.subtasks[0].box == pytest.approx((0.0, 0.0, 0.5, 1.0))
    assert out.subtasks[1].box == pytest.approx((0.6, 0.2, 1.0, 1.0))


@pytest.mark.parametrize(
    "box, message",
    [
        ({"label": "", "xmin": 1, "ymin": 1, "xmax": 9, "ymax": 9}, "has no label"),
        ({"label": "the cat", "xmin": 1, "ymin": 1, "xmax": 9, "ymax": 9}, "marks no object of the request"),
        ({"label": "the dog", "xmin": 120, "ymin": 1, "xmax": 130, "ymax": 9}, "is empty"),  # wholly outside
    ],
)
def test_bad_drawn_boxes_are_refused_with_what_to_do(box, message):
    with pytest.raises(GasError, match=message):
        plan_with_boxes(_plan(("the dog", "a cat")), [box], (100, 50))


def test_a_newly_drawn_box_replaces_the_objects_earlier_one():
    plan = _plan(("the dog", "a cat"), ("the grass", "snow"))
    drawn = [
        {"label": "the dog", "xmin": 20, "ymin": 5, "xmax": 40, "ymax": 45},  # drawn: the editor puts it first
        {"label": "the dog", "xmin": 1, "ymin": 1, "xmax": 9, "ymax": 9},  # detected
        {"label": "the grass", "xmin": 0, "ymin": 25, "xmax": 100, "ymax": 50},
    ]
    out = plan_with_boxes(plan, drawn, (100, 50))
    assert out.subtasks[0].box == pytest.approx((0.2, 0.1, 0.4, 0.9))
    assert out.subtasks[1].box == pytest.approx((0.0, 0.5, 1.0, 1.0))


def test_boxes_shown_on_the_page_come_back_within_half_a_pixel():
    plan = _plan(("the dog", "a cat"), ("the grass", "snow")).with_boxes([[0.123, 0.2, 0.51, 0.77], None])
    image = Image.new("RGB", (200, 100))
    shown = annotation(image, plan)
    # the grass has the whole image: not drawn (it would tint the whole picture), and whole again on the way back
    assert [b["label"] for b in shown["boxes"]] == ["the dog"]
    assert shown["boxes"][0] | {"color": None} == {
        "xmin": 25,
        "ymin": 20,
        "xmax": 102,
        "ymax": 77,
        "label": "the dog",
        "color": None,
    }  # 24.6, 20, 102, 77 rounded
    back = plan_with_boxes(plan, shown["boxes"], image.size)
    assert back.subtasks[0].box == pytest.approx((25 / 200, 0.2, 102 / 200, 0.77))
    assert back.subtasks[1].box == (0.0, 0.0, 1.0, 1.0)


def test_a_whole_image_box_is_not_drawn_but_its_object_keeps_a_label_and_colour():
    """Issue 28, point 8: the background's whole-image box tinted the whole preview."""
    plan = _plan(("the snow", "grass"), ("the dog", "a cat")).with_boxes([[0, 0, 1, 1], [0.5, 0.5, 1, 1]])
    shown = annotation(Image.new("RGB", (10, 10)), plan)
    assert [(b["label"], b["xmin"], b["ymin"], b["xmax"], b["ymax"]) for b in shown["boxes"]] == [
        ("the dog", 5, 5, 10, 10)
    ]
    colours = label_colours(plan)
    assert list(colours) == ["the snow", "the dog"] and colours["the dog"] == shown["boxes"][0]["color"]
    assert colours["the snow"] != colours["the dog"]


# the edit: previews, stop, continue ---------------------------------------------------------------

FAST_PREVIEWS = {
    "callbacks": [{"class_path": "gas_lightning.callbacks.EditPreviews", "init_args": {"every_n_steps": 2}}]
}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return EditApp(output_dir=str(tmp_path_factory.mktemp("app")))  # the bundled model and preset


def test_find_boxes_of_the_bundled_request(app):
    from gas_lightning.resolve import resolve_bundled

    image = load_upload(resolve_bundled("gas-lightning:example.png"))
    plan, note = app.find_boxes(image, app.default_request)
    assert note == "" and [s.source for s in plan.subtasks] == [
        "the red circle",
        "the blue square",
        "the snow",
        "the orange triangle",
    ]
    with pytest.raises(GasError, match="request is empty"):
        app.find_boxes(image, "  ")
    plan, note = app.find_boxes(image, "change the purple circle into a green circle.")
    assert "not found: the purple circle" in note and plan.subtasks[0].box == (0.0, 0.0, 1.0, 1.0)


def test_without_a_detector_every_object_is_left_to_draw(tmp_path):
    config = tmp_path / "no_detector.yaml"
    config.write_text("request: change the red circle into a blue circle. keep the snow.\n")
    app = EditApp(config=str(config), output_dir=str(tmp_path / "edits"))
    plan, note = app.find_boxes(Image.new("RGB", (40, 30)), app.default_request)
    assert [s.source for s in plan.subtasks] == ["the red circle", "the snow"]
    assert [s.box for s in plan.subtasks] == [(0.0, 0.0, 1.0, 1.0)] * 2 and "draw each object's box" in note


def test_a_bad_config_is_one_clear_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("no_such_flag: 1\n")
    with pytest.raises(GasError, match="--config .*bad.yaml.*no_such_flag"):
        EditApp(config=str(config))


def test_stop_keeps_interrupted_ckpt_and_continue_resumes_to_the_end(app):
    from gas_lightning.resolve import resolve_bundled

    image = load_upload(resolve_bundled("gas-lightning:example.png"))
    plan, _ = app.find_boxes(image, app.default_request)
    steps = 6
    first = []
    for event in app.run("s1", image, plan, steps, seed=3, trainer=FAST_PREVIEWS):
        first.append(event)
        if event[0] == "step" and event[1] == 1:
            assert app.stop("s1")  # stops after the step that is running when this arrives
    kind, out, message = first[-1]
    assert kind == "stopped", first[-1]
    stopped_at = int(message.rsplit(" ", 1)[1])
    assert [e[1] for e in first if e[0] == "step"] == list(range(1, stopped_at + 1))
    ckpt = out / "checkpoints" / "interrupted.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == stopped_at
    assert not (out / "edited.png").exists()
    assert not app.stop("s1")  # nothing runs any more

    second = list(app.run("s1", image, plan, steps, seed=3, resume_dir=out, trainer=FAST_PREVIEWS))
    assert [e[1] for e in second if e[0] == "step"] == list(range(stopped_at + 1, steps + 1))
    result = second[-1][1]
    assert second[-1][0] == "done" and result.steps == steps and (out / "edited.png").is_file()
    # previews every 2 steps reach the page as the same pictures the callback saves for TensorBoard's folder
    previews = [e for e in first + second if e[0] == "preview"]
    assert [e[2] for e in previews] == [s for s in range(2, steps + 1, 2)]
    for _, picture, step in previews:
        saved = Image.open(out / "previews" / f"step_{step:06d}.png").convert("RGB")
        assert picture.tobytes() == saved.tobytes()
    assert "plan: " + str(out / "plan.json") in (out / "config.yaml").read_text()  # config.yaml repeats the edit


@pytest.mark.parametrize("steps", [0, None, "many"])
def test_steps_that_are_not_a_count_are_refused(app, steps):
    with pytest.raises(GasError, match="steps must be a whole number of at least 1"):
        next(app.run("s2", Image.new("RGB", (32, 32)), _plan(("the dog", "a cat")), steps))


def _need_gradio() -> None:
    """As tests/test_app_browser.py: a missing app extra fails, unless skipped on purpose."""
    try:
        import gradio  # noqa: F401
        import gradio_image_annotation  # noqa: F401
    except ImportError as e:
        if os.environ.get("GAS_SKIP_BROWSER") == "1":
            pytest.skip(f"GAS_SKIP_BROWSER=1: {e}")
        pytest.fail(f"{e}: pip install -e '.[app]' (or set GAS_SKIP_BROWSER=1 to skip on purpose)", pytrace=False)


def test_busy_port_is_one_clear_error(app):
    _need_gradio()
    from gas_lightning.app_ui import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(GasError, match="choose another --port"):
            serve(app, "127.0.0.1", s.getsockname()[1], block=False)


def test_page_shows_an_upload_error_as_its_message(app, tmp_path):
    _need_gradio()
    from gradio_client import Client, handle_file

    from gas_lightning.app_ui import serve

    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = serve(app, "127.0.0.1", port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(Exception) as e:
            client.predict(handle_file(str(bad)), api_name="/take_image")
        assert "could not read image 'notes.png'" in str(e.value)
    finally:
        demo.close()
