"""Checking an edit: world verdicts on hand-drawn pictures, photo verdicts from a tiny CLIP, the refine
plan, the preservation report, and the edit path (report files, --refine passes, refusals, a failing check)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import test_grounding
import test_metrics
import torch
from PIL import Image

from gas_lightning.checking import DONE, NOT_DONE, UNSURE, CheckSpec, Verdict, make_checker
from gas_lightning.checking.verdict import by_threshold, vote
from gas_lightning.checking.world import WorldChecker
from gas_lightning.errors import GasError
from gas_lightning.plan import WHOLE_IMAGE, EditPlan, Subtask
from gas_lightning.refine import failed, lost, refine_plan, rerun
from gas_lightning.report import edit_area, preservation
from gas_lightning.worlds.scenes import BACKGROUNDS, COLOURS

tiny_clip = test_metrics.tiny_clip  # the random CLIP folder fixture, shared
tokenizer, tiny_gdino = test_grounding.tokenizer, test_grounding.tiny_gdino  # a random GroundingDINO folder
BOX = (5 / 32, 5 / 32, 15 / 32, 15 / 32)  # the 10x10 square drawn at pixels 5..14


def picture(ground="snow", colour="red", rect=(5, 5, 15, 15), holes=()) -> Image.Image:
    """32x32 flat ground with one axis-aligned block (a square when rect is square)."""
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:] = BACKGROUNDS[ground]
    if colour is not None:
        x0, y0, x1, y1 = rect
        arr[y0:y1, x0:x1] = COLOURS[colour]
        for y, x in holes:
            arr[y, x] = BACKGROUNDS[ground]
    return Image.fromarray(arr)


def judged(edited, source="the red square", target="a blue square", box=BOX, before=None):
    plan = EditPlan("s", "t", (Subtask(source, target, box=box),))
    return WorldChecker()(before or picture(), edited, plan)[0]


# world verdicts ------------------------------------------------------------------------------------
def test_a_recoloured_square_is_done_with_full_target_and_no_source():
    v = judged(picture(colour="blue"))
    assert v.verdict == DONE and v.scores == {"target": 1.0, "source": 0.0, "in_place": 1.0}


def test_an_unchanged_square_is_not_done():
    v = judged(picture())
    assert v.verdict == NOT_DONE and v.scores == {"target": 0.0, "source": 1.0}


def test_an_erased_object_is_not_done_and_a_shrunk_one_unsure():
    assert judged(picture(colour=None)).verdict == NOT_DONE
    # a 10x4 blue block where a 10x10 red square was: 40 of 100 pixels, between 0.2 and 0.5
    shrunk = judged(picture(colour="blue", rect=(5, 5, 15, 9)), target="a blue object")
    assert shrunk.verdict == UNSURE and shrunk.scores["target"] == pytest.approx(0.4)


def test_a_few_noisy_pixels_inside_a_kept_square_keep_it_a_square():
    # 98 of 100 pixels: fill 0.98 either way, but two holes in a 4x4 block would read as a circle unfilled
    small = picture(colour="blue", rect=(5, 5, 9, 9))
    holed = picture(colour="blue", rect=(5, 5, 9, 9), holes=[(6, 6), (7, 7)])
    box = (5 / 32, 5 / 32, 9 / 32, 9 / 32)
    v = judged(holed, "a blue square", "a blue square", box=box, before=small)
    assert v.verdict == DONE and v.scores == {"target": 1.0}


def _triangle(x0: int, side: int = 10, y0: int = 5) -> np.ndarray:
    """The world's triangle (apex top centre, base along the bottom) by pixel centres, footprint at x0, y0."""
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    v = (ys - y0) / side
    return (v >= 0) & (v < 1) & (np.abs(xs - x0 - side / 2) <= 0.5 * v * side)


def _drawn(mask: np.ndarray, colour: str = "red") -> Image.Image:
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:] = BACKGROUNDS["snow"]
    arr[mask] = COLOURS[colour]
    return Image.fromarray(arr)


