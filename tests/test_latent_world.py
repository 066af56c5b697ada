"""The latent shapes world (issue 30): SD 1.x layout, loading checks, training stages, VAE check.

Tiny random models in the shipped layout (the pixel world's tokenizer and text encoder, a small
VAE and UNet), saved and loaded through the same code as Stable Diffusion.
"""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch
from test_worlds import _tool

from gas_lightning.backbone import VaeCodec
from gas_lightning.errors import GasError, ModelLoadError
from gas_lightning.guidance.cds import SelfAttentionCapture
from gas_lightning.loading import load_backbone
from gas_lightning.worlds import MODEL_DIR, held_out_cases
from gas_lightning.worlds import latent_model as lm
from gas_lightning.worlds.model import load_folder, sample_images


@pytest.fixture(scope="module")
def tiny_latent(tmp_path_factory):
    """A tiny model in the shipped latent layout, VAE scaling_factor 0.7."""
    torch.manual_seed(0)
    tok, text, _, _ = load_folder(MODEL_DIR)
    folder = tmp_path_factory.mktemp("latent") / "model"
    lm.save_folder(
        folder,
        tok,
        text,
        lm.build_unet((8, 16, 16)),
        lm.build_scheduler(),
        lm.build_vae((8, 8, 8, 8), scaling_factor=0.7),
    )
    return folder


