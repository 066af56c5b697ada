"""--low_memory: micro-batched UNet calls give the one call's result; encoders wait on the CPU.

Tolerance of the micro-batch comparisons: in eval mode every layer of the UNet treats each sample
alone (GroupNorm over one sample's channels, attention within one sample, convolutions and linear
layers row by row), so slicing the batch changes only which float32 kernels (blocking, vector
width) the library picks for a batch size. Rounding is absolute, on the scale of the whole
computation, so the allowance is too: 1e-5 of the largest prediction (1.75 on the tiny model, so
1.75e-5), against an observed largest difference of 1.2e-6 (15x below); one sample given its
neighbour's text differs by 4e-2 (2000x above). A step's gradient subtracts
two guided predictions (x7.5), which magnifies that rounding: compared at 1e-4 of its largest
entry, observed 1.1e-5; the preserve-form (CDS) gradient alone came out identical.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gas_lightning.backbone import visiting
from gas_lightning.guidance import GroundedScoreGuidance, GuidanceConfig, Term
from gas_lightning.loading import load_backbone
from gas_lightning.masks import subtask_masks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
import benchmark  # noqa: E402


def assert_close_at_scale(got: torch.Tensor, want: torch.Tensor, fraction: float) -> None:
    """Equal up to `fraction` of the largest entry of `want` (see the module docstring)."""
    scale = float(want.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=0, atol=fraction * scale)


@pytest.fixture(scope="module")
def sliced(tiny_sd):
    """The same weights as the `backbone` fixture, UNet calls of at most 2 samples."""
    return load_backbone(tiny_sd, attention="sdpa", micro_batch=2)


def test_micro_batched_call_equals_one_call(backbone, sliced):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 4, 16, 16, generator=gen)
    t = torch.tensor([50, 120, 300, 460, 610, 700, 949])
    emb = backbone.encode_prompts([f"prompt {k}" for k in range(7)])  # every sample its own text
    calls = []
    real = sliced.unet.forward
    sliced.unet.forward = lambda *a, **k: (calls.append(a[0].shape[0]), real(*a, **k))[1]
    try:
        got = sliced.predict_eps(z, t, emb)
    finally:
        sliced.unet.forward = real
    assert calls == [2, 2, 2, 1]
    want = backbone.predict_eps(z, t, emb)
    assert_close_at_scale(got, want, 1e-5)
    # each slice really is its own samples: sample 4 alone, through the whole-batch path
    assert_close_at_scale(got[4:5], backbone.predict_eps(z[4:5], t[4:5], emb[4:5]), 1e-5)


@pytest.mark.parametrize("batched_noise,weight", [("shared", 1.0), ("per_term", 1.0), ("shared", 0.0)])
def test_low_memory_step_gradient_equals_one_call(backbone, sliced, batched_noise, weight):
    """A whole batched step, preserve-form (CDS: 3 terms, in calls of 2 and 1) included; weight 0
    leaves the CDS gradient alone (it is ~1e-4 of the DDS gradient, below the tolerance beside it)."""
    gen = torch.Generator().manual_seed(1)
    z_src = torch.randn(1, 4, 16, 16, generator=gen)
    z = z_src + 0.1 * torch.randn(z_src.shape, generator=gen)
    boxes = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.6), (0.2, 0.4, 0.9, 1.0)]
    masks = subtask_masks(boxes, 16, 16)
    emb = backbone.encode_prompts(["a dog", "a cat", "grass", "snow", "a house", "an igloo"])
    terms = [
        Term(
            name=f"t{k}",
            src_emb=emb[2 * k : 2 * k + 1],
            tgt_emb=emb[2 * k + 1 : 2 * k + 2],
            mask=masks[k],
            weight=weight,
            penalty=k == 0,
            preserve_form=True,
            box=boxes[k],
        )
        for k in range(3)
    ]
    if batched_noise == "shared":
        t, eps = 400, torch.randn(z.shape, generator=gen)
    else:
        t, eps = [100, 400, 800], [torch.randn(z.shape, generator=gen) for _ in range(3)]
    out = {}
    for name, bb in (("one call", backbone), ("sliced", sliced)):
        guidance = GroundedScoreGuidance(bb, GuidanceConfig(batched_noise=batched_noise))
        out[name] = guidance.batched_gradient(z, z_src, terms, t, eps, torch.Generator().manual_seed(2))
    (g_one, logs_one), (g_sliced, logs_sliced) = out["one call"], out["sliced"]
    assert_close_at_scale(g_sliced, g_one, 1e-4)
    for a, b in zip(logs_sliced, logs_one):
        assert a.gamma == pytest.approx(b.gamma, rel=1e-5)
        assert (a.cds_loss is None) == (b.cds_loss is None)
        if a.cds_loss is not None:
            assert a.cds_loss == pytest.approx(b.cds_loss, rel=1e-5)


def test_benchmark_counts_micro_batched_calls(tiny_sd, tmp_path):
    out = tmp_path / "b.json"
    benchmark.main(
        [
            "--model",
            tiny_sd,
            "--subtasks",
            "2",
            "--low_memory",
            "true",
            "--micro_batch",
            "3",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--threads",
            "0",
            "--json",
            str(out),
        ]
    )
    r = json.loads(out.read_text())
    # 3 terms. batched: 2 + 2 x 3 = 8 samples in calls of 3, 3, 2; sequential: 3 x 4 samples, each 3 + 1
    assert (r["batched"]["unet_calls_per_step"], r["batched"]["unet_samples_per_step"]) == (3, 8)
    assert (r["sequential"]["unet_calls_per_step"], r["sequential"]["unet_samples_per_step"]) == (6, 12)
    assert r["low_memory"] is True and r["micro_batch"] == 3


class _Recorder(nn.Linear):
    def __init__(self):
        super().__init__(1, 1)
        self.moves = []

    def to(self, device):
        self.moves.append(str(device))
        return self


def test_visiting_moves_there_and_back_only_when_offloaded():
    net = _Recorder()
    with visiting(net, torch.device("meta"), offloaded=True):
        assert net.moves == ["meta"]
    assert net.moves == ["meta", "cpu"]
    with pytest.raises(RuntimeError), visiting(net, torch.device("meta"), offloaded=True):
        raise RuntimeError("the call failed")
    assert net.moves[-1] == "cpu"  # back on the CPU even so
    net.moves.clear()
    with visiting(net, torch.device("meta"), offloaded=False), visiting(net, torch.device("cpu"), offloaded=True):
        pass
    assert net.moves == []  # not offloaded, or already on the CPU: nothing moves


def test_low_memory_keeps_text_encoder_and_vae_on_the_cpu(tiny_sd):
    bb = load_backbone(tiny_sd, attention="sdpa", low_memory=True)
    assert (bb.micro_batch, bb.offload, bb.codec.offloaded) == (4, True, True)  # 4: the sequential call's size
    bb.to("meta")  # stands in for an accelerator: only the UNet and the schedule constants go there
    assert next(bb.unet.parameters()).device.type == "meta" and bb.alphas_cumprod.device.type == "meta"
    assert next(bb.text_encoder.parameters()).device.type == "cpu"
    assert next(bb.codec.parameters()).device.type == "cpu"


def test_gas_edit_low_memory_flags_reach_the_unet(tiny_sd, image_file, tmp_path, monkeypatch):
    """gas-edit --low_memory true --micro_batch 3: every UNet call of the edit has at most 3 samples."""
    from diffusers import UNet2DConditionModel

    from gas_lightning.cli import main

    sizes = []
    real = UNet2DConditionModel.forward
    monkeypatch.setattr(
        UNet2DConditionModel, "forward", lambda self, x, *a, **k: (sizes.append(x.shape[0]), real(self, x, *a, **k))[1]
    )
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--model",
                tiny_sd,
                "--image",
                image_file,
                "--request",
                "change the red block into a yellow block. change the grass into snow.",
                "--boxes",
                "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]]",
                "--output_dir",
                str(tmp_path / "out"),
                "--trainer.max_steps",
                "2",
                "--low_memory",
                "true",
                "--micro_batch",
                "3",
            ]
        )
    assert exit_info.value.code == 0
    # configs/tiny.yaml: batched, whole-scene term on -> 3 terms, 2 + 2 x 3 = 8 samples a step: 3, 3, 2
    assert sizes[:3] == [3, 3, 2] and max(sizes) == 3