def test_a_shape_change_is_held_to_the_target_outline_in_the_source_footprint():
    # the red 10x10 square at 5..14 becomes a triangle: drawn in the square's footprint it is done
    whole = judged(_drawn(_triangle(5)), "the red square", "a red triangle")
    # its 50 pixels are all a triangle in that footprint has (half the square's 100): the target is whole
    assert whole.verdict == DONE and whole.scores["outline_target"] == 1.0 and whole.scores["target"] == 1.0
    # the same triangle 3 pixels to the left: as large (target 1.0) and no red square left,
    # so area alone calls it done, but its outline overlaps the square more than the triangle it should be
    shifted = _triangle(2)
    near = np.zeros((32, 32), dtype=bool)
    near[4:16, 4:16] = True  # the square's box grown by one pixel
    square = np.zeros((32, 32), dtype=bool)
    square[5:15, 5:15] = True
    edited = shifted & near

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    v = judged(_drawn(shifted), "the red square", "a red triangle")
    assert v.scores["target"] == 1.0 and v.scores["source"] == 0.0
    assert v.scores["outline_target"] == pytest.approx(iou(edited, _triangle(5)))
    assert v.scores["outline_source"] == pytest.approx(iou(edited, square))
    assert iou(edited, _triangle(5)) < iou(edited, square) and v.verdict == NOT_DONE
    # a recolour is not held to an outline, and is read by colour: a blue block of any shape where the square was
    assert "outline_target" not in judged(picture(colour="blue")).scores
    rounded = square.copy()
    for y, x in [(5, 5), (5, 13), (13, 5), (13, 13)]:
        rounded[y : y + 2, x : x + 2] = False  # 84 of its box's 100 pixels: a circle by fill ratio
    assert judged(_drawn(rounded, "blue")).verdict == DONE


def test_a_recolour_is_held_to_the_source_objects_own_pixels():
    # a blue 10x5 block over the top half of the red square: 50 of its 100 pixels carry the target colour
    top = judged(picture(colour="blue", rect=(5, 5, 15, 10)), target="a blue object")
    assert top.verdict == DONE and top.scores["in_place"] == 0.5
    # a whole blue square moved 6 pixels right: as large as the red one (target 1.0) and no red left, but only
    # its 4 columns over x = 11..14 lie on the square's own pixels: 40 of 100, between 0.2 and 0.5
    moved = judged(picture(colour="blue", rect=(11, 5, 21, 15)))
    assert moved.scores["target"] == 1.0 and moved.scores["source"] == 0.0
    assert moved.scores["in_place"] == pytest.approx(0.4) and moved.verdict == UNSURE
    # 8 pixels right: 2 columns (20 pixels) stay, below 0.2, but half its pixels must lie in the box to count at all
    assert judged(picture(colour="blue", rect=(13, 5, 23, 15))).verdict == NOT_DONE


def test_a_background_change_reads_the_share_of_ground_pixels():
    done = judged(picture("grass"), "the snow", "grass", WHOLE_IMAGE)
    assert done.verdict == DONE and done.scores == {"target": 1.0, "source": 0.0}
    half = np.asarray(picture("grass")).copy()
    half[16:] = BACKGROUNDS["snow"]  # the bottom half snow: 512 snow, 412 grass ground pixels
    v = judged(Image.fromarray(half), "the snow", "grass", WHOLE_IMAGE)
    assert v.verdict == UNSURE and v.scores["target"] == pytest.approx((512 - 100) / (1024 - 100))


def test_vote_and_thresholds_by_hand():
    assert vote([DONE, DONE]) == DONE and vote([DONE, NOT_DONE]) == UNSURE and vote([]) == UNSURE
    assert [by_threshold(x, 0.6, 0.4) for x in (0.6, 0.5, 0.39)] == [DONE, UNSURE, NOT_DONE]


