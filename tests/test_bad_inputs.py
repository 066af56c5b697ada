"""The bad-input matrix of `gas-edit` (README: Bad input): every case is one clear message and an
exit status (2 bad input, 1 failure while running), never a traceback unless `--debug true`.

Accepted-but-unusual inputs (tiny, huge, CMYK, 16-bit, palette, RGBA, EXIF-rotated images) are
here too: they must edit, not fail. Most cases stop before any model is needed (`--plan_only
true` or an early check); the others use the tiny pixel-space model for one or two steps.
"""

from __future__ import annotations

import builtins
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_grounding import GD_CONFIG, stand_in_package, tiny_bert  # noqa: F401  (the groundingdino-py stand-in)

from gas_lightning.cli import main
from gas_lightning.pipeline import MAX_SIDE, load_image

REQUEST = "change the red block into a yellow block."
BOXES = "[[0.05, 0.05, 0.45, 0.5]]"
REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", str(REPO / "configs" / "tiny.yaml"), "--preserve_form", "[1]"]


def gas_edit(capsys, *args: str) -> tuple[int, str]:
    """Run gas-edit in-process; return its exit status and stderr (checked for tracebacks)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return exit_info.value.code, err


def plan_only(capsys, tmp_path: Path, image, *extra: str) -> tuple[int, str]:
    """A plan-only run: everything up to the model (image, plan, output folder)."""
    return gas_edit(capsys, "--image", image, "--output_dir", tmp_path / "out", "--plan_only", "true", *extra)


def edit(capsys, tmp_path: Path, model, image, *extra: str) -> tuple[int, str]:
    """A real edit of a few steps on a tiny model."""
    return gas_edit(
        capsys,
        *TINY,
        "--model",
        model,
        "--image",
        image,
        "--request",
        REQUEST,
        "--boxes",
        BOXES,
        "--output_dir",
        tmp_path / "out",
        "--trainer.max_steps",
        "1",
        *extra,
    )


def deny_open(monkeypatch, under: Path) -> None:
    """Tests run as root, where chmod 000 stops nothing: make open() refuse paths below `under`."""
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).resolve().is_relative_to(under.resolve()):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


def write_json(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture()
def model_copy(tiny_pixel, tmp_path) -> Path:
    """A private copy of the tiny pixel-space model to damage."""
    return Path(shutil.copytree(tiny_pixel, tmp_path / "model"))


# --- files -------------------------------------------------------------------------------------
def test_image_missing(capsys, tmp_path):
    code, err = plan_only(capsys, tmp_path, tmp_path / "nope.png", "--request", REQUEST)
    assert code == 2 and "does not exist" in err


def test_image_not_an_image(capsys, tmp_path):
    code, err = plan_only(capsys, tmp_path, write_json(tmp_path / "notes.png", "hello"), "--request", REQUEST)
    assert code == 2 and "cannot identify image file" in err


def test_image_truncated(capsys, tmp_path, image_file):
    data = Path(image_file).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    code, err = plan_only(capsys, tmp_path, tmp_path / "cut.png", "--request", REQUEST, "--boxes", BOXES)
    assert code == 2 and "truncated" in err


def test_image_is_a_directory(capsys, tmp_path):
    code, err = plan_only(capsys, tmp_path, tmp_path, "--request", REQUEST)
    assert code == 2 and "is a folder" in err


def test_image_unreadable(capsys, tmp_path, image_file, monkeypatch):
    deny_open(monkeypatch, Path(image_file))
    code, err = plan_only(capsys, tmp_path, image_file, "--request", REQUEST)
    assert code == 2 and "permission denied" in err


def test_image_decompression_bomb_refused(capsys, tmp_path, monkeypatch):
    """Over twice PIL's MAX_IMAGE_PIXELS PIL refuses before decoding; scaled down here to stay cheap."""
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    code, err = plan_only(capsys, tmp_path, tmp_path / "bomb.png", "--request", REQUEST)
    assert code == 2 and "too large to edit safely" in err


