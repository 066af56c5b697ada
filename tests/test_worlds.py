"""The shapes world: sampler, cases, scorer, grounder and the shipped model folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from gas_lightning.errors import GroundingError
from gas_lightning.grounding.base import Grounder, GroundingMiss
from gas_lightning.worlds import EXAMPLE_IMAGE, EXAMPLE_REQUEST, MODEL_DIR
from gas_lightning.worlds.cases import Change, example_case, held_out_cases, make_case, sample_case
from gas_lightning.worlds.grounder import WorldGrounder, parse_phrase
from gas_lightning.worlds.scenes import (
    BACKGROUNDS,
    COLOURS,
    PALETTE,
    Scene,
    SceneObject,
    caption_of,
    render,
    sample_scene,
    training_caption,
)
from gas_lightning.worlds.scorer import aggregate, score


def _scene(*objs, background="snow", size=32):
    """Objects given as (shape, colour, x, y, side) in pixels of a 32x32 grid."""
    return Scene(
        objects=tuple(SceneObject(sh, co, (x / 32, y / 32, (x + s) / 32, (y + s) / 32)) for sh, co, x, y, s in objs),
        background=background,
        size=size,
    )


# scenes -----------------------------------------------------------------------------------
def test_sampler_is_deterministic_and_distinct():
    a = [sample_scene(np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    assert np.array_equal(render(a[0]), render(a[1]))
    rng = np.random.default_rng(3)
    for _ in range(50):
        s = sample_scene(rng)
        assert 1 <= len(s.objects) <= 3
        kinds = [(o.shape, o.colour) for o in s.objects]
        assert len(set(kinds)) == len(kinds)
        masks = [s.mask(i) for i in range(len(s.objects))]
        for i in range(len(masks)):  # non-overlapping
            for j in range(i + 1, len(masks)):
                assert not (masks[i] & masks[j]).any()


def test_exact_boxes_and_masks():
    s = _scene(("square", "red", 2, 3, 10), ("circle", "blue", 18, 18, 12), ("triangle", "green", 18, 2, 12))
    img = render(s)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert s.pixel_box(0) == (2, 3, 12, 13)
    assert s.box(0) == (2 / 32, 3 / 32, 12 / 32, 13 / 32)
    assert s.mask(0).sum() == 100
    assert (img[s.mask(0)] == COLOURS["red"]).all()
    assert 0.7 < s.mask(1).sum() / 144 < 0.85  # circle ~ pi/4 of its box
    assert 0.4 < s.mask(2).sum() / 144 < 0.6  # triangle ~ 1/2
    x0, y0, x1, y1 = s.pixel_box(1)
    assert (x0, y0) >= (18, 18) and (x1, y1) <= (30, 30)
    assert (img[s.coverage.sum(0) == 0] == BACKGROUNDS["snow"]).all()  # anti-aliased rims excepted
    big = render(s, 256)  # the same scene at another size
    assert big.shape == (256, 256, 3)
    assert (big[40, 40] == COLOURS["red"]).all()


def test_captions_and_phrases():
    s = _scene(("circle", "red", 2, 2, 10), ("square", "orange", 18, 18, 10), background="sand")
    assert s.phrases == ["a red circle", "an orange square"]
    assert s.caption == "a red circle and an orange square on sand"
    assert caption_of(["a", "b", "c"], "snow") == "a, b and c on snow"
    assert caption_of([], "snow") == "on snow"
    rng = np.random.default_rng(0)
    caps = [training_caption(s, rng) for _ in range(400)]
    assert 0.05 < caps.count("") / 400 < 0.16
    assert any(c in ("sand", "on sand", "the sand", "on the sand") for c in caps)
    assert any(c == "a red circle" for c in caps)


# cases ------------------------------------------------------------------------------------
def test_cases_are_seeded_and_have_no_duplicates():
    assert sample_case(5).request == sample_case(5).request
    for c in held_out_cases(60, seed=1):
        for scene in (c.source, c.target):
            kinds = [(o.shape, o.colour) for o in scene.objects]
            assert len(set(kinds)) == len(kinds)
        assert 2 <= len(c.changes) <= 3
        assert c.plan.grounded and len(c.plan.subtasks) == len(c.edited_objects) + c.background_changed + len(
            c.kept_objects
        )
        assert len(c.edit_plan(keep=False).subtasks) == len(c.changes)
        assert [s.keep for s in c.plan.subtasks].count(True) == len(c.kept_objects)
        for ch in c.changes:
            assert ch.before != ch.after


def test_case_plan_and_request():
    src = _scene(("circle", "red", 2, 2, 10), ("square", "blue", 18, 18, 10))
    c = make_case(src, [Change("colour", 0, "red", "yellow"), Change("background", None, "snow", "sand")])
    assert c.request == "change the red circle into a yellow circle. change the snow into sand. keep the blue square."
    assert c.request_text(keep=False) == "change the red circle into a yellow circle. change the snow into sand."
    p = c.plan
    assert [(s.source, s.target) for s in p.subtasks] == [
        ("a red circle", "a yellow circle"),
        ("snow", "sand"),
        ("a blue square", "a blue square"),
    ]
    assert p.subtasks[0].box == src.box(0) and p.subtasks[1].box == (0.0, 0.0, 1.0, 1.0)
    assert p.subtasks[2].box == src.box(1) and p.subtasks[2].keep and p.subtasks[2].penalty is False
    assert p.source_prompt == "a red circle and a blue square on snow"
    assert p.target_prompt == "a yellow circle and a blue square on sand"
    assert (c.target_image[src.coverage[0] == 1] == COLOURS["yellow"]).all()


# scorer -----------------------------------------------------------------------------------
def test_scorer_perfect_noop_and_wrong_object():
    src = _scene(("circle", "red", 2, 2, 12), ("square", "blue", 18, 4, 10), ("triangle", "green", 8, 18, 12))
    c = make_case(
        src,
        [
            Change("colour", 0, "red", "yellow"),
            Change("shape", 1, "square", "circle"),
            Change("background", None, "snow", "sand"),
        ],
    )
    perfect = score(c.target_image, c)
    assert perfect["per_attribute"] == perfect["all_attributes"] == perfect["preserved"] == 1.0
    assert perfect["untouched"] == [{"index": 2, "ok": True}]  # the green triangle is the one not edited
    assert perfect["erosion"] == 0.0 and perfect["bg_psnr_in_boxes"] == perfect["psnr_outside"] == 60.0
    assert score(Image.fromarray(render(c.target, 128)), c)["all_attributes"] == 1.0  # any size

    noop = score(c.source_image, c)
    assert noop["per_attribute"] == 0.0 and noop["all_attributes"] == 0.0
    assert noop["psnr_outside"] < 30

    # the yellow lands on the green triangle instead of the red circle
    wrong = make_case(
        src,
        [
            Change("colour", 2, "green", "yellow"),
            Change("shape", 1, "square", "circle"),
            Change("background", None, "snow", "sand"),
        ],
    )
    s = score(wrong.target_image, c)
    assert [a["ok"] for a in s["attributes"]] == [False, True, True]
    assert s["preserved"] == 0.0 and s["all_attributes"] == 0.0
    assert s["untouched"] == [{"index": 2, "ok": False}]  # it was turned yellow

    # an edited object that vanished into the background is eroded
    gone = make_case(src, [Change("background", None, "snow", "sand")])
    img = gone.target_image.copy()
    img[src.mask(0)] = PALETTE["sand"]
    eroded = score(img, c)
    assert eroded["erosion"] == 0.5 and eroded["eroded"] == 0.5  # one of the two edited objects

    agg = aggregate([perfect, noop])
    assert agg["per_attribute"] == 0.5 and agg["all_attributes"] == 0.5 and agg["cases"] == 2


def test_psnr_outside_objects_counts_the_ground_in_an_edited_box():
    """A halo pixel (ground inside the recoloured circle's box, off the circle) lowers the PSNR outside the
    edited objects and leaves the PSNR outside the edited boxes alone; a pixel on the circle lowers neither."""
    src = _scene(("circle", "red", 2, 2, 12), ("square", "blue", 18, 18, 10))
    c = make_case(src, [Change("colour", 0, "red", "yellow")])
    assert score(c.target_image, c)["psnr_outside_objects"] == 60.0
    corner = (2, 2)  # the circle's box starts at (2, 2); a circle does not reach its box's corner
    assert src.coverage[0][corner] == 0 and c.target.coverage[0][corner] == 0
    img = c.target_image.copy()
    img[corner] = np.clip(img[corner].astype(int) - 51, 0, 255)
    assert (img[corner].astype(int) - c.target_image[corner]).tolist() == [-51, -51, -51]
    # the edited objects cover the circle's pixels only (source and target: same place, same shape)
    ground = 32 * 32 - int(np.count_nonzero(src.coverage[0] > 0))
    halo = score(img, c)
    assert halo["psnr_outside"] == 60.0
    assert math.isclose(halo["psnr_outside_objects"], 10 * math.log10(255**2 * ground / 51**2))
    inside = c.target_image.copy()
    inside[8, 8] = 0  # the circle's centre
    assert score(inside, c)["psnr_outside_objects"] == 60.0


def test_scorer_on_held_out_cases():
    cases = held_out_cases(15, seed=3)
    assert aggregate(score(c.target_image, c) for c in cases)["all_attributes"] == 1.0
    assert aggregate(score(c.source_image, c) for c in cases)["per_attribute"] == 0.0


# grounder ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 96, 256])
def test_grounder_finds_exact_boxes(size):
    g = WorldGrounder()
    assert isinstance(g, Grounder)
    for c in held_out_cases(8, seed=2):
        scene = c.source.with_size(size)
        img = Image.fromarray(render(scene))
        phrases = [o.phrase for o in scene.objects] + [f"the {scene.background}", "the background"]
        boxes = g.ground(img, phrases)
        assert boxes[-2:] == [(0.0, 0.0, 1.0, 1.0)] * 2
        for i, box in enumerate(boxes[:-2]):
            assert np.abs(np.array(box) - np.array(scene.box(i))).max() * size <= 1.0


def test_grounder_phrase_forms_and_errors():
    assert parse_phrase("the red circle") == ("object", "red", "circle")
    assert parse_phrase("Red Circle") == ("object", "red", "circle")
    assert parse_phrase("snow") == ("background", None, None)
    img = Image.open(EXAMPLE_IMAGE)
    g = WorldGrounder()
    assert g.ground(img, ["red circle"]) == g.ground(img, ["a red circle"])
    with pytest.raises(GroundingError, match="unknown word 'dog'.*colours red"):
        g.ground(img, ["a dog"])
    with pytest.raises(GroundingMiss, match="no 'a purple square'.*it sees") as miss:
        g.ground(img, ["the red circle", "a purple square"])
    assert miss.value.boxes[0] is not None and miss.value.boxes[1] is None


def test_bundled_example_is_groundable():
    from gas_lightning.planners import parse_request

    plan = parse_request(EXAMPLE_REQUEST.read_text())
    case = example_case()
    assert EXAMPLE_REQUEST.read_text().strip() == case.request
    assert [s.keep for s in plan.subtasks] == [False, False, False, True]
    boxes = WorldGrounder().ground(Image.open(EXAMPLE_IMAGE), [s.source for s in plan.subtasks])
    assert np.allclose([boxes[i] for i in (0, 1, 3)], [case.source.box(i) for i in range(3)], atol=1 / 32)


# the shipped model ------------------------------------------------------------------------
def test_shipped_model_loads_and_denoises():
    if not (MODEL_DIR / "model_index.json").exists():
        pytest.skip(f"the model folder {MODEL_DIR} is not there yet (train it with tools/world/train_world.py)")
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["vae"] == [None, None]
    tok = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    text = CLIPTextModel.from_pretrained(MODEL_DIR / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet").eval()
    sched = DDPMScheduler.from_pretrained(MODEL_DIR / "scheduler")
    assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"
    for word in [*COLOURS, *BACKGROUNDS, "circle", "square", "triangle"]:
        assert len(tok.tokenize(word)) == 1
    ids = tok(
        ["a red circle on snow"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        cond = text(ids)[0]
        out = unet(torch.randn(1, 3, 32, 32), torch.tensor([500]), encoder_hidden_states=cond).sample
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size < 30e6


# the tools ------------------------------------------------------------------------------------
def _tool(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "world" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_eval_world_json_has_every_metric_per_method(tmp_path):
    """The results object the README's table is built from: every method, every metric, the settings."""
    import json

    ev = _tool("eval_world")
    out = tmp_path / "r.json"
    assert (
        ev.main(
            [
                "--cases",
                "1",
                "--steps",
                "2",
                "--methods",
                "dds,gas",
                "--json",
                str(out),
                "--figure",
                str(tmp_path / "f.png"),
                "--figure_cases",
                "1",
            ]
        )
        == 0
    )
    payload = json.loads(out.read_text())
    assert list(payload["methods"]) == ["dds", "gas"]
    for agg in payload["methods"].values():
        assert set(ev.METRICS) <= set(agg) and agg["cases"] == 1
    assert payload["settings"]["lr_schedule"] == "cosine" and payload["settings"]["steps"] == 2
    from PIL import Image

    assert Image.open(tmp_path / "f.png").size[0] > 4 * 32 * 4  # source, ideal and two methods


def test_train_world_writes_a_loadable_model(tmp_path):
    """Three steps of a tiny UNet: the run folder gets TensorBoard logs and a model the loader reads."""
    import torch

    from gas_lightning.worlds.model import load_folder

    tw = _tool("train_world")
    threads = torch.get_num_threads()  # the script sets the process's thread count
    try:
        tw.main(
            [
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--warmup",
                "1",
                "--save-every",
                "2",
                "--channels",
                "8,16,16",
                "--threads",
                "1",
                "--accelerator",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    tok, text, unet, sched = load_folder(tmp_path / "model")
    assert list(unet.config.block_out_channels) == [8, 16, 16]
    assert (tmp_path / "ema-latest" / "unet").is_dir()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_train_world_workers_draw_different_scenes(monkeypatch):
    """Each DataLoader worker seeds its own stream; the same seed everywhere would repeat batches."""
    import types

    import torch.utils.data
    from transformers import CLIPTokenizer

    tw = _tool("train_world")
    tok = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    stream = tw.SceneStream(tok, batch_size=4, seed=0)
    batches = []
    for worker in (0, 1, 0):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda w=worker: types.SimpleNamespace(id=w))
        batches.append(next(iter(stream))[0])
    assert not np.array_equal(batches[0].numpy(), batches[1].numpy())
    assert np.array_equal(batches[0].numpy(), batches[2].numpy())


def test_eval_world_refuses_a_case_range_with_no_case(capsys):
    """--cases is the end of the range, not a count from --first_case: a run that would edit nothing says so."""
    with pytest.raises(SystemExit) as exit_info:
        _tool("eval_world").main(["--cases", "25", "--first_case", "25", "--methods", "gas"])
    assert exit_info.value.code == 2 and "--cases 50 --first_case 25" in capsys.readouterr().err


def test_eval_world_kinds_edits_only_the_cases_that_ask_for_that_kind(tmp_path, capsys):
    """--kinds shape: the jobs are the shape-change cases of the range, each under its own case number."""
    jobs = tmp_path / "jobs.jsonl"
    assert (
        _tool("eval_world").main(
            [
                "--cases",
                "12",
                "--first_case",
                "2",
                "--seed",
                "4",
                "--methods",
                "gas",
                "--kinds",
                "shape",
                "--write_jobs",
                str(jobs),
            ]
        )
        == 0
    )
    names = [json.loads(line)["name"] for line in jobs.read_text().splitlines()]
    cases = held_out_cases(12, seed=4)
    wanted = [k for k in range(2, 12) if "shape" in [c.kind for c in cases[k].changes]]
    assert 0 < len(wanted) < 10  # the filter has something to keep and something to drop
    assert names == [f"gas_s4_c{k:03d}" for k in wanted]
    with pytest.raises(SystemExit) as exit_info:
        _tool("eval_world").main(["--cases", "2", "--methods", "gas", "--kinds", "shapes"])
    assert exit_info.value.code == 2 and "unknown --kinds ['shapes']" in capsys.readouterr().err


def test_eval_world_noise_seed_redraws_only_the_edits_noise(tmp_path):
    """--noise_seed N: the same cases and plans, another seed for each edit's timesteps and noise, and the
    records named apart, so that verdicts flipped by the draw alone can be counted."""
    ev = _tool("eval_world")
    lines = {}
    for n in (0, 1):
        (tmp_path / f"n{n}").mkdir()
        jobs = tmp_path / f"n{n}" / "jobs.jsonl"
        assert (
            ev.main(
                ["--cases", "3", "--seed", "4", "--methods", "gas", "--noise_seed", str(n), "--write_jobs", str(jobs)]
            )
            == 0
        )
        lines[n] = [json.loads(line) for line in jobs.read_text().splitlines()]
    assert [j["name"] for j in lines[0]] == [j["name"] for j in lines[1]]
    assert len({j["seed"] for j in lines[0]} | {j["seed"] for j in lines[1]}) == 6  # every edit draws anew
    for a, b in zip(lines[0], lines[1]):
        assert (tmp_path / "n0" / a["plan"]).read_text() == (tmp_path / "n1" / b["plan"]).read_text()
        assert (tmp_path / "n0" / a["image"]).read_bytes() == (tmp_path / "n1" / b["image"]).read_bytes()
    progress = tmp_path / "p.jsonl"
    assert (
        ev.main(
            [
                "--cases",
                "1",
                "--steps",
                "1",
                "--seed",
                "4",
                "--methods",
                "gas",
                "--noise_seed",
                "2",
                "--progress",
                str(progress),
                "--figure",
                str(tmp_path / "f.png"),
                "--figure_cases",
                "0",
            ]
        )
        == 0
    )
    assert json.loads(progress.read_text())["method"] == "gas+noise2"