# photo verdicts ------------------------------------------------------------------------------------
def test_clip_share_is_the_softmax_of_scaled_cosines_of_the_crop(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    checker = make_checker(CheckSpec(check_clip=str(tiny_clip)), world=False)
    edited = picture(colour="blue")
    plan = EditPlan("s", "t", (Subtask("a red block", "a blue block", box=BOX),))
    v = checker(picture(), edited, plan)[0]
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():  # by hand: the crop's and both texts' embeddings, cosine x logit scale, softmax
        img = proc(images=edited.crop((5, 5, 15, 15)), return_tensors="pt")
        i = model.vision_model(**img).pooler_output
        i = model.visual_projection(i)
        t = model.text_projection(
            model.text_model(
                **proc(text=["a blue block", "a red block"], padding=True, return_tensors="pt")
            ).pooler_output
        )
        cos = torch.nn.functional.cosine_similarity(i, t)
        logits = cos * model.logit_scale.exp()
    expected = float(math.exp(logits[0]) / (math.exp(logits[0]) + math.exp(logits[1])))
    assert v.scores["clip_target"] == pytest.approx(expected, abs=1e-5)
    assert v.verdict == by_threshold(expected, 0.6, 0.4)


def test_detector_scores_are_the_best_sigmoid_over_each_phrases_tokens_in_the_crop(tiny_gdino):
    from gas_lightning.checking.photo import PhotoChecker
    from gas_lightning.grounding.gdino_hf import GroundingDinoGrounder

    grounder = GroundingDinoGrounder(str(tiny_gdino), box_threshold=0.3)
    edited = picture(colour="blue")
    wide = (0.0, 0.0, 1.0, 0.75)  # a 32x24 crop: the tiny detector's deepest map needs a non-square input
    plan = EditPlan("s", "t", (Subtask("a red car", "a dog", box=wide), Subtask("a cat", "a cat", box=wide)))
    swap, kept = PhotoChecker(detector=grounder)(picture(), edited, plan)
    proc, model = grounder.processor, grounder.model
    crop = edited.crop((0, 0, 32, 24))
    with torch.no_grad():  # by hand: the caption "a dog . a red car .", each phrase's tokens located by their ids
        inputs = proc(images=crop, text="a dog . a red car .", return_tensors="pt")
        probs = model(**inputs).logits[0].sigmoid()
    ids = inputs["input_ids"][0].tolist()
    dog, red, car = (proc.tokenizer.convert_tokens_to_ids(w) for w in ("dog", "red", "car"))
    a = proc.tokenizer.convert_tokens_to_ids("a")
    first_a, second_a = [i for i, t in enumerate(ids) if t == a][:2]
    target = probs[:, first_a : ids.index(dog) + 1].max()
    source = probs[:, second_a : ids.index(car) + 1].max()
    assert ids.index(red) == second_a + 1
    assert swap.scores["det_target"] == pytest.approx(float(target), abs=1e-5)
    assert swap.scores["det_source"] == pytest.approx(float(source), abs=1e-5)
    t, src = float(target), float(source)
    assert swap.verdict == (DONE if t >= 0.3 and t > src else NOT_DONE if t < 0.3 <= src else UNSURE)
    assert set(kept.scores) == {"det_target"} and kept.verdict == (
        DONE if kept.scores["det_target"] >= 0.3 else NOT_DONE
    )


def test_a_clip_folder_that_cannot_load_is_one_error_naming_the_flag(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GasError, match="--check_clip"):
        make_checker(CheckSpec(check_clip=str(tmp_path)), world=False)


def test_refine_on_a_photo_without_a_checker_names_the_flags():
    with pytest.raises(GasError, match="--refine.*--detector.*--check_clip"):
        make_checker(CheckSpec(refine=1), world=False)
    assert make_checker(CheckSpec(), world=False) is None  # auto: a photo without a checker is not checked


# refine plan --------------------------------------------------------------------------------------
def test_refine_plan_reruns_the_failed_harder_and_holds_the_passed_as_keep_terms():
    plan = EditPlan(
        "s",
        "t",
        (
            Subtask("a red circle", "a blue circle", box=BOX),
            Subtask("the snow", "grass"),
            Subtask("a green square", "a green square", box=BOX),
            Subtask("a red square", "a blue square", box=BOX, intensity=0.0),
        ),
    )
    verdicts = [
        Verdict(0, "a red circle", "a blue circle", False, UNSURE),
        Verdict(1, "the snow", "grass", False, DONE),
        Verdict(2, "a green square", "a green square", True, NOT_DONE),
        Verdict(3, "a red square", "a blue square", False, NOT_DONE),
    ]
    assert failed(plan, verdicts) == [0]  # keep and switched-off subtasks are never edits to redo
    assert lost(plan, verdicts) == [2]  # the kept green square was not kept
    assert rerun(plan, verdicts) == [0, 2]
    new = refine_plan(plan, verdicts, boost=1.5, passes_failed=[2, 0, 1, 0])
    assert [(s.source, s.target, s.intensity, s.keep) for s in new.subtasks] == [
        ("a red circle", "a blue circle", 2.25, False),  # 1.5 ** 2
        ("grass", "grass", 1.0, True),
        ("a green square", "a green square", 1.5, True),  # lost once: its keep term, boosted
        ("a red square", "a blue square", 0.0, False),
    ]
    held = refine_plan(plan, verdicts, boost=1.5, passes_failed=[2, 0, 1, 0], restore=False)
    assert held.subtasks[2].intensity == 1.0 and held.subtasks[0].intensity == 2.25  # the app's rerun


def test_a_refine_pass_restarts_where_a_failed_subtasks_mask_owns_the_image():
    from gas_lightning.guidance.dds import Term
    from gas_lightning.refine import reset_region

    ground = torch.ones(4, 4)
    ground[:2, :2] = 0.3  # the overlap rule: the background's weight inside the object's box
    obj = torch.zeros(4, 4)
    obj[:2, :2] = 1.0
    kept = torch.zeros(4, 4)
    kept[3, 3] = 1.0
    ground[3, 3] = 0.3

    def term(mask, **kw):
        return Term("t", None, None, mask, 1.0, **kw)

    terms = [term(obj), term(ground), term(kept, keep=True), term(torch.ones(4, 4), is_full=True)]
    # the object failed: its box restarts; the ground and the kept object do not (the whole-scene term never counts)
    assert torch.equal(reset_region(terms, [0]), obj)
    # the ground failed: everywhere it owns, at its weight, but not the object's box nor the kept object
    expected = torch.ones(4, 4)
    expected[:2, :2] = 0.0
    expected[3, 3] = 0.0
    assert torch.equal(reset_region(terms, [1]), expected)
    assert torch.equal(reset_region(terms, [0, 1]), torch.where(kept > 0, 0.0, torch.where(obj > 0, 1.0, ground)))


def test_a_refine_pass_starts_from_the_source_where_the_failed_subtask_is(tmp_path, monkeypatch):
    import gas_lightning.fitting as fitting
    from gas_lightning import edit

    def circle_failed(self, source, edited, plan):
        return [
            Verdict(k, s.source, s.target, s.keep, NOT_DONE if k == 0 else DONE) for k, s in enumerate(plan.subtasks)
        ]

    modules, real_fit = [], fitting.fit

    def first_pass_only(trainer, module, final, out, *rest):  # the refine pass is built, not run: its start stays
        modules.append(module)
        return real_fit(trainer, module, final, out, *rest) if len(modules) == 1 else None

    monkeypatch.setattr(WorldChecker, "__call__", circle_failed)
    monkeypatch.setattr(fitting, "fit", first_pass_only)
    request = "change the red circle into a blue circle. change the snow into grass."
    edit("gas-lightning:example.png", request, steps=3, refine=1, refine_steps=1, output_dir=tmp_path / "o")
    first, refine = modules
    circle = first.terms[0].mask
    others = torch.stack([t.mask for t in first.terms[1:] if not t.is_full]).amax(0)
    owned, away = (circle == 1) & (others < 1), circle == 0
    assert owned.any() and away.any() and not torch.equal(first.latent, first.z_src)  # the first pass moved
    start = refine.latent.detach()
    assert torch.equal(start[..., owned], first.z_src[..., owned])  # the circle's place: the source again
    assert torch.equal(start[..., away], first.latent.detach()[..., away])  # elsewhere: the first pass's result
    assert torch.equal(refine.z_src, start)  # and the pass's reference is where it starts
    from gas_lightning.pipeline import tensor_to_image

    kept = np.asarray(Image.open(tmp_path / "o" / "edited_pass0.png").convert("RGB"))
    assert np.array_equal(kept, np.asarray(tensor_to_image(first.decode().cpu())))  # the first pass's picture


def test_a_refine_pass_restores_a_lost_kept_object_from_the_source(tmp_path, monkeypatch):
    import gas_lightning.fitting as fitting
    from gas_lightning import edit

    def first_kept_lost(self, source, edited, plan):
        lost_one = next(k for k, s in enumerate(plan.subtasks) if s.keep)
        return [
            Verdict(k, s.source, s.target, s.keep, NOT_DONE if k == lost_one else DONE)
            for k, s in enumerate(plan.subtasks)
        ]

    modules, real_fit = [], fitting.fit

    def first_pass_only(trainer, module, final, out, *rest):
        modules.append(module)
        return real_fit(trainer, module, final, out, *rest) if len(modules) == 1 else None

    monkeypatch.setattr(WorldChecker, "__call__", first_kept_lost)
    monkeypatch.setattr(fitting, "fit", first_pass_only)
    request = "change the red circle into a blue circle. change the snow into grass."  # the others are kept
    result = edit("gas-lightning:example.png", request, steps=3, refine=1, refine_steps=1, output_dir=tmp_path / "o")
    first, refine = modules
    k = next(i for i, s in enumerate(result.plan.subtasks) if s.keep)
    masks = [t.mask for t in first.terms if not t.is_full]
    others = torch.stack([m for i, m in enumerate(masks) if i != k]).amax(0)
    owned, away = (masks[k] > 0) & (masks[k] >= others), masks[k] == 0
    assert owned.any() and away.any()
    start = refine.latent.detach()
    assert torch.equal(start[..., owned], first.z_src[..., owned])  # the kept object's place: the source again
    assert torch.equal(start[..., away], first.latent.detach()[..., away])
    second = result.report["passes"][1]
    assert second["rerun"] == [k]
    assert second["plan"]["subtasks"][k]["intensity"] == pytest.approx(1.5)  # its keep term, boosted once
    assert result.report["all_done"] is True and result.report["all_kept"] is False


# preservation -------------------------------------------------------------------------------------
def test_preservation_psnr_and_leak_by_hand():
    src = Image.new("RGB", (4, 4), (0, 0, 0))
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr[0, 0] = 255  # inside the edit box: not a leak
    arr[3, 3] = (51, 51, 51)  # outside: a leak of 0.2
    edited = Image.fromarray(arr)
    plan = EditPlan("s", "t", (Subtask("a", "b", box=(0, 0, 0.5, 0.5)), Subtask("c", "c", box=(0.75, 0.75, 1, 1))))
    assert int(edit_area(plan, 4, 4).sum()) == 4
    values, leak = preservation(src, edited, plan)
    # outside: 12 pixels x 3 channels, one pixel 0.2 off in each channel: mse = 3 * 0.04 / 36
    assert values["psnr_outside"] == pytest.approx(10 * math.log10(1 / (0.12 / 36)), abs=1e-4)
    assert values["kept"][0]["psnr"] == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-4)  # its one pixel
    assert values["leak_max"] == pytest.approx(0.2, abs=1e-6) and leak[0, 0] == 0
    assert values["leak_mean"] == pytest.approx(0.2 / 12, abs=1e-6)
    assert values["lpips_outside"] is None and values["lpips_unavailable"]


