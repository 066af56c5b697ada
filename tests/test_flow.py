"""The rectified-flow backbones (SD3, FLUX) and the grounded FlowEdit solver, on tiny random models.

Expected values are written out here from FlowEdit's update (fallenshock/FlowEdit, FlowEditSD3/FlowEditFLUX)
with the raw transformers and diffusers' own pipelines (prompt encoding, FLUX packing), never by calling
the solver under test.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gas_lightning.cli import main
from gas_lightning.errors import GasError, ModelLoadError
from gas_lightning.flow_backbone import FluxBackbone, SD3Backbone
from gas_lightning.guidance import GuidanceConfig
from gas_lightning.guidance.flow import FlowConfig
from gas_lightning.loading import load_backbone
from gas_lightning.module import step_generator
from gas_lightning.plan import EditPlan, Subtask
from gas_lightning.solvers import build_solver_edit
from gas_lightning.testing import build_tiny_flux, build_tiny_sd3

REPO = Path(__file__).resolve().parents[1]
LEFT = (0.0, 0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    return str(build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    return str(build_tiny_flux(tmp_path_factory.mktemp("tiny_flux")))


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    return load_backbone(sd3_dir)


@pytest.fixture(scope="module")
def flux(flux_dir):
    return load_backbone(flux_dir)


def picture() -> Image.Image:
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, :, 0] = np.linspace(0, 255, 32, dtype=np.uint8)[None, :]
    arr[8:24, 4:14] = (40, 200, 60)
    arr[4:20, 18:30] = (30, 40, 220)
    return Image.fromarray(arr)


def plan(*boxes) -> EditPlan:
    subtasks = [Subtask(source=f"a thing {i}", target=f"a cat {i}", box=b) for i, b in enumerate(boxes)]
    return EditPlan(subtasks=subtasks, source_prompt="a red scene", target_prompt="a blue scene")


def fit(module, steps: int) -> None:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)


def left_half() -> torch.Tensor:
    m = torch.zeros(16, 16)
    m[:, :8] = 1.0
    return m


# loading ---------------------------------------------------------------------------------------------


def test_families_load_from_model_index_and_unknown_transformers_are_refused(sd3, flux, flux_dir, tmp_path):
    assert isinstance(sd3, SD3Backbone) and isinstance(flux, FluxBackbone)
    assert (sd3.default_resolution, flux.size_multiple) == (32, 4)
    other = tmp_path / "pixart"
    shutil.copytree(flux_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "PixArtTransformer2DModel"]
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="PixArtTransformer2DModel.*not SD3's or FLUX's"):
        load_backbone(str(other))


def test_text_encoders_wait_on_the_cpu_while_the_transformer_is_on_the_device(flux_dir):
    bb = load_backbone(flux_dir)
    bb.to(torch.device("meta"))  # a device that is not the CPU: whatever goes there is visibly elsewhere
    assert next(bb.transformer.parameters()).device.type == "meta"
    assert {p.device.type for enc in bb.text_encoders() for p in enc.parameters()} == {"cpu"}
    bb.offload_text = False
    bb.to(torch.device("meta"))
    assert {p.device.type for enc in bb.text_encoders() for p in enc.parameters()} == {"meta"}


def test_prompts_embed_as_diffusers_pipelines_embed_them(sd3, flux):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    prompts = ["a red circle", "snow"]
    pipe = StableDiffusion3Pipeline(
        transformer=sd3.transformer,
        scheduler=sd3.scheduler,
        vae=sd3.codec.vae,
        text_encoder=sd3.text_encoder,
        tokenizer=sd3.tokenizer,
        text_encoder_2=sd3.text_encoder_2,
        tokenizer_2=sd3.tokenizer_2,
        text_encoder_3=sd3.text_encoder_3,
        tokenizer_3=sd3.tokenizer_3,
    )
    hidden, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=24
    )
    ours = sd3.encode_prompts(prompts)
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.pooled, pooled)
    pipe = FluxPipeline(
        scheduler=flux.scheduler,
        vae=flux.codec.vae,
        text_encoder=flux.text_encoder,
        tokenizer=flux.tokenizer,
        text_encoder_2=flux.text_encoder_2,
        tokenizer_2=flux.tokenizer_2,
        transformer=flux.transformer,
    )
    hidden, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=24)
    ours = flux.encode_prompts(prompts)
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.pooled, pooled)


def test_single_file_transformers_load_and_families_must_match(sd3_dir, flux_dir, tmp_path):
    flux = load_backbone(flux_dir)
    weights = {k: v.contiguous() for k, v in flux.transformer.state_dict().items()}
    weights = {k: v + 0.5 for k, v in weights.items()}  # not the folder's: the file's weights must be the ones used
    save_file(weights, tmp_path / "flux-finetune.safetensors")
    loaded = load_backbone(str(tmp_path / "flux-finetune.safetensors"), model_config=flux_dir)
    assert isinstance(loaded, FluxBackbone)
    assert all(torch.equal(weights[k], v) for k, v in loaded.transformer.state_dict().items())
    with pytest.raises(ModelLoadError, match="checkpoint of FLUX.1 but --model_config .* config folder of SD3"):
        load_backbone(str(tmp_path / "flux-finetune.safetensors"), model_config=sd3_dir)
    sd_keys = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "cond_stage_model.x": torch.zeros(1)}
    save_file(sd_keys, tmp_path / "sd15.safetensors")
    with pytest.raises(ModelLoadError, match="checkpoint of Stable Diffusion 1.x/2.x but .* config folder of FLUX.1"):
        load_backbone(str(tmp_path / "sd15.safetensors"), model_config=flux_dir)


# the time grid and FLUX's packing, against formulas and diffusers ------------------------------------------


def shift(s, k):
    """SD3's static time shift."""
    return k * s / (1 + (k - 1) * s)


