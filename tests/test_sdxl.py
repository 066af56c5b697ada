"""SDXL end to end on a tiny random SDXL-layout model.

The expected conditioning comes from diffusers' own StableDiffusionXLPipeline (encode_prompt,
_get_add_time_ids) and the raw UNet, never from the code under test; a spy on the UNet's
forward checks that every call of both schedules and of the CDS term carries it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_fidelity_units import _one_thread  # noqa: F401  (autouse: one torch thread in this process)

from gas_lightning.errors import ModelLoadError
from gas_lightning.masks import EditMasks
from gas_lightning.plan import EditPlan
from gas_lightning.testing import build_tiny_sdxl

REPO = Path(__file__).resolve().parents[1]
REQUEST = "change the red block into a yellow block. change the grass into snow."
BOXES = "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]]"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> str:
    return str(build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    from gas_lightning.loading import load_backbone

    return load_backbone(tiny_sdxl, attention="sdpa")


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)


def _pipeline_conditioning(pipe, prompts, height, width):
    """Token embeddings, pooled embeddings and time ids exactly as StableDiffusionXLPipeline makes them."""
    with torch.no_grad():
        hidden, null_hidden, pooled, null_pooled = pipe.encode_prompt(
            prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    time_ids = pipe._get_add_time_ids(
        (height, width),
        (0, 0),
        (height, width),
        dtype=torch.float32,
        text_encoder_projection_dim=int(pipe.text_encoder_2.config.projection_dim),
    )
    return hidden, pooled, null_hidden[:1], null_pooled[:1], time_ids


def _raw_eps(pipe, z_t, t, hidden, pooled, time_ids):
    with torch.no_grad():
        return pipe.unet(
            z_t,
            torch.tensor([t]),
            encoder_hidden_states=hidden,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample


class UNetSpy:
    """Records the added conditioning of every UNet forward while installed."""

    def __init__(self, monkeypatch):
        from diffusers import UNet2DConditionModel

        self.calls: list[dict] = []
        original = UNet2DConditionModel.forward

        def forward(unet, sample, timestep, encoder_hidden_states, *args, **kwargs):
            added = kwargs.get("added_cond_kwargs")
            self.calls.append(
                {
                    "batch": sample.shape[0],
                    "size": tuple(sample.shape[-2:]),
                    "hidden": encoder_hidden_states,
                    "added": None if added is None else {k: v.detach().clone() for k, v in added.items()},
                }
            )
            return original(unet, sample, timestep, encoder_hidden_states, *args, **kwargs)

        monkeypatch.setattr(UNet2DConditionModel, "forward", forward)


# --- loading ---------------------------------------------------------------------------------


def test_sdxl_folder_loads_as_the_sdxl_family(sdxl):
    from gas_lightning.backbone import SDXLBackbone

    assert isinstance(sdxl, SDXLBackbone) and sdxl.family == "sdxl"
    assert sdxl.default_resolution == 32 and sdxl.unet.config.addition_embed_type == "text_time"
    assert not any(p.requires_grad for p in sdxl.text_encoder_2.parameters())


def test_sdxl_vae_stays_float32_when_the_model_is_float16(tiny_sdxl, tmp_path):
    from gas_lightning.loading import load_backbone

    bb = load_backbone(tiny_sdxl, dtype="float16", attention="sdpa")
    assert bb.dtype == torch.float16 and bb.text_encoder_2.dtype == torch.float16
    assert bb.codec.vae.dtype == torch.float32
    # a VAE fixed for fp16 (force_upcast false) follows the model's dtype
    fixed = tmp_path / "fixed"
    build_tiny_sdxl(fixed)
    config = json.loads((fixed / "vae" / "config.json").read_text())
    (fixed / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    assert load_backbone(str(fixed), dtype="float16", attention="sdpa").codec.vae.dtype == torch.float16


def test_vae_ignores_a_surrounding_autocast(sdxl):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = sdxl.codec.decode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast; the codec must switch it off
        under = sdxl.codec.decode(z)
    torch.testing.assert_close(under, plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("pipeline", "transformer"),
    [("PixArtSigmaPipeline", "PixArtTransformer2DModel"), ("HunyuanDiTPipeline", "HunyuanDiT2DModel")],
)
def test_other_families_are_refused_with_one_message(tiny_sdxl, tmp_path, pipeline, transformer):
    """Diffusion transformers other than SD3's and FLUX's (those load: tests/test_flow.py)."""
    from gas_lightning.loading import load_backbone

    folder = tmp_path / pipeline
    folder.mkdir()
    index = {
        "_class_name": pipeline,
        "transformer": ["diffusers", transformer],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError) as err:
        load_backbone(str(folder))
    message = str(err.value)
    assert pipeline in message and "not supported" in message and "Stable Diffusion 1.x/2.x and SDXL" in message


def test_the_refiner_is_refused(tiny_sdxl, tmp_path):
    import shutil

    from gas_lightning.loading import load_backbone

    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None], tokenizer=[None, None])
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="no first text encoder"):
        load_backbone(str(refiner))


def test_an_inpainting_unet_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from gas_lightning.loading import load_backbone
    from gas_lightning.testing import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "inpaint")
    config = dict(UNet2DConditionModel.load_config(folder / "unet"), in_channels=9)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    with pytest.raises(ModelLoadError, match="takes 9 input channels for 4 output channels"):
        load_backbone(str(folder))


# --- conditioning ----------------------------------------------------------------------------


def test_prompt_embeddings_batch_slice_and_refuse_mixed_families():
    from gas_lightning.backbone import PromptEmbeddings

    a = PromptEmbeddings(torch.arange(2 * 3 * 4.0).reshape(2, 3, 4), torch.arange(2 * 5.0).reshape(2, 5))
    row = a[1]  # an integer keeps the batch axis
    assert row.hidden.shape == (1, 3, 4) and torch.equal(row.pooled, torch.tensor([[5.0, 6, 7, 8, 9]]))
    both = PromptEmbeddings.cat([a[-1], row.expand(2)])
    assert len(both) == 3 and torch.equal(both.pooled[:, 0], torch.tensor([5.0, 5, 5]))
    sd = PromptEmbeddings.cat([torch.zeros(1, 3, 4), torch.ones(2, 3, 4)])  # bare tensors: SD 1/2, no pooled
    assert sd.pooled is None and len(sd) == 3
    with pytest.raises(ValueError, match="with and without pooled"):
        PromptEmbeddings.cat([a, sd])


def test_prompt_embeddings_match_the_sdxl_pipeline(sdxl, pipe):
    prompts = ["a cat", "snow", "a red block on the grass"]
    hidden, pooled, null_hidden, null_pooled, _ = _pipeline_conditioning(pipe, prompts, 32, 32)
    emb = sdxl.encode_prompts(prompts)
    assert emb.hidden.shape == (3, 16, 32 + 48) and emb.pooled.shape == (3, 24)
    torch.testing.assert_close(emb.hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(emb.pooled, pooled, rtol=0, atol=0)
    null = sdxl.null_embeddings()  # force_zeros_for_empty_prompt: the pipeline's null text is zeros
    torch.testing.assert_close(null.hidden, null_hidden, rtol=0, atol=0)
    torch.testing.assert_close(null.pooled, null_pooled, rtol=0, atol=0)


def test_noise_prediction_matches_the_unet_with_pipeline_conditioning(sdxl, pipe):
    """predict_eps on a non-square latent = the raw UNet with the pipeline's text_embeds and time_ids."""
    hidden, pooled, _, _, time_ids = _pipeline_conditioning(pipe, ["a cat"], 32, 40)
    z_t = torch.randn(1, 4, 16, 20, generator=torch.Generator().manual_seed(0))  # 32 x 40 pixels, VAE factor 2
    got = sdxl.predict_eps(z_t, torch.tensor([500]), sdxl.encode_prompts(["a cat"]))
    torch.testing.assert_close(got, _raw_eps(pipe, z_t, 500, hidden, pooled, time_ids), rtol=1e-5, atol=1e-6)