# the edit path ------------------------------------------------------------------------------------
def world_edit(tmp_path, **kw):
    from gas_lightning import edit

    return edit(
        "gas-lightning:example.png",
        "change the red circle into a blue circle.",
        steps=3,
        output_dir=tmp_path / "out",
        trainer_kwargs={"enable_progress_bar": False},
        **kw,
    )


def test_a_world_edit_writes_report_files_and_returns_the_report(tmp_path):
    result = world_edit(tmp_path, refine=1, refine_steps=2)
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert result.report == report and (out / "report.png").is_file()
    assert report["checker"] == "world" and len(report["verdicts"]) == len(result.plan.subtasks)
    first = report["passes"][0]
    assert first["steps"] == 3 and first["pass"] == 0
    ran = 3 + sum(p["steps"] for p in report["passes"][1:])
    assert report["steps"] == result.steps == ran and len(report["passes"]) == (2 if first["counts"]["done"] < 1 else 1)
    for p in report["passes"][1:]:
        assert p["steps"] == 2 and p["rerun"] == [0]
    assert "refine: 1" in (out / "config.yaml").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    assert "check/report" in events.Tags()["images"] and "check/0/verdict" in events.Tags()["scalars"]
    assert json.loads((out / "plan.json").read_text())["subtasks"][0]["target"] == "a blue circle"