def test_time_grids_are_flowedits(sd3, flux):
    lin = np.linspace(1.0, shift(1 / 1000, 3.0), 50)
    np.testing.assert_allclose(sd3.time_grid(50, (128, 128)).numpy(), [*shift(lin, 3.0), 0.0], atol=1e-6)
    tokens = 64 * 64  # a 1024 px FLUX image: 128 x 128 latents in 2x2 tokens
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
    lin = np.linspace(1.0, 1 / 28, 28)
    expected = math.exp(mu) / (math.exp(mu) + (1 / lin - 1))
    np.testing.assert_allclose(flux.time_grid(28, (128, 128)).numpy(), [*expected, 0.0], atol=1e-6)


def test_flux_packs_latents_and_positions_as_its_pipeline(flux):
    from diffusers import FluxPipeline

    from gas_lightning.flow_backbone import pack, unpack

    z = torch.randn(2, 4, 6, 8)
    torch.testing.assert_close(pack(z), FluxPipeline._pack_latents(z, 2, 4, 6, 8))
    torch.testing.assert_close(unpack(pack(z), 6, 8), z)
    ids = FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)
    torch.testing.assert_close(flux.image_ids(6, 8), ids)


# the update, written out -----------------------------------------------------------------------------------


def raw_sd3_velocity(bb, z, t, emb):
    return bb.transformer(
        hidden_states=z,
        timestep=torch.full((z.shape[0],), t * 1000),
        encoder_hidden_states=emb.hidden,
        pooled_projections=emb.pooled,
    ).sample


