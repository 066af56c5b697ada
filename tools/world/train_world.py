"""Train the bundled shapes-world text-to-image model (pixel space, 32x32), on CPU or a GPU.

    python tools/world/train_world.py --steps 3600 --out runs/world                      # 2 CPU cores
    python tools/world/train_world.py --steps 200000 --max-minutes 6.5 --batch-size 256 --workers 6 \
        --warmup 500 --lr 2e-3 --text-lr 3e-3 --channels 40,80,80 --out runs/gB    # one GPU (shipped)

Data are generated on the fly (gas_lightning.worlds.scenes), so there is no dataset to
download and no epoch. The shipped weights are the EMA weights, written as a diffusers-format
folder (see gas_lightning.worlds.model). Intermediate EMA folders are written every
--save-every steps so that a run stopped early still leaves a usable model.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, IterableDataset

from gas_lightning.worlds.model import build_all, save_folder
from gas_lightning.worlds.scenes import DEFAULT_SIZE, render, sample_scene, training_caption


class SceneStream(IterableDataset):
    """Endless batches (images in [-1, 1], token ids) drawn from a seeded generator."""

    def __init__(self, tokenizer, batch_size: int, seed: int, size: int = DEFAULT_SIZE):
        self.tok, self.batch_size, self.seed, self.size = tokenizer, batch_size, seed, size
        self._ids: dict[str, torch.Tensor] = {}

    def ids(self, caption: str) -> torch.Tensor:
        if caption not in self._ids:
            self._ids[caption] = self.tok(
                caption,
                padding="max_length",
                max_length=self.tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids[0]
        return self._ids[caption]

    def __iter__(self):
        # Each DataLoader worker draws its own stream (same seed in every worker would repeat batches).
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info is not None else 0])
        while True:
            scenes = [sample_scene(rng, self.size) for _ in range(self.batch_size)]
            imgs = np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
            pixels = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
            ids = torch.stack([self.ids(training_caption(s, rng)) for s in scenes])
            yield pixels, ids


def cosine_factor(step: int, warmup: int, max_steps: int, elapsed: float, max_seconds: float) -> float:
    """Cosine decay to 5% of the learning rate after warm-up.

    Progress is steps or wall time, whichever is further along: on a shared CPU the run still
    ends inside its time budget with a fully decayed learning rate.
    """
    p = max((step - warmup) / max(1, max_steps - warmup), elapsed / max_seconds)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def denoising_loss(unet, cond: torch.Tensor, alphas_cumprod: torch.Tensor, x0: torch.Tensor, min_snr: float):
    """Epsilon-prediction DDPM loss with Min-SNR weighting; (weighted loss, plain MSE)."""
    b = x0.shape[0]
    t = torch.randint(0, alphas_cumprod.numel(), (b,), device=x0.device)
    noise = torch.randn_like(x0)
    ab = alphas_cumprod[t].view(b, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    pred = unet(xt, t, encoder_hidden_states=cond).sample
    per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    # Min-SNR weighting: stop the many easy low-noise steps from dominating; colours and
    # layout are decided at high noise.
    snr = ab.view(b) / (1 - ab.view(b))
    weight = torch.clamp(snr, max=min_snr) / snr
    return (weight * per).mean(), per.mean()


class WorldDiffusion(L.LightningModule):
    """Epsilon-prediction DDPM training of UNet + CLIP text encoder, with an EMA copy."""

    def __init__(
        self,
        tokenizer,
        text_encoder,
        unet,
        scheduler,
        lr: float,
        text_lr: float,
        warmup: int,
        max_steps: int,
        ema_decay: float,
        min_snr: float,
        max_seconds: float = float("inf"),
    ):
        super().__init__()
        self.max_seconds, self.t_start = max_seconds, None
        self.tokenizer, self.noise_scheduler = tokenizer, scheduler
        self.text_encoder, self.unet = text_encoder, unet
        self.ema_text = [p.detach().clone() for p in text_encoder.parameters()]
        self.ema_unet = [p.detach().clone() for p in unet.parameters()]
        self.lr, self.text_lr, self.warmup, self.max_steps = lr, text_lr, warmup, max_steps
        self.ema_decay, self.min_snr = ema_decay, min_snr
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)

    def training_step(self, batch, batch_idx):
        x0, ids = batch
        loss, mse = denoising_loss(self.unet, self.text_encoder(ids)[0], self.alphas_cumprod, x0, self.min_snr)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/mse", mse)
        return loss

    def on_fit_start(self):
        self.ema_text = [e.to(self.device) for e in self.ema_text]
        self.ema_unet = [e.to(self.device) for e in self.ema_unet]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        n = self.global_step
        d = min(self.ema_decay, (1 + n) / (10 + n))
        with torch.no_grad():
            for ema, mod in ((self.ema_text, self.text_encoder), (self.ema_unet, self.unet)):
                # One fused update per model: on a GPU a per-tensor loop is launch-bound.
                torch._foreach_lerp_(ema, [p.detach() for p in mod.parameters()], 1 - d)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            [
                {"params": self.unet.parameters(), "lr": self.lr},
                {"params": self.text_encoder.parameters(), "lr": self.text_lr},
            ],
            weight_decay=0.01,
        )

        def factor(step: int) -> float:
            if step < self.warmup:
                return (step + 1) / self.warmup
            if self.t_start is None:
                self.t_start = time.time()
            return cosine_factor(step, self.warmup, self.max_steps, time.time() - self.t_start, self.max_seconds)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def save_ema(self, folder: Path) -> None:
        """Write the EMA weights as the diffusers-format model folder."""
        import copy

        text, unet = copy.deepcopy(self.text_encoder), copy.deepcopy(self.unet)
        with torch.no_grad():
            for ema, mod in ((self.ema_text, text), (self.ema_unet, unet)):
                for e, p in zip(ema, mod.parameters()):
                    p.copy_(e)
        save_folder(folder, self.tokenizer, text.eval().cpu(), unet.eval().cpu(), self.noise_scheduler)


class ThreadTuner(L.Callback):
    """Every `period` steps, time 10 steps with 1 thread and 10 with `max_threads`; keep the faster.

    On a CPU shared with other jobs, two OpenMP threads often lose to one (each op waits for
    the slower, preempted thread); on an idle CPU two win. The load changes, so re-measure.
    """

    def __init__(self, max_threads: int, period: int = 200, probe: int = 10):
        self.max_threads, self.period, self.probe = max_threads, period, probe
        self.t_mark, self.times = 0.0, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.max_threads < 2 or module.device.type != "cpu":  # on a GPU host threads do not set the pace
            return
        phase = trainer.global_step % self.period
        if phase == 0:
            torch.set_num_threads(1)
            self.t_mark = time.perf_counter()
        elif phase == self.probe:
            self.times[1] = time.perf_counter() - self.t_mark
            torch.set_num_threads(self.max_threads)
            self.t_mark = time.perf_counter()
        elif phase == 2 * self.probe:
            self.times[2] = time.perf_counter() - self.t_mark
            best = 1 if self.times[1] < self.times[2] else self.max_threads
            torch.set_num_threads(best)
            print(
                f"threads: 1 -> {self.times[1] / self.probe:.2f} s/step, {self.max_threads} -> "
                f"{self.times[2] / self.probe:.2f} s/step; using {best}",
                flush=True,
            )


class SaveEMA(L.Callback):
    def __init__(self, out: Path, every: int):
        self.out, self.every, self.t0 = out, every, time.time()
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.losses.append(outputs["loss"].detach())  # no float(): a GPU sync per step
        self.losses = self.losses[-100:]
        if step % 50 == 0:
            mean = float(torch.stack(self.losses).mean())
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            print(
                f"[{(time.time() - self.t0) / 60:.1f} min] step {step}: loss (mean of 100) {mean:.4f} lr {lr:.2e}",
                flush=True,
            )
        if step % self.every == 0:
            module.save_ema(self.out / "ema-latest")
            print(
                f"[{(time.time() - self.t0) / 60:.1f} min] step {step}: saved EMA to {self.out / 'ema-latest'}",
                flush=True,
            )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/world", help="run folder: TensorBoard logs, EMA folders, final model")
    ap.add_argument("--steps", type=int, default=3600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--text-lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=85.0,
        help="wall-time budget: the lr schedule ends and training stops by then",
    )
    ap.add_argument(
        "--init", default=None, help="start from this model folder (continue a run) instead of random weights"
    )
    ap.add_argument("--export", default=None, help="also copy the final model folder here (e.g. the package assets)")
    ap.add_argument(
        "--channels", default="32,64,64", help="UNet block widths (the shipped GPU-trained model: 40,80,80)"
    )
    ap.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto picks a GPU when there is one")
    ap.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes rendering scenes")
    args = ap.parse_args(argv)
    channels = tuple(int(c) for c in args.channels.split(","))

    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")  # TF32 on GPUs that have it; no effect on CPU
    tok, text, unet, sched = build_all(out / "tokenizer-src", channels)
    if args.init:
        from gas_lightning.worlds.model import load_folder

        tok, text, unet, _ = load_folder(args.init)
        text.train()
        unet.train()
        print(f"continuing from {args.init}", flush=True)
    print(
        f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
        f"text encoder {sum(p.numel() for p in text.parameters()) / 1e6:.2f}M",
        flush=True,
    )
    module = WorldDiffusion(
        tok,
        text,
        unet,
        sched,
        args.lr,
        args.text_lr,
        args.warmup,
        args.steps,
        args.ema,
        args.min_snr,
        max_seconds=60 * (args.max_minutes - 1.0),
    )
    data = DataLoader(
        SceneStream(tok, args.batch_size, args.seed),
        batch_size=None,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        precision=args.precision,
        devices=1,
        max_steps=args.steps,
        max_time={"minutes": args.max_minutes},
        logger=TensorBoardLogger(str(out), name="tb"),
        log_every_n_steps=25,
        enable_checkpointing=False,
        gradient_clip_val=1.0,
        callbacks=[SaveEMA(out, args.save_every), ThreadTuner(args.threads)],
        enable_progress_bar=False,
    )
    t0 = time.time()
    trainer.fit(module, data)
    minutes = (time.time() - t0) / 60
    final = out / "model"
    module.save_ema(final)
    loss = trainer.callback_metrics.get("train/loss")
    device = trainer.strategy.root_device
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}", flush=True)
    print(
        f"done: {trainer.global_step} steps in {minutes:.1f} min, last loss {float(loss) if loss is not None else float('nan'):.4f}; "
        f"model in {final}",
        flush=True,
    )
    if args.export:
        dst = Path(args.export)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(final, dst)
        print(f"exported to {dst}", flush=True)


if __name__ == "__main__":
    main()