def test_gas_edit_prints_the_checks_counts_and_a_refine_pass_logs_to_its_own_folder(tmp_path, capsys):
    from gas_lightning.cli import main

    out = tmp_path / "cli"
    args = ["--config", "configs/shapes.yaml", "--request", "change the red circle into a blue circle."]
    with pytest.raises(SystemExit) as code:
        main([*args, "--trainer.max_steps", "1", "--refine", "1", "--refine_steps", "1", "--output_dir", str(out)])
    assert code.value.code == 0
    report = json.loads((out / "report.json").read_text())
    c, passes = report["counts"], len(report["passes"]) - 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (
        f"checked (world): {c['done']} done, {c['not done']} not done, {c['unsure']} unsure after {passes} "
        f"refine pass{'' if passes == 1 else 'es'}: {out / 'report.json'}"
    )
    assert passes == 0 or any((out / "refine1").glob("events.out.tfevents.*"))


def test_a_failing_check_keeps_the_finished_edit(tmp_path, monkeypatch):
    def broken(self, source, edited, plan):
        raise RuntimeError("boom")

    monkeypatch.setattr(WorldChecker, "__call__", broken)
    with pytest.raises(GasError, match="checking the edit failed.*boom.*edited.png"):
        world_edit(tmp_path)
    assert (tmp_path / "out" / "edited.png").is_file() and (tmp_path / "out" / "checkpoints" / "last.ckpt").is_file()