def raw_flux_velocity(bb, z, t, emb, g):
    from diffusers import FluxPipeline

    b, c, h, w = z.shape
    out = bb.transformer(
        hidden_states=FluxPipeline._pack_latents(z, b, c, h, w),
        timestep=torch.full((b,), t),
        guidance=torch.full((b,), g),
        pooled_projections=emb.pooled,
        encoder_hidden_states=emb.hidden,
        txt_ids=torch.zeros(emb.hidden.shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
    ).sample
    return FluxPipeline._unpack_latents(out, h, w, 1)  # (height, width) in pixels at a VAE factor of 1


def test_a_batched_sd3_step_is_flowedits_update_per_region(sd3):
    """One subtask on the left half plus the whole scene; 2 noise draws averaged; CFG per branch."""
    p = plan(LEFT)
    flow = FlowConfig(steps=5, n_max=1, n_avg=2, source_guidance_scale=3.5, target_guidance_scale=13.5)
    module = build_solver_edit(sd3, picture(), p, flow_config=flow, seed=3)
    x_src = module.z_src.clone()
    fit(module, 1)
    grid = sd3.time_grid(5, (16, 16))
    t, t_next = float(grid[4]), float(grid[5])  # the grid's last step: n_max = 1
    gen = step_generator(3, 0, 0)
    noises = [torch.randn(x_src.shape, generator=gen) for _ in range(2)]
    emb = sd3.encode_prompts(["a thing 0", "a cat 0", "a red scene", "a blue scene", ""])
    null = emb[4]

    def cfg(z, c, s):
        v0, vc = raw_sd3_velocity(sd3, z, t, null), raw_sd3_velocity(sd3, z, t, c)
        return v0 + s * (vc - v0)

    def dv(src, tgt):
        out = 0
        for n in noises:
            zs = (1 - t) * x_src + t * n
            zt = zs + (x_src - x_src)  # the edit starts at the source
            out = out + (cfg(zt, tgt, 13.5) - cfg(zs, src, 3.5)) / 2
        return out

    beta = [0.5, 0.4, 0.3, 0.2, 0.1][min(round(t * 1000) // 200, 4)]
    m = left_half()
    expected = x_src + (t_next - t) * (m * dv(emb[0], emb[1]) + beta * m * dv(emb[2], emb[3]))
    torch.testing.assert_close(module.latent.detach(), expected, atol=1e-5, rtol=1e-4)


def test_a_sequential_flux_step_moves_term_after_term(flux):
    """Two subtasks, one Euler sub-step each (the second at the latent the first left), distilled guidance."""
    p = plan(LEFT, (0.5, 0.0, 1.0, 1.0))
    flow = FlowConfig(steps=4, n_max=2)
    shared = GuidanceConfig(full_prompt=False)
    module = build_solver_edit(flux, picture(), p, flow_config=flow, guidance_config=shared, schedule="sequential")
    x_src = module.z_src.clone()
    fit(module, 2)
    grid = flux.time_grid(4, (16, 16))
    emb = flux.encode_prompts(["a thing 0", "a cat 0", "a thing 1", "a cat 1"])
    masks = [left_half(), 1 - left_half()]
    z = x_src.clone()
    for step in range(2):
        t, t_next = float(grid[2 + step]), float(grid[3 + step])
        gen = step_generator(0, step, 0)
        for k in range(2):
            n = torch.randn(x_src.shape, generator=gen)
            zs = (1 - t) * x_src + t * n
            zt = zs + (z - x_src)
            d = raw_flux_velocity(flux, zt, t, emb[2 * k + 1], 5.5) - raw_flux_velocity(flux, zs, t, emb[2 * k], 1.5)
            z = z + (t_next - t) * masks[k] * d
    torch.testing.assert_close(module.latent.detach(), z, atol=1e-5, rtol=1e-4)


def test_a_left_half_region_moves_only_the_left_half_of_the_latent_and_image(flux):
    module = build_solver_edit(flux, picture(), plan(LEFT), flow_config=FlowConfig(steps=4, n_max=3))
    fit(module, 3)
    change = (module.latent.detach() - module.z_src).abs()[0].sum(0)
    assert change[:, :8].min() > 0 and change[:, 8:].max() == 0
    pixels = (module.decode() - module.decode(module.z_src)).abs()[0].sum(0)
    # The decoder's convolutions reach a few pixels across the seam (x = 16) and its GroupNorms couple every pixel
    # (their statistics are over the whole image), so the right half is not bit-identical; the move is on the left.
    assert pixels[:, :12].mean() > 2 * pixels[:, 20:].mean()


# resume, the command line ----------------------------------------------------------------------------------


def test_resume_from_a_middle_checkpoint_equals_the_uninterrupted_edit(flux_dir, tmp_path):
    image = tmp_path / "in.png"
    picture().save(image)
    common = [
        "--config", str(REPO / "configs" / "flux.yaml"), "--model", flux_dir, "--image", str(image),
        "--request", "change the green block into a cat.", "--boxes", "[[0.1, 0.2, 0.45, 0.8]]",
        "--flow.steps", "6", "--flow.n_max", "4", "--trainer.max_steps", "4", "--checkpoint_every", "2",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    for args in (["--output_dir", str(tmp_path / "a")], ["--output_dir", str(tmp_path / "b")]):
        if args[1].endswith("b"):
            args += ["--resume", str(tmp_path / "a" / "checkpoints" / "step000002.ckpt")]
        with pytest.raises(SystemExit) as exit_info:
            main(common + args)
        assert exit_info.value.code == 0
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    middle = torch.load(tmp_path / "a" / "checkpoints" / "step000002.ckpt", weights_only=True)
    assert b["global_step"] == 4 and not torch.equal(middle["state_dict"]["latent"], a["state_dict"]["latent"])
    torch.testing.assert_close(b["state_dict"]["latent"], a["state_dict"]["latent"], atol=0, rtol=0)
    assert (tmp_path / "b" / "edited.png").is_file()


# bad input ---------------------------------------------------------------------------------------------------


def gas_edit_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and "Traceback" not in err, err
    return " ".join(err.split())


@pytest.mark.parametrize(
    ("config", "model", "message"),
    [
        ("sd15.yaml", "flux", "solver dds needs a noise-predicting UNet model .* is a flux rectified-flow model"),
        ("flux.yaml", "sd", "solver flow needs a rectified-flow model .* is a sd UNet model"),
        ("flux.yaml", "sd3", "these flow settings are for flux models .* is a sd3 model: use configs/sd3.yaml"),
    ],
)
def test_a_config_for_another_family_is_one_message(
    capsys, tmp_path, tiny_sd, flux_dir, sd3_dir, config, model, message
):
    folder = {"flux": flux_dir, "sd": tiny_sd, "sd3": sd3_dir}[model]
    picture().save(tmp_path / "in.png")
    err = gas_edit_error(
        capsys, "--config", REPO / "configs" / config, "--model", folder, "--image", tmp_path / "in.png",
        "--request", "change the block into a cat.", "--boxes", "[[0, 0, 0.5, 1]]", "--output_dir", tmp_path / "o",
        "--trainer.accelerator", "cpu",
    )  # fmt: skip
    assert __import__("re").search(message, err), err


def test_guidance_scales_flux_cannot_use_are_refused(flux, flux_dir, tmp_path):
    with pytest.raises(GasError, match="FLUX-dev takes its guidance as a distilled strength of at least 1"):
        build_solver_edit(flux, picture(), plan(LEFT), flow_config=FlowConfig(source_guidance_scale=0.0))
    schnell = load_backbone(str(build_tiny_flux(tmp_path / "schnell", dev=False)))
    with pytest.raises(GasError, match="without a guidance input \\(schnell\\)"):
        build_solver_edit(schnell, picture(), plan(LEFT), flow_config=FlowConfig(target_guidance_scale=5.5))
    module = build_solver_edit(schnell, picture(), plan(LEFT), flow_config=FlowConfig(steps=3, n_max=1))
    fit(module, 1)  # without scales schnell runs: one transformer call per branch, no guidance input
    assert module.latent.detach().ne(module.z_src).any()


def test_regions_for_another_latent_size_and_a_wrong_step_count_are_one_message_each(sd3):
    from dataclasses import replace

    from gas_lightning.flow_module import GroundedFlowEdit

    module = build_solver_edit(sd3, picture(), plan(LEFT), flow_config=FlowConfig(steps=4, n_max=2))
    terms = [replace(tm, mask=torch.ones(8, 8)) for tm in module.terms]  # made for a 16 px image
    with pytest.raises(GasError, match="region of term .* is \\(8, 8\\) but the latent is \\(16, 16\\)"):
        GroundedFlowEdit(module.guidance, module.z_src, terms, module.plan)
    with pytest.raises(GasError, match="runs flow.n_max = 2 steps .* set --trainer.max_steps 2"):
        fit(module, 5)


def test_the_python_api_edits_with_a_loaded_flow_model(flux, tmp_path):
    from gas_lightning import edit

    result = edit(
        picture(), "change the green block into a cat.", boxes=[[0.1, 0.2, 0.45, 0.8]], model=flux,
        config=str(REPO / "configs" / "flux.yaml"), flow={"steps": 4, "n_max": 2}, trainer_kwargs={"max_steps": 2},
        output_dir=str(tmp_path / "api"),
    )  # fmt: skip
    assert result.steps == 2 and result.image.size == (32, 32)
    from gas_lightning.pipeline import image_to_tensor

    change = (result.latent - flux.codec.encode(image_to_tensor(picture(), (32, 32))))[0].abs().sum(0)
    inside, outside = (
        change[4:12, 2:7],
        torch.cat([change[:, 8:].flatten(), change[:2].flatten(), change[14:].flatten()]),
    )
    assert inside.min() > 0 and outside.max() == 0  # the box (and the whole-scene term's union, the same box) only
