"""The rectified-flow twin of the latent world: its flow-matching loss, its training stage, its SD3 folder."""

from __future__ import annotations

import json

import pytest
import torch
from test_worlds import _tool

from gas_lightning.flow_backbone import SD3Backbone
from gas_lightning.loading import load_backbone
from gas_lightning.worlds import MODEL_DIR
from gas_lightning.worlds import latent_model as lm


def test_flow_matching_loss_is_zero_for_the_true_velocity():
    """For data that is one point x0, the exact velocity at z_t is (z_t - x0) / t (z_t = (1 - t) x0 + t n,
    v = n - x0): the loss must vanish for it and, for v = 0, be E|n - x0|^2 = 1 + mean(x0^2)."""
    tl = _tool("train_latent_world")
    torch.manual_seed(0)
    x0 = torch.randn(1, 4, 8, 8).expand(4096, -1, -1, -1) * 0.5

    def oracle(z_t, t):
        return (z_t - x0) / t.view(-1, 1, 1, 1)

    assert float(tl.flow_matching_loss(oracle, x0)) < 1e-8
    zero = float(tl.flow_matching_loss(lambda z_t, t: torch.zeros_like(z_t), x0))
    assert zero == pytest.approx(1 + float(x0[0].pow(2).mean()), rel=0.02)
    # the reverse sign (x0 - n, a denoising direction) is far off
    assert float(tl.flow_matching_loss(lambda z_t, t: -oracle(z_t, t), x0)) > 3


