"""tools/bench/benchmark.py and the host-synchronisation-free step it measures.

No timing is asserted: the benchmark's numbers are reported, not tested. What is tested is what
they stand on: the counted UNet calls, the JSON it writes, the architectures it builds, the GPU
script's commands, and that a step never reads a step tensor on the host outside logging steps.
"""

import json
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from gas_lightning.callbacks import NullTextPenalty
from gas_lightning.errors import GasError
from gas_lightning.guidance import GuidanceConfig
from gas_lightning.pipeline import build_edit
from gas_lightning.plan import EditPlan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
import benchmark  # noqa: E402

PLAN = EditPlan.from_lists(["a dog", "grass"], ["a cat", "snow"], boxes=[[0.1, 0.1, 0.4, 0.4], [0, 0.5, 1, 1]])
KEYS = {"s_per_step", "unet_calls_per_step", "unet_samples_per_step", "peak_mem_mb"}


def run_benchmark(tmp_path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    code = benchmark.main(
        [*args, "--steps", "2", "--warmup", "1", "--repeats", "1", "--threads", "0", "--json", str(out)]
    )
    assert code == 0
    return json.loads(out.read_text())


def test_json_and_counted_unet_calls(tiny_sd, tmp_path):
    r = run_benchmark(tmp_path, "--model", tiny_sd, "--subtasks", "2")
    assert KEYS <= set(r["sequential"]) and KEYS <= set(r["batched"])
    assert {"ratio", "device", "dtype", "attention", "compile"} <= set(r)
    assert r["ratio"] == pytest.approx(r["sequential"]["s_per_step"] / r["batched"]["s_per_step"])
    assert (r["device"], r["dtype"], r["compile"]) == ("cpu", "float32", False)
    # 2 subtasks + the whole-scene term (full_prompt is on by default) = 3 terms
    terms = 3
    assert r["batched"]["unet_calls_per_step"] == 1  # [null src, null tgt, 3 x src, 3 x tgt]
    assert r["batched"]["unet_samples_per_step"] == 2 + 2 * terms
    assert r["sequential"]["unet_calls_per_step"] == terms  # one call per term ...
    assert r["sequential"]["unet_samples_per_step"] == 4 * terms  # ... of [null src, null tgt, src, tgt]
    assert r["batched"]["peak_mem_mb"] > 0


def test_keep_aware_sampling_is_timed_with_its_own_samples(tiny_sd, tmp_path):
    """The shapes preset's sampling: every term its own [null src, null tgt, src, tgt], still one call."""
    r = run_benchmark(
        tmp_path, "--model", tiny_sd, "--subtasks", "2", "--batched_noise", "keep_aware", "--schedules", "batched"
    )
    assert r["batched_noise"] == "keep_aware"
    assert r["batched"]["unet_calls_per_step"] == 1
    assert r["batched"]["unet_samples_per_step"] == 4 * 3  # 3 terms, as the sequential schedule's samples
    # a kept object shares the draw of the edit around it, and so its null-text pair: 4 x 4 terms - 2
    r = run_benchmark(tmp_path, "--model", tiny_sd, "--subtasks", "2", "--keep", "1", "--batched_noise", "keep_aware")
    assert r["keep"] == 1 and r["batched"]["unet_calls_per_step"] == 1
    assert r["batched"]["unet_samples_per_step"] == 4 * 4 - 2
    assert r["sequential"]["unet_samples_per_step"] == 4 * 4


def test_reduced_sd15_architecture(tmp_path):
    from gas_lightning.testing import build_arch_backbone

    bb = build_arch_backbone("sd15", width_mult=0.1)
    cfg = bb.unet.config
    assert tuple(cfg.block_out_channels) == (32, 64, 128, 128)  # 320, 640, 1280, 1280 x 0.1, multiples of 32
    assert tuple(cfg.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert (cfg.layers_per_block, cfg.cross_attention_dim, cfg.sample_size) == (2, 768, 64)
    assert (bb.text_encoder.config.hidden_size, bb.text_encoder.config.num_hidden_layers) == (768, 12)
    assert (bb.codec.downscale, bb.prediction_type, bb.default_resolution) == (8, "epsilon", 512)
    emb = bb.encode_prompts(["a cat"])
    assert emb.hidden.shape == (1, 77, 768) and emb.pooled is None
    eps = bb.predict_eps(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), emb.expand(2))
    assert eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()


def test_reduced_sdxl_architecture(monkeypatch):
    from gas_lightning.backbone import SDXLBackbone
    from gas_lightning.testing import ARCHITECTURES, build_arch_backbone

    for encoder in ("text", "text_2"):  # two layers each: the assembly is under test, not the encoders' depth
        monkeypatch.setitem(ARCHITECTURES["sdxl"], encoder, {**ARCHITECTURES["sdxl"][encoder], "num_hidden_layers": 2})
    bb = build_arch_backbone("sdxl", width_mult=0.1)
    cfg = bb.unet.config
    assert isinstance(bb, SDXLBackbone)
    assert tuple(cfg.block_out_channels) == (32, 64, 128) and tuple(cfg.transformer_layers_per_block) == (1, 2, 10)
    assert (cfg.cross_attention_dim, cfg.addition_embed_type, bb.default_resolution) == (2048, "text_time", 1024)
    emb = bb.encode_prompts(["a cat", "a dog"])
    assert emb.hidden.shape == (2, 77, 768 + 1280) and emb.pooled.shape == (2, 1280)  # CLIP-L + bigG; bigG's pooled
    eps = bb.predict_eps(torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), emb)
    assert eps.shape == (2, 4, 16, 16) and torch.isfinite(eps).all()