def test_latent_folder_loads_as_stable_diffusion(tiny_latent):
    index = json.loads((tiny_latent / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    sched = json.loads((tiny_latent / "scheduler" / "scheduler_config.json").read_text())
    # SD 1.5's training schedule, written out
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"], sched["prediction_type"]) == (
        "scaled_linear",
        0.00085,
        0.012,
        "epsilon",
    )
    bb = load_backbone(str(tiny_latent), device="cpu", attention="sdpa")
    assert bb.family == "sd" and isinstance(bb.codec, VaeCodec)
    assert bb.codec.vae.config.scaling_factor == pytest.approx(0.7)
    assert bb.default_resolution == 128  # 16x16 latents, three 2x downsamplings: 16 * 2**3
    # CDS hooks self-attention at two up-block resolutions, as on SD: 8x8 and 16x16 cells
    cap = SelfAttentionCapture(bb.unet)
    assert len(cap.modules) == 4  # two CrossAttnUpBlock2D, layers_per_block + 1 = 2 attentions each
    with cap.capture() as feats:
        bb.unet(torch.zeros(1, 4, 16, 16), 10, encoder_hidden_states=torch.zeros(1, 24, 128))
    assert sorted({f.shape[1] for f in feats}) == [8 * 8, 16 * 16]


def test_world_folder_without_scaling_factor_is_refused(tiny_latent, tmp_path):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(tiny_latent, bad)
    config = json.loads((bad / "vae" / "config.json").read_text())
    del config["scaling_factor"]  # diffusers would fall back to SD's 0.18215 without a word
    (bad / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no scaling_factor in vae/config.json"):
        load_backbone(str(bad), device="cpu", attention="sdpa")


def test_world_size_and_smaller_scenes(tiny_latent):
    assert lm.world_size(tiny_latent) == 128 and lm.world_size(MODEL_DIR) == 32
    lm.check_scene_size(128, 128)
    with pytest.raises(GasError, match="64 px are smaller than this model's 128 px"):
        lm.check_scene_size(64, 128)


def test_eval_world_refuses_scenes_smaller_than_the_model(tiny_latent, capsys):
    ev = _tool("eval_world")
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", str(tiny_latent), "--size", "64", "--cases", "1"])
    assert e.value.code == 2 and "smaller than this model's 128 px" in capsys.readouterr().err


def test_bundled_latent_id_names_the_shipped_folder(monkeypatch, tmp_path):
    import gas_lightning.worlds
    from gas_lightning.resolve import resolve_bundled

    (tmp_path / "shapes-latent-model").mkdir()
    monkeypatch.setattr(gas_lightning.worlds, "ASSETS_DIR", tmp_path)
    assert resolve_bundled("gas-lightning:shapes-latent") == str(tmp_path / "shapes-latent-model")


def test_sample_images_decodes_latents(tiny_latent):
    tok, text, unet, sched, vae = lm.load_folder(tiny_latent)
    images = sample_images(tok, text, unet, sched, ["a red circle on snow", "sand"], steps=2, vae=vae)
    assert images.shape == (2, 128, 128, 3) and images.dtype == np.uint8


def test_random_crops_sit_on_the_latent_grid():
    tl = _tool("train_latent_world")
    x = torch.arange(2 * 3 * 40 * 40, dtype=torch.float32).view(2, 3, 40, 40)
    crops = tl.random_crops(x, 16)
    assert crops.shape == (2, 3, 16, 16)
    for k, (im, crop) in enumerate(zip(x, crops)):
        # every value is distinct, so the crop's top-left value says where it came from
        where = int(crop[0, 0, 0]) - k * 3 * 40 * 40
        y, c = divmod(where, 40)
        assert y % 8 == 0 and c % 8 == 0 and torch.equal(crop, im[:, y : y + 16, c : c + 16])


def test_latent_pool_is_a_ring():
    tl = _tool("train_latent_world")
    pool = tl.LatentPool(2)
    for k in range(3):  # the third entry overwrites the first
        pool.add(torch.full((1, 1), float(k)), torch.tensor([[k]]))
    z, ids = pool.draw(50)
    assert (
        pool.filled == 2 and set(z.flatten().tolist()) <= {1.0, 2.0} and torch.equal(z.flatten(), ids.flatten().float())
    )


class _Codec:
    """A stand-in VAE: the latent is the image itself, decoded through `fn`."""

    def __init__(self, fn):
        self.fn = fn

    def encode(self, x):
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        return types.SimpleNamespace(sample=self.fn(z))


def test_vae_check_scores_the_round_trip():
    check = _tool("latent_vae_check")
    assert check.psnr(np.zeros((2, 2, 3), np.uint8), np.ones((2, 2, 3), np.uint8)) == pytest.approx(
        10 * math.log10(255.0**2)
    )
    cases = held_out_cases(6, seed=3, size=64)
    same = check.check(_Codec(lambda z: z), cases)
    assert same["psnr_db_mean"] == 60.0 and same["all_unchanged"] == 1.0
    swapped = check.check(_Codec(lambda z: z.flip(1)), cases)  # RGB -> BGR: red reads as blue, snow stays snow
    assert swapped["objects_unchanged"] < 1.0 and swapped["psnr_db_mean"] < 30


def test_train_latent_world_both_stages_and_resume(tmp_path):
    """Two VAE steps, then two UNet steps on its latents: every snapshot is a folder the SD loader reads."""
    tl = _tool("train_latent_world")
    threads = torch.get_num_threads()
    common = ["--out", str(tmp_path), "--warmup", "1", "--save-every", "2", "--threads", "1", "--accelerator", "cpu"]
    try:
        tl.main(["vae", "--steps", "2", "--batch-size", "2", "--held-out", "4", *common])
        stats = json.loads((tmp_path / "vae" / "ema-latest" / "stats.json").read_text())
        assert stats["scaling_factor"] * stats["latent_std"] == pytest.approx(1.0)
        unet = ["unet", "--batch-size", "2", "--refresh", "2", "--pool", "4", "--channels", "8,16,16", *common]
        tl.main([*unet, "--steps", "2"])
        snap = tmp_path / "kept"  # the EMA snapshot, its UNet in float16
        tl.main([*unet, "--steps", "3", "--resume", str(tmp_path / "unet" / "last.ckpt"), "--keep", str(snap)])
        # a run whose checkpoint is gone continues from its kept snapshot alone (default widths asked for)
        tl.main(
            ["unet", "--batch-size", "2", "--refresh", "2", "--pool", "4", *common[2:], "--steps", "1"]
            + ["--out", str(tmp_path / "again"), "--vae", str(snap / "vae"), "--text", str(snap), "--unet", str(snap)]
            + ["--lr", "1e-4", "--text-lr", "1e-4", "--keep", str(tmp_path / "kept2")]
        )
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "unet" / "ema-latest" / "progress.json").read_text())["step"] == 3
    # a kept snapshot counts the steps of every run behind it: 3, then 1 more continued from it
    assert json.loads((snap / "progress.json").read_text())["total_steps"] == 3
    assert json.loads((tmp_path / "kept2" / "progress.json").read_text())["total_steps"] == 4
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    half = load_file(str(snap / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in half.values()} == {torch.float16}
    full = load_file(str(tmp_path / "unet" / "ema-latest" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(half[k].float(), full[k], rtol=1e-3, atol=1e-4) for k in full)
    before = UNet2DConditionModel.from_pretrained(str(snap / "unet"), torch_dtype=torch.float32)
    after = UNet2DConditionModel.from_pretrained(str(tmp_path / "again" / "unet" / "ema-latest" / "unet"))
    assert tuple(after.config.block_out_channels) == (8, 16, 16)
    # one AdamW step moves a weight by about the lr; a fresh random UNet would differ by far more
    drift = max(float((a - b).abs().max()) for a, b in zip(after.parameters(), before.parameters()))
    assert drift < 1e-3
    bb = load_backbone(str(tmp_path / "unet" / "ema-latest"), device="cpu", attention="sdpa")
    assert bb.codec.vae.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    # the measured factor scales the held-out scenes' latents to unit spread
    z = bb.codec.vae.encode(tl.held_out_pixels(4)).latent_dist.mode() * stats["scaling_factor"]
    assert float(z.std()) == pytest.approx(1.0, rel=1e-4)


def test_decoder_only_keeps_the_latents(tmp_path):
    """--decoder-only changes the decoder and leaves encoder, latents and scaling_factor as they were."""
    from diffusers import AutoencoderKL

    tl = _tool("train_latent_world")
    start = tmp_path / "start"
    lm.build_vae(scaling_factor=0.5).save_pretrained(start)
    threads = torch.get_num_threads()
    try:
        tl.main(
            [
                "vae",
                "--vae",
                str(start),
                "--decoder-only",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--held-out",
                "4",
                "--warmup",
                "1",
                "--ema",
                "0.5",
                "--save-every",
                "2",
                "--threads",
                "1",
                "--accelerator",
                "cpu",
                "--out",
                str(tmp_path / "run"),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    before, after = (
        AutoencoderKL.from_pretrained(start),
        AutoencoderKL.from_pretrained(tmp_path / "run" / "vae" / "ema-latest"),
    )
    same = lambda a, b: all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # noqa: E731
    assert same(before.encoder, after.encoder) and same(before.quant_conv, after.quant_conv)
    assert not same(before.decoder, after.decoder)
    assert after.config.scaling_factor == 0.5  # the start's, not a re-measured 1 / std


def test_eval_world_edits_latent_cases_at_the_models_size(tiny_latent, tmp_path):
    """Two steps of gas and the SD preset (whole-scene term, null-text penalty) through the VAE path."""
    ev = _tool("eval_world")
    out = tmp_path / "r.json"
    assert (
        ev.main(
            [
                "--model",
                str(tiny_latent),
                "--cases",
                "1",
                "--steps",
                "2",
                "--methods",
                "gas,gas_reference",
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
    assert payload["settings"]["size"] == 128 and list(payload["methods"]) == ["gas", "gas_reference"]
    from PIL import Image

    assert Image.open(tmp_path / "f.png").size[1] == 14 + 128 + 2 * 4  # one row of 128 px tiles, shown unscaled