# --- unusual images: accepted and converted ------------------------------------------------------
def test_image_1x1_edits(capsys, tmp_path, tiny_pixel):
    Image.new("RGB", (1, 1), (200, 40, 40)).save(tmp_path / "dot.png")
    code, err = edit(capsys, tmp_path, tiny_pixel, tmp_path / "dot.png")
    assert code == 0 and "only 1x1 pixels" in err
    assert Image.open(tmp_path / "out" / "edited.png").size == (32, 32)


def test_image_10000x10000_is_reduced_on_load(capsys, tmp_path):
    """100 megapixels (over PIL's warning limit, under its error limit): reduced, never decoded to RGB."""
    Image.new("1", (10000, 10000), 1).save(tmp_path / "huge.png")  # 12 MB in memory, a few KB on disk
    code, err = plan_only(capsys, tmp_path, tmp_path / "huge.png", "--request", REQUEST, "--boxes", BOXES)
    assert code == 0 and "reduced to 3334x3334" in err
    assert max(Image.open(tmp_path / "out" / "grounding.png").size) <= MAX_SIDE


def _cmyk(path):
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(path, "JPEG", quality=100)


def _grey16(path):
    Image.new("I;16", (8, 8), 40000).save(path)  # PNG keeps 16 bits


def _grey32(path):
    Image.new("I", (8, 8), 40000).save(path, "TIFF")


def _palette(path):
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 30, 60, 200] + [0] * 762)
    im.save(path)


def _rgba(path):
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black: shown as white by viewers
    im.putpixel((7, 7), (200, 40, 40, 255))
    im.save(path)


@pytest.mark.parametrize(
    "name, write, suffix, expected",
    [
        ("cmyk", _cmyk, ".jpg", (0, 255, 255)),
        ("16bit_grey", _grey16, ".png", (156, 156, 156)),  # 40000 / 65535: PIL's convert alone gives 255
        ("32bit_grey", _grey32, ".tif", (156, 156, 156)),
        ("palette", _palette, ".png", (30, 60, 200)),
        ("rgba", _rgba, ".png", (255, 255, 255)),
    ],
)
def test_image_mode_is_converted(capsys, tmp_path, name, write, suffix, expected):
    path = tmp_path / f"{name}{suffix}"
    write(path)
    code, _ = plan_only(capsys, tmp_path, path, "--request", REQUEST, "--boxes", BOXES)
    image = load_image(path)
    assert code == 0 and image.mode == "RGB"
    assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((0, 0)), expected)), image.getpixel((0, 0))
    if name == "rgba":
        assert image.getpixel((7, 7)) == (200, 40, 40)


def test_image_exif_rotation_is_applied(capsys, tmp_path):
    """Orientation 6 (camera held upright): stored 40x20, shown 20x40 with the top-left block at the top right."""
    im = Image.new("RGB", (40, 20), (40, 160, 40))
    im.paste((220, 30, 30), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    code, _ = plan_only(capsys, tmp_path, tmp_path / "phone.jpg", "--request", REQUEST, "--boxes", BOXES)
    image = load_image(tmp_path / "phone.jpg")
    assert code == 0 and image.size == (20, 40)
    r, g, _ = image.getpixel((15, 5))
    assert r > 180 and g < 80, image.getpixel((15, 5))


# --- requests and plans ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--request", ""], "--request is empty"),
        (["--request", "change into a cat."], "no LLM planner is configured"),
        (["--sources", "[a dog, grass]", "--targets", "[a cat]"], "1 targets for 2 source phrases"),
        (["--request", REQUEST, "--preserve_form", "[1, 0]"], "2 values for --preserve_form"),
        (["--request", REQUEST, "--boxes", "[[0, 0, 1,"], 'Parser key "boxes"'),
        (["--request", REQUEST, "--boxes", "[[0, 0, NaN, 1]]"], 'Parser key "boxes"'),
        (["--request", REQUEST, "--source", "a dog"], "were both given"),
    ],
    ids=[
        "empty_request",
        "unparsable_sentence",
        "unequal_lists",
        "unequal_preserve_form",
        "boxes_not_json",
        "boxes_nan_on_command_line",
        "two_forms",
    ],
)
def test_bad_request(capsys, tmp_path, image_file, args, message):
    code, err = plan_only(capsys, tmp_path, image_file, *args)
    assert code == 2 and message in err