def test_pooled_embeddings_and_time_ids_change_the_prediction(sdxl, pipe):
    """The added conditioning is not ignored: another pooled embedding or other sizes move the UNet's output."""
    hidden, pooled, _, _, time_ids = _pipeline_conditioning(pipe, ["a cat", "a dog"], 32, 32)
    z_t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    base = _raw_eps(pipe, z_t, 500, hidden[:1], pooled[:1], time_ids)
    assert (_raw_eps(pipe, z_t, 500, hidden[:1], pooled[1:], time_ids) - base).abs().max() > 1e-4
    assert (_raw_eps(pipe, z_t, 500, hidden[:1], pooled[:1], time_ids * 2) - base).abs().max() > 1e-4
    ours = sdxl.predict_eps(z_t, torch.tensor([500]), sdxl.encode_prompts(["a cat"]))
    torch.testing.assert_close(ours, base.float(), rtol=1e-5, atol=1e-6)


def test_term_gradient_matches_the_formula_with_pipeline_conditioning(sdxl, pipe):
    """DESIGN.md's term gradient written out with the raw UNet and the pipeline's conditioning (null = zeros)."""
    from diffusers import DDPMScheduler

    from gas_lightning.guidance import GroundedScoreGuidance
    from gas_lightning.pipeline import build_terms

    plan = EditPlan.from_lists(["a dog"], ["a cat"], boxes=[[0.25, 0.25, 0.75, 0.75]])
    (term, _) = build_terms(sdxl, plan, EditMasks.from_plan(plan, 16, 16))
    g = torch.Generator().manual_seed(2)
    z_src = torch.randn(1, 4, 16, 16, generator=g)
    z, eps = z_src + 0.3 * torch.randn(z_src.shape, generator=g), torch.randn(z_src.shape, generator=g)
    t = 300
    got, _ = GroundedScoreGuidance(sdxl).term_gradient(z, z_src, term, t, eps)

    hidden, pooled, null_hidden, null_pooled, time_ids = _pipeline_conditioning(pipe, ["a dog", "a cat"], 32, 32)
    ab = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[t]
    zt_src, zt_tgt = ab.sqrt() * z_src + (1 - ab).sqrt() * eps, ab.sqrt() * z + (1 - ab).sqrt() * eps
    e0_src = _raw_eps(pipe, zt_src, t, null_hidden, null_pooled, time_ids)
    e0_tgt = _raw_eps(pipe, zt_tgt, t, null_hidden, null_pooled, time_ids)
    ex = _raw_eps(pipe, zt_src, t, hidden[:1], pooled[:1], time_ids)
    ey = _raw_eps(pipe, zt_tgt, t, hidden[1:], pooled[1:], time_ids)
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1
    want = mask * ((e0_tgt + 7.5 * (ey - e0_tgt)) - (e0_src + 7.5 * (ex - e0_src))) / (16 * 16)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