def test_refine_on_a_photo_without_a_checker_is_refused_before_the_edit(tiny_sd, image_file, tmp_path):
    from gas_lightning import edit

    with pytest.raises(GasError, match="--refine.*--detector"):
        edit(
            image_file,
            "change the red block into a blue block.",
            boxes=[[0, 0, 0.5, 0.5]],
            model=tiny_sd,
            steps=1,
            refine=1,
            output_dir=tmp_path / "out",
        )
    assert not (tmp_path / "out" / "edited.png").exists()


def world_boxes(image, phrases):
    from gas_lightning.worlds.grounder import WorldGrounder

    return WorldGrounder().ground(image, phrases)


# the app --------------------------------------------------------------------------------------------
def test_the_apps_rows_and_its_rerun_of_what_failed(tmp_path):
    from gas_lightning.app import EditApp, check_rows
    from gas_lightning.resolve import resolve_bundled

    done = tmp_path / "done"
    done.mkdir()
    edited = Image.open(resolve_bundled("gas-lightning:example.png")).convert("RGB").resize((32, 32))
    edited.save(done / "edited.png")
    (circle,) = world_boxes(edited, ["the red circle"])
    plan = EditPlan(
        "s",
        "t",
        (
            Subtask("the red circle", "a yellow circle", box=circle),
            Subtask("the snow", "sand", box=WHOLE_IMAGE),
        ),
    )
    plan.save(done / "plan.json")
    verdicts = [
        Verdict(0, "the red circle", "a yellow circle", False, NOT_DONE, {"target": 0.0, "source": 1.0}),
        Verdict(1, "the snow", "sand", False, DONE, {"target": 0.9}),
    ]
    (done / "report.json").write_text(json.dumps({"verdicts": [v.to_dict() for v in verdicts]}))
    assert check_rows(json.loads((done / "report.json").read_text())) == [
        [0, "the red circle -> a yellow circle", "not done", "target 0.00, source 1.00"],
        [1, "the snow -> sand", "done", "target 0.90"],
    ]
    app = EditApp(output_dir=str(tmp_path / "app"))
    events = list(app.rerun("s", done, steps=2))
    result = events[-1][1]
    assert events[-1][0] == "done"
    ran = [(s.source, s.target, s.intensity) for s in result.plan.subtasks]
    # the failed one again, 1.5x; the done background held at its result; kept objects added by the detector
    assert ran[:2] == [("the red circle", "a yellow circle", 1.5), ("sand", "sand", 1.0)]
    assert all(s.keep for s in result.plan.subtasks[1:])