def test_flow_stage_trains_a_folder_the_sd3_loader_reads(tmp_path):
    """Two steps of the flow stage on a tiny VAE: the EMA snapshot is an SD3-layout folder that loads as
    SD3; a kept copy (transformer in float16) continues with its own encoders and counts its steps."""
    tl = _tool("train_latent_world")
    vae = tmp_path / "vae"
    lm.build_vae((8, 8, 8, 8), scaling_factor=0.7).save_pretrained(vae)
    common = ["--batch-size", "2", "--refresh", "2", "--pool", "4", "--warmup", "1", "--save-every", "2"]
    common += ["--threads", "1", "--accelerator", "cpu", "--vae", str(vae), "--transformer-size", "1,2,8"]
    threads = torch.get_num_threads()
    try:
        tl.main(["flow", "--out", str(tmp_path / "a"), "--text", str(MODEL_DIR), "--steps", "2", "--keep",
                 str(tmp_path / "kept"), *common])  # fmt: skip
        kept = tmp_path / "kept"
        tl.main(["flow", "--out", str(tmp_path / "b"), "--text", str(kept), "--transformer", str(kept), "--steps",
                 "1", "--keep", str(tmp_path / "kept2"), *common])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    index = json.loads((kept / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["gas_world"] == "shapes-flow"
    assert json.loads((tmp_path / "kept2" / "progress.json").read_text())["total_steps"] == 3
    bb = load_backbone(str(kept), device="cpu", attention="sdpa")
    assert isinstance(bb, SD3Backbone) and bb.codec.scale == pytest.approx(0.7)
    from safetensors.torch import load_file

    stored = load_file(str(kept / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}  # half the bytes; loaded in float32 on the CPU
    # SD3's shift 3, s -> 3s / (1 + 2s), on diffusers' grid: 50 points from 1 down to the shifted 1/1000
    shifted = lambda s: 3 * s / (1 + 2 * s)  # noqa: E731
    assert float(bb.time_grid(50, (16, 16))[1]) == pytest.approx(shifted(1 - (1 - shifted(0.001)) / 49), rel=1e-5)
    # the pooled embedding is the world CLIP's own (identity projection), both CLIP slots the same encoder
    from transformers import CLIPTextModel

    clip = CLIPTextModel.from_pretrained(str(MODEL_DIR / "text_encoder")).eval()
    ids = bb.tokenizer(["a red circle on snow"], padding="max_length", max_length=24, return_tensors="pt").input_ids
    emb = bb.encode_prompts(["a red circle on snow"])
    with torch.no_grad():
        pooled = clip(ids).pooler_output
    assert torch.allclose(emb.pooled.float(), torch.cat([pooled, pooled], -1), atol=1e-5)
    assert emb.hidden.shape == (1, 24 + 24, 256)  # both CLIPs' 24 tokens joined and padded, then T5's 24


def test_flow_sampler_integrates_the_guided_velocity_from_noise_to_zero():
    """Euler steps from t = 1 to 0 with a velocity that is a for the empty prompt and b for the caption end at
    z0 - (a + g (b - a)): the grid's steps sum to -1, whatever its shift."""
    import types

    from gas_lightning.backbone import PromptEmbeddings
    from gas_lightning.worlds import flow_model

    a, b, g = 0.25, -0.5, 3.0

    class Stub:
        transformer = types.SimpleNamespace(config=types.SimpleNamespace(sample_size=2, in_channels=1))
        codec = types.SimpleNamespace(decode=lambda z: z)

        def time_grid(self, steps, hw):
            return torch.tensor([1.0, 0.9, 0.4, 0.1, 0.0])

        def null_embeddings(self):
            return PromptEmbeddings(torch.zeros(1, 1, 1), torch.zeros(1, 1))

        def encode_prompts(self, prompts):
            return PromptEmbeddings(torch.ones(len(prompts), 1, 1), torch.ones(len(prompts), 1))

        def velocity(self, z, t, cond):
            return torch.where(cond.hidden[:, :1, :1].view(-1, 1, 1, 1) > 0, b, a).expand_as(z)

    out = flow_model.sample_images(Stub(), ["x", "y"], steps=4, guidance=g, seed=0)
    z0 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    want = ((z0 - (a + g * (b - a))).clamp(-1, 1) + 1) * 127.5
    assert out.shape == (2, 2, 2, 1)
    assert torch.allclose(torch.from_numpy(out).float(), want.round().permute(0, 2, 3, 1), atol=1)


@pytest.fixture(scope="module")
def tiny_flow(tmp_path_factory):
    """A tiny random flow twin in the shipped SD3 layout (one transformer layer), VAE scaling_factor 0.7."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from gas_lightning.worlds import flow_model

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(str(MODEL_DIR / "tokenizer"))
    clip = flow_model.clip_with_projection(CLIPTextModel.from_pretrained(str(MODEL_DIR / "text_encoder")))
    folder = tmp_path_factory.mktemp("flow") / "model"
    return flow_model.save_folder(
        folder,
        tok,
        clip,
        flow_model.build_t5(len(tok)),
        flow_model.build_transformer(1, 2, 8),
        flow_model.build_flow_scheduler(),
        lm.build_vae((8, 8, 8, 8), scaling_factor=0.7),
    )


def test_eval_world_scores_flow_methods_on_the_twin(tiny_flow, tmp_path, capsys):
    """Plain FlowEdit and the grounded flow solver edit 128 px cases on an SD3-layout world model, one Trainer
    step per grid step; a DDS method on it is refused with the flag that fixes it."""
    ev = _tool("eval_world")
    out = tmp_path / "r.json"
    common = ["--model", str(tiny_flow), "--cases", "1", "--seed", "2", "--figure", str(tmp_path / "f.png")]
    flow = ["--flow_steps", "4", "--flow_n_max", "2"]
    assert ev.main([*common, *flow, "--methods", "flowedit,gas_flow_reference", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"flowedit", "gas_flow_reference"}
    # one case by hand: the Trainer runs the grid's n_max steps and the latent moves off the source's
    args = ev.parser().parse_args([*common, *flow])
    backbone = load_backbone(str(tiny_flow), device="cpu", attention="sdpa")
    case = ev.held_out_cases(1, seed=2, size=128)[0]
    module, callbacks = ev.case_module(backbone, case, ev.METHODS["flowedit"], args)
    ev.edit_case(backbone, case, ev.METHODS["flowedit"], args, ready=(module, callbacks))
    assert module.global_step == 2 and not torch.equal(module.latent.detach(), module.z_src)
    with pytest.raises(SystemExit):
        ev.main([*common, "--methods", "gas"])
    assert "gas need a UNet world model" in capsys.readouterr().err