def test_bad_benchmark_input_is_one_clear_error():
    with pytest.raises(GasError, match="width_mult"):
        benchmark.main(["--arch", "sd15", "--width_mult", "2"])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench" / "benchmark.py"), "--subtasks", "9"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "--subtasks" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_script_commands_parse():
    script = ROOT / "tools" / "bench" / "gpu_bench.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    lines = [
        line
        for line in script.read_text().splitlines()
        if "tools/bench/benchmark.py" in line and not line.lstrip().startswith("#")
    ]
    assert len(lines) >= 8  # both dtypes x with/without compile x with/without low_memory
    seen, noise = set(), set()
    for line in lines:
        words = shlex.split(line.replace('"$OUT', '"out'))
        args = benchmark.build_parser().parse_args(words[words.index("tools/bench/benchmark.py") + 1 :])
        assert (args.arch, args.resolution) in {("sd15", 512), ("sdxl", 1024)}
        assert args.subtasks == 3 and args.device == "cuda" and args.json.parent == Path("out")
        seen.add((args.arch, args.dtype, args.compile, args.low_memory))
        noise.add(args.batched_noise)
    assert {("sd15", d, c, m) for d in ("float16", "bfloat16") for c in (False, True) for m in (False, True)} <= seen
    assert {("sdxl", "float16", False, m) for m in (False, True)} <= seen
    assert noise == {"shared", "keep_aware"}  # the SD configs' sampling and the shapes preset's


# No host synchronisation inside a step ---------------------------------------------------------
# A CPU has no queue to stall, so what is checked is the cause: reading a tensor computed from the
# latent on the host (item, float, bool, tolist, a copy to the CPU, a data-dependent shape). Every
# tensor computed from the latent or the source latent is marked; a read of a marked tensor outside
# a logging step is a stall on a GPU. A copy to the CPU made on a logging step is a host tensor.

READS = {
    torch.Tensor.item,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.masked_select,
    torch.Tensor.masked_select,
}