def test_batch_summarises_each_jobs_check(tmp_path):
    from gas_lightning.cli import main

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps(
            {
                "name": "one",
                "image": "gas-lightning:example.png",
                "request": "change the red circle into a blue circle.",
            }
        )
        + "\n"
    )
    out = tmp_path / "batch"
    with pytest.raises(SystemExit) as code:
        main(["batch", "--config", "configs/shapes.yaml", "--jobs", str(jobs), "--output_dir", str(out),
              "--trainer.max_steps", "2"])  # fmt: skip
    assert code.value.code == 0
    report = json.loads((out / "one" / "report.json").read_text())
    row = json.loads((out / "summary.json").read_text())["jobs"][0]["metrics"]
    assert row["check_done"] == report["counts"]["done"] and row["refine_passes"] == 0
    assert row["check_done"] + row["check_not_done"] + row["check_unsure"] == 1  # one edit subtask
    assert "check_done" in (out / "summary.csv").read_text().splitlines()[0]


def test_a_photo_edit_checked_by_clip_refines_what_clip_does_not_call_done(
    tiny_sd, tiny_clip, image_file, tmp_path, monkeypatch
):
    from gas_lightning import edit

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty cache: no LPIPS weights

    result = edit(
        image_file,
        "change the red block into a blue block.",
        boxes=[[0.05, 0.05, 0.45, 0.5]],
        model=tiny_sd,
        steps=1,
        refine=1,
        refine_steps=1,
        check_clip=str(tiny_clip),
        output_dir=tmp_path / "out",
        trainer_kwargs={"enable_progress_bar": False},
    )
    report = result.report
    assert report["checker"] == "clip" and set(report["verdicts"][0]["scores"]) == {"clip_target"}
    first = report["passes"][0]["verdicts"][0]["verdict"]
    assert len(report["passes"]) == (1 if first == DONE else 2) and result.steps == len(report["passes"])
    assert report["preservation"]["lpips_outside"] is None  # no weights: said why, not guessed
    assert "alexnet-owt-7be5be79.pth" in report["preservation"]["lpips_unavailable"]