PLANS = {
    "not_json": ("{source_prompt: a dog", "is not valid JSON"),
    "not_text": (None, "is not text"),
    "missing_subtasks": ('{"source_prompt": "a dog", "target_prompt": "a cat"}', "has no 'subtasks' list"),
    "missing_target": ('{"subtasks": [{"source": "a dog", "box": [0, 0, 1, 1]}]}', "needs both 'source' and 'target'"),
    "unknown_key": ('{"subtasks": [], "strength": 2}', "unknown plan keys ['strength']"),
    "unknown_subtask_key": ('{"subtasks": [{"source": "a", "target": "b", "colour": 1}]}', "unknown keys ['colour']"),
    "nan_box": ('{"subtasks": [{"source": "a", "target": "b", "box": [0, 0, NaN, 1]}]}', "NaN is not a number"),
    "inf_intensity": (
        '{"subtasks": [{"source": "a", "target": "b", "intensity": Infinity}]}',
        "Infinity is not a number",
    ),
    "empty_phrase": ('{"subtasks": [{"source": " ", "target": "b"}]}', "source phrase is empty"),
}


@pytest.mark.parametrize("case", list(PLANS))
def test_bad_plan_file(capsys, tmp_path, image_file, case):
    text, message = PLANS[case]
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xff\xfe\x00garbage") if text is None else path.write_text(text)
    code, err = plan_only(capsys, tmp_path, image_file, "--plan", path)
    assert code == 2 and message in err


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("boxes: [[0.0, 0.0, .nan, 1.0]]\n", "NaN, infinite or outside [0, 1]"),
        ("boxes: [[0.0, 0.0, 1.0, 1.0]]\nintensities: [.inf]\n", "must be in [0, 10], got inf"),
    ],
    ids=["nan_box_in_config", "inf_intensity_in_config"],
)
def test_non_finite_numbers_in_config(capsys, tmp_path, image_file, yaml_text, message):
    config = write_json(tmp_path / "c.yaml", yaml_text)
    code, err = plan_only(capsys, tmp_path, image_file, "--config", config, "--request", REQUEST)
    assert code == 2 and message in err


# --- config files ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("bogus_key: 1\n", "Option 'bogus_key' is not accepted"),
        ("seed: abc\n", 'Parser key "seed"'),
        (None, "File does not exist"),
    ],
    ids=["unknown_key", "wrong_type", "missing_file"],
)
def test_bad_config_file(capsys, tmp_path, image_file, yaml_text, message):
    config = tmp_path / "c.yaml"
    if yaml_text is not None:
        config.write_text(yaml_text)
    code, err = plan_only(capsys, tmp_path, image_file, "--config", config, "--request", REQUEST)
    assert code == 2 and message in err


# --- models ------------------------------------------------------------------------------------
def _truncate_weights(folder: Path) -> None:
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _remove_scheduler(folder: Path) -> None:
    shutil.rmtree(folder / "scheduler")


def _mismatched_unet_config(folder: Path) -> None:
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["block_out_channels"] = [16, 64]
    (folder / "unet" / "config.json").write_text(json.dumps(config))


def _pickle_only(folder: Path) -> None:
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()