# --- end to end through gas-edit -------------------------------------------------------------


def _run(argv: list[str]) -> int:
    from gas_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def _edit_args(model: str, image: str, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--model",
        model,
        "--image",
        image,
        "--request",
        REQUEST,
        "--boxes",
        BOXES,
        "--output_dir",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("schedule", ["batched", "sequential"])
def test_every_unet_call_of_an_edit_carries_the_added_conditioning(
    tiny_sdxl, sdxl, image_file, tmp_path, monkeypatch, schedule
):
    """Both schedules, and the CDS term (tiny.yaml preserves the first subtask's form): every UNet call gets
    text_embeds with one row per sample, each row a prompt's pooled embedding (zeros for the null text),
    and the time ids of the 40 x 32 working size."""
    spy = UNetSpy(monkeypatch)
    assert (
        _run(_edit_args(tiny_sdxl, image_file, tmp_path / "out", "--schedule", schedule, "--trainer.max_steps", "2"))
        == 0
    )
    assert (tmp_path / "out" / "edited.png").is_file()
    prompts = [
        "the red block",
        "the grass",
        "a yellow block",
        "snow",
        "the red block and the grass",
        "a yellow block and snow",
    ]
    pooled = sdxl.encode_prompts(prompts).pooled
    allowed = torch.cat([torch.zeros(1, 24), pooled])
    edit_calls = [c for c in spy.calls if c["size"] == (16, 20)]  # the 48x40 input works at 40x32 -> 20x16 latents
    assert edit_calls and all(c["added"] is not None for c in spy.calls)
    seen = set()
    for call in edit_calls:
        text_embeds, time_ids = call["added"]["text_embeds"], call["added"]["time_ids"]
        assert text_embeds.shape == (call["batch"], 24) and time_ids.shape == (call["batch"], 6)
        torch.testing.assert_close(
            time_ids, torch.tensor([[32.0, 40.0, 0.0, 0.0, 32.0, 40.0]]).expand(call["batch"], 6)
        )
        for row in text_embeds:
            match = [i for i, ref in enumerate(allowed) if torch.allclose(row, ref, atol=1e-6)]
            assert match, "a text_embeds row that is no prompt's pooled embedding"
            seen.add(match[0])
    assert seen == set(range(len(allowed)))  # every prompt of every term, and the null text
    # CDS runs the UNet with a batch of one preserved term beside the DDS calls (4 samples per term or 2n+2)
    assert any(c["batch"] == 1 for c in edit_calls)


def test_sdxl_edit_resumes_to_the_same_latent(tiny_sdxl, image_file, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert _run(_edit_args(tiny_sdxl, image_file, reference, "--trainer.max_steps", "4")) == 0
    assert _run(_edit_args(tiny_sdxl, image_file, resumed, "--trainer.max_steps", "2")) == 0
    first = torch.load(resumed / "latent.pt")["latent"]
    assert _run(_edit_args(tiny_sdxl, image_file, resumed, "--trainer.max_steps", "4", "--resume", "last")) == 0
    got, want = torch.load(resumed / "latent.pt"), torch.load(reference / "latent.pt")
    assert got["step"] == want["step"] == 4 and not torch.equal(first, got["latent"])
    torch.testing.assert_close(got["latent"], want["latent"], rtol=0, atol=1e-6)
    assert Image.open(reference / "edited.png").size == (40, 32)


def test_v_prediction_sdxl_edit(tmp_path, image_file):
    from gas_lightning.loading import load_backbone

    model = build_tiny_sdxl(tmp_path / "sdxl_v", prediction_type="v_prediction")
    assert load_backbone(str(model), attention="sdpa").prediction_type == "v_prediction"
    out = tmp_path / "out"
    assert _run(_edit_args(str(model), image_file, out, "--trainer.max_steps", "2")) == 0
    saved = torch.load(out / "latent.pt")
    assert torch.isfinite(saved["latent"]).all() and saved["step"] == 2


def test_unsupported_family_exits_2_with_one_line(tmp_path, image_file, capsys):
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})
    )
    assert _run(_edit_args(str(folder), image_file, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FluxPipeline" in err[0] and "Traceback" not in err[0]


def test_the_shipped_sdxl_config_runs_an_edit(tiny_sdxl, image_file, tmp_path):
    """configs/sdxl.yaml with the tiny SDXL model in place of the hub id (CPU: full precision)."""
    out = tmp_path / "out"
    argv = [
        "--config",
        str(REPO / "configs" / "sdxl.yaml"),
        "--model",
        tiny_sdxl,
        "--image",
        image_file,
        "--request",
        REQUEST,
        "--boxes",
        BOXES,
        "--output_dir",
        str(out),
        "--trainer.precision",
        "32-true",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert _run(argv) == 0
    assert Image.open(out / "edited.png").size == (40, 32)  # the model's own working size (tiny: 32)


def test_sdxl_preset_cds_weight_keeps_sd15s_total_over_its_self_attention_layers():
    """configs/sdxl.yaml's CDS weight is (SD 1.5's up-block self-attention layers) / (SDXL's), the layers
    counted on the published architectures (diffusers' UNet built on the meta device: no weights)."""
    import yaml
    from diffusers import UNet2DConditionModel

    sdxl_config = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the fields that shape the blocks
        sample_size=128,
        block_out_channels=[320, 640, 1280],
        layers_per_block=2,
        transformer_layers_per_block=[1, 2, 10],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        attention_head_dim=[5, 10, 20],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    counts = []
    for config in ({"cross_attention_dim": 768}, sdxl_config):  # diffusers' defaults are SD 1.5's UNet
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        counts.append(sum(1 for n, _ in unet.named_modules() if n.startswith("up_blocks") and n.endswith("attn1")))
    assert counts == [9, 36]
    preset = yaml.safe_load((REPO / "configs" / "sdxl.yaml").read_text())
    assert preset["guidance"]["cds"]["weight"] == counts[0] / counts[1]