# the accuracy tool ---------------------------------------------------------------------------------
def test_check_accuracy_counts_caught_failures_and_flagged_successes_by_hand():
    import importlib.util
    from pathlib import Path

    from gas_lightning.worlds import held_out_cases

    path = Path(__file__).resolve().parents[1] / "tools" / "world" / "check_accuracy.py"
    spec = importlib.util.spec_from_file_location("check_accuracy", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    import summarize_checks  # the tool put its folder on sys.path

    rows = [(False, "not done"), (False, "done"), (False, "unsure"), (True, "unsure"), (True, "done")]
    got = summarize_checks.tally(rows)
    assert got["failed_attributes"] == 3 and got["caught"] == pytest.approx(2 / 3)
    assert got["caught_as_not_done"] == pytest.approx(1 / 3)
    assert got["right_attributes"] == 2 and got["flagged"] == 0.5 and got["flagged_as_not_done"] == 0.0
    case = held_out_cases(1, seed=112)[0]
    plan = case.edit_plan(keep=True).to_dict()
    for a in [{"kind": c.kind, "index": c.index} for c in case.changes]:
        k = tool.owner(a, case, plan)
        s = plan["subtasks"][k]
        if a["kind"] == "background":
            assert s["source"] == case.source.background
        else:
            assert s["source"] == case.source.objects[a["index"]].phrase
    untouched = [i for i in range(len(case.source.objects)) if i not in case.edited_objects]
    assert untouched  # the seed's first case keeps an object
    for i in untouched:  # an untouched object belongs to its keep subtask
        s = plan["subtasks"][tool.owner({"index": i, "ok": True}, case, plan)]
        assert s["source"] == s["target"] == case.source.objects[i].phrase  # a keep subtask


def test_summarize_checks_combines_seeds_by_hand(tmp_path):
    """Two seeds of --compare records: every number below is worked out by hand from the records."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "world"))
    import summarize_checks

    def edit(first, last, kept, steps, seconds, rows):
        return {
            "first_pass_all_attributes": first,
            "all_attributes": last,
            "preserved": kept,
            "steps": steps,
            "seconds": seconds,
            "rows": {"first_pass": rows, "last_pass": rows},
        }

    caught, missed, right = [False, "not done"], [False, "done"], [True, "done"]
    seed7 = [  # the first pass is right in 1 of 2 cases, refine in 2 of 2, one pass in 1 of 2
        {
            "case": 0,
            "checked": edit(1.0, 1.0, 1.0, 150, 10.0, [right]),
            "one_pass": edit(1, 1, 1.0, 250, 20.0, [right]),
        },
        {
            "case": 1,
            "checked": edit(0.0, 1.0, 1.0, 200, 14.0, [caught]),
            "one_pass": edit(0, 0, 0.5, 250, 22.0, [right]),
        },
    ]
    # a later seed writes its seed into each record; one case written twice (a rerun) counts once
    seed9 = [
        {
            "seed": 9,
            "case": 0,
            "checked": edit(0, 0, 1.0, 250, 16.0, [missed, right]),
            "one_pass": edit(0, 0, 1.0, 250, 18.0, [right]),
        },
        {
            "seed": 9,
            "case": 0,
            "checked": edit(0, 0, 1.0, 250, 16.0, [missed, right]),
            "one_pass": edit(0, 0, 1.0, 250, 18.0, [right]),
        },
    ]
    a, b = tmp_path / "check_seed7.jsonl", tmp_path / "rerun.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in seed7))
    b.write_text("".join(json.dumps(r) + "\n" for r in seed9))
    s = summarize_checks.summarize_seeds(summarize_checks.load_records([a, b]), n_boot=200)
    assert s["cases_per_seed"] == {"7": 2, "9": 1}
    checked, first, one = s["arms"]["checked"], s["arms"]["first_pass"], s["arms"]["one_pass"]
    assert checked["all_attributes_per_seed"] == {"7": 1.0, "9": 0.0}
    assert checked["all_attributes_mean"] == 0.5 and checked["all_attributes_min_seed"] == 0.0
    assert checked["all_attributes_ci95"] == [0.5, 0.5]  # every case of a seed alike: nothing to resample
    assert first["all_attributes_per_seed"] == {"7": 0.5, "9": 0.0} and "steps" not in first
    assert one["all_attributes_per_seed"] == {"7": 0.5, "9": 0.0}
    assert checked["steps"] == pytest.approx((150 + 200 + 250) / 3) and one["preserved"] == pytest.approx(2.5 / 3)
    assert s["seconds_ratio"] == pytest.approx((10 + 14 + 16) / (20 + 22 + 18))
    assert s["paired"]["checked - one_pass"]["difference"] == pytest.approx(1 / 3)
    assert s["paired"]["first_pass - one_pass"]["difference"] == 0.0
    pooled = s["checker_first_pass"]["all"]
    assert (pooled["failed_attributes"], pooled["failed_caught"]) == (2, 1)
    assert (pooled["right_attributes"], pooled["right_flagged"]) == (2, 0)
    assert s["checker_first_pass"]["9"]["caught"] == 0.0
    nameless = tmp_path / "records.jsonl"
    nameless.write_text(json.dumps(seed7[0]) + "\n")
    with pytest.raises(SystemExit, match="no seed"):
        summarize_checks.load_records([nameless])