class StepTensorReads(TorchFunctionMode):
    """Marks every tensor computed from a marked one; records host reads of marked tensors by step."""

    def __init__(self):
        super().__init__()
        self.step = None
        self.reads: dict[int, list[str]] = {}

    @staticmethod
    def mark(t: torch.Tensor) -> None:
        t._gas_step_tensor = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        marked = any(getattr(x, "_gas_step_tensor", False) for x in inputs)
        to_cpu = func is torch.Tensor.to and any(str(a) == "cpu" for a in tree_flatten((args[1:], kwargs))[0])
        bool_index = func is torch.Tensor.__getitem__ and any(x.dtype == torch.bool for x in inputs[1:])
        if marked and self.step is not None and (func in READS or to_cpu or bool_index):
            self.reads.setdefault(self.step, []).append(getattr(func, "__name__", str(func)))
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu or to_cpu:
            return out.detach()  # a host copy (on the CPU .cpu() returns the tensor itself: unmark a new view)
        if marked:
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor):
                    self.mark(x)
        return out


class _StepMarker(Callback):
    def __init__(self, mode: StepTensorReads):
        self.mode = mode

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode.step = batch_idx

    def on_train_end(self, trainer, pl_module):
        self.mode.step = None


@pytest.mark.parametrize(
    "schedule,sampling", [("batched", "shared"), ("batched", "keep_aware"), ("sequential", "shared")]
)
def test_no_host_read_of_step_tensors_outside_logging_steps(backbone, schedule, sampling, tmp_path):
    plan = (
        PLAN
        if sampling == "shared"
        else PLAN.replace_subtasks(
            [*PLAN.subtasks, replace(PLAN.subtasks[0], source="a bird", target="a bird", box=(0.6, 0.6, 0.9, 0.9))]
        )
    )
    module = build_edit(
        backbone, Image.new("RGB", (32, 32)), plan, GuidanceConfig(batched_noise=sampling), schedule=schedule
    )
    mode = StepTensorReads()
    mode.mark(module.latent)
    mode.mark(module.z_src)
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        log_every_n_steps=3,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
        callbacks=[NullTextPenalty(area_threshold=1.0), _StepMarker(mode)],
    )  # penalty on: gamma computed
    with mode:
        trainer.fit(module)
    # Lightning writes metrics after steps 3 and 6 (batch indices 2 and 5): reads there, none elsewhere
    assert set(mode.reads) == {2, 5}, mode.reads
    # read when written: the gradient norms of the 3 terms and the gammas of the 2 penalised subtasks
    assert mode.reads[2].count("item") >= 3 + 2


def test_logged_values_are_those_of_logging_every_step(backbone, tmp_path):
    """Skipping the non-logging steps' self.log changes nothing that is written."""
    rows = {}
    for every in (1, 3):
        module = build_edit(backbone, Image.new("RGB", (32, 32)), PLAN, schedule="batched")
        logger = CSVLogger(tmp_path, name=f"every{every}")
        L.Trainer(
            max_steps=6,
            accelerator="cpu",
            log_every_n_steps=every,
            logger=logger,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            callbacks=[NullTextPenalty(area_threshold=1.0)],
        ).fit(module)
        import csv

        with open(Path(logger.log_dir) / "metrics.csv") as f:
            rows[every] = {int(r["step"]): r for r in csv.DictReader(f)}
    assert sorted(rows[3]) == [2, 5]
    for step, row in rows[3].items():
        gammas = [k for k in row if k.endswith("/gamma")]
        assert gammas and all(row[k] == rows[1][step][k] for k in row)
        assert any(float(row[k]) < 1 for k in gammas)  # the penalty ran: a value that is not the default


def test_readme_benchmark_commands_parse():
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "speed.md").read_text()  # the section moved there
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("python tools/bench/benchmark.py")]
    assert len(lines) >= 3
    for line in lines:
        benchmark.build_parser().parse_args(shlex.split(line, comments=True)[2:])


def test_16_mixed_on_the_cpu_is_run_and_reported_as_32_true(tiny_sd, tmp_path):
    """As gas-edit runs it: Lightning would otherwise time bf16-mixed under the name 16-mixed."""
    r = run_benchmark(
        tmp_path, "--model", tiny_sd, "--subtasks", "1", "--precision", "16-mixed", "--schedules", "batched"
    )
    assert r["precision"] == "32-true"