def _no_model_index(folder: Path) -> None:
    (folder / "model_index.json").unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (_remove_scheduler, "lacks scheduler/"),
        (_mismatched_unet_config, "do not fit its config.json"),
        (_truncate_weights, "corrupted or incomplete"),
        (_pickle_only, "--allow_pickle_weights true"),
        (_no_model_index, "not a diffusers model folder"),
    ],
    ids=["no_scheduler", "unet_config_mismatch", "truncated_safetensors", "pickle_weights_only", "no_model_index"],
)
def test_bad_model_folder(capsys, tmp_path, image_file, model_copy, damage, message):
    damage(model_copy)
    code, err = edit(capsys, tmp_path, model_copy, image_file)
    assert code == 2 and message in err


def test_model_folder_missing(capsys, tmp_path, image_file):
    code, err = edit(capsys, tmp_path, tmp_path / "no_such_model", image_file)
    assert code == 2 and "no such folder" in err


def test_pickle_weights_load_when_allowed(capsys, tmp_path, image_file, model_copy):
    _pickle_only(model_copy)
    code, _ = edit(capsys, tmp_path, model_copy, image_file, "--allow_pickle_weights", "true")
    assert code == 0 and (tmp_path / "out" / "edited.png").is_file()


def test_groundingdino_checkpoint_does_not_fit_config(capsys, tmp_path, image_file, stand_in_package):  # noqa: F811 (the fixture imported above)
    """A checkpoint of another model size (SwinB weights, SwinT config) names the config to use."""
    from gas_lightning.grounding import gdino_py

    tiny_bert(tmp_path / "bert")
    config = write_json(tmp_path / "GroundingDINO_SwinT_OGC.py", GD_CONFIG.format(bert=tmp_path / "bert"))
    other = gdino_py.read_config(config) | {"num_queries": 7}  # a checkpoint with other shapes
    torch.save(
        {"model": gdino_py.build_model(other, torch.device("cpu")).state_dict()},
        tmp_path / "groundingdino_swinb_cogcoor.pth",
    )
    code, err = plan_only(
        capsys,
        tmp_path,
        image_file,
        "--request",
        REQUEST,
        "--detector_backend",
        "groundingdino-py",
        "--detector_config",
        config,
        "--detector_checkpoint",
        tmp_path / "groundingdino_swinb_cogcoor.pth",
    )
    assert code == 2 and "does not fit --detector_config" in err and "GroundingDINO_SwinB_cfg.py" in err


# --- output folders ----------------------------------------------------------------------------
def test_output_dir_under_a_file(capsys, tmp_path, image_file):
    code, err = gas_edit(
        capsys,
        "--image",
        image_file,
        "--request",
        REQUEST,
        "--boxes",
        BOXES,
        "--output_dir",
        Path(image_file) / "sub",
        "--plan_only",
        "true",
    )
    assert code == 2 and "is a file, not a folder" in err


def test_output_dir_not_writable(capsys, tmp_path, image_file, monkeypatch):
    (tmp_path / "out").mkdir()
    deny_open(monkeypatch, tmp_path / "out")
    code, err = plan_only(capsys, tmp_path, image_file, "--request", REQUEST, "--boxes", BOXES)
    assert code == 2 and "is not writable" in err
    assert not any((tmp_path / "out").iterdir())


def test_output_dir_holds_an_edit(capsys, tmp_path, image_file, tiny_pixel):
    """Refused before anything is written (the earlier edit's checkpoint stands in as a few bytes)."""
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"an earlier edit")
    code, err = edit(capsys, tmp_path, tiny_pixel, image_file)
    assert code == 2 and "already holds an earlier edit" in err and "--overwrite true" in err
    assert last.read_bytes() == b"an earlier edit" and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "checkpoints"
    ]


def test_resume_without_checkpoint(capsys, tmp_path, image_file, tiny_pixel):
    code, err = edit(capsys, tmp_path, tiny_pixel, image_file, "--resume", "last")
    assert code == 2 and "holds no checkpoint yet" in err and "without --resume" in err


@pytest.mark.parametrize("damage", ["truncated", "foreign", "other_plan"])
def test_resume_of_a_bad_checkpoint_is_refused_before_anything_is_rewritten(
    capsys, tmp_path, image_file, tiny_pixel, damage
):
    """A truncated file, a torch file that is not gas-edit's, a checkpoint of another plan: one message,
    exit 2, and the folder's plan.json and config.yaml are the earlier edit's, byte for byte."""
    assert edit(capsys, tmp_path, tiny_pixel, image_file)[0] == 0
    out = tmp_path / "out"
    last = out / "checkpoints" / "last.ckpt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, last)
    before = {name: (out / name).read_bytes() for name in ("plan.json", "config.yaml")}
    extra = ["--boxes", "[[0.5, 0.5, 0.9, 0.9]]"] if damage == "other_plan" else []
    code, err = edit(capsys, tmp_path, tiny_pixel, image_file, "--resume", "last", *extra)
    expected = {
        "truncated": "cannot be read as a checkpoint",
        "foreign": "not a checkpoint written by gas-edit",
        "other_plan": "different edit plan",
    }[damage]
    assert code == 2 and expected in err, err
    assert {name: (out / name).read_bytes() for name in before} == before


# --- failures while running --------------------------------------------------------------------
def test_nan_weights_stop_at_the_first_step(capsys, tmp_path, image_file, model_copy):
    from safetensors.torch import load_file, save_file

    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights, {"format": "pt"})
    code, err = edit(capsys, tmp_path, model_copy, image_file, "--trainer.max_steps", "3")
    assert code == 1 and "became NaN or infinite at step 1" in err and "no checkpoint was written" in err


def test_nan_mid_edit_names_the_last_good_checkpoint(capsys, tmp_path, image_file, tiny_pixel, monkeypatch):
    """The latent turns NaN in step 3; checkpoints of step 2 stay as they were and are named."""
    from gas_lightning.module import GroundAScoreEdit

    step = GroundAScoreEdit.training_step

    def poisoned(self, batch, batch_idx):
        out = step(self, batch, batch_idx)
        if batch_idx == 2:
            self.latent.data.fill_(float("nan"))
        return out

    monkeypatch.setattr(GroundAScoreEdit, "training_step", poisoned)
    code, err = edit(capsys, tmp_path, tiny_pixel, image_file, "--trainer.max_steps", "4")
    assert code == 1 and "became NaN or infinite at step 3" in err
    named = Path(re.search(r"--resume (\S+\.ckpt)", err).group(1))
    assert named.parent == tmp_path / "out" / "checkpoints" and named.name != "interrupted.ckpt"
    saved = torch.load(named, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2 and torch.isfinite(saved["state_dict"]["latent"]).all()


def test_out_of_memory_is_a_run_failure(capsys, tmp_path, image_file, tiny_pixel, monkeypatch):
    import gas_lightning.solvers

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    # the runner builds every edit through its solver (solvers.py), which holds its own build_edit name
    monkeypatch.setattr(gas_lightning.solvers, "build_edit", oom)
    code, err = edit(capsys, tmp_path, tiny_pixel, image_file)
    assert code == 1 and "out of memory" in err and "--resolution" in err


def _explode(*args, **kwargs):
    raise ZeroDivisionError("a bug")


def test_internal_error_is_one_line(capsys, tmp_path, image_file, monkeypatch):
    monkeypatch.setattr("gas_lightning.resolve.make_plan", _explode)
    code, err = plan_only(capsys, tmp_path, image_file, "--request", REQUEST)
    assert code == 1 and "internal error: ZeroDivisionError: a bug" in err and "--debug true" in err
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path, image_file, monkeypatch):
    monkeypatch.setattr("gas_lightning.resolve.make_plan", _explode)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(
            [
                "--image",
                image_file,
                "--request",
                REQUEST,
                "--output_dir",
                str(tmp_path / "out"),
                "--plan_only",
                "true",
                "--debug",
                "true",
            ]
        )
