"""Train the latent-space shapes-world model (gas-lightning:shapes-latent) and its rectified-flow twin.

    nice -n 5 python tools/world/train_latent_world.py vae --out runs/latent_world --max-minutes 40
    nice -n 5 python tools/world/train_latent_world.py unet --out runs/latent_world --max-minutes 80
    python tools/world/train_latent_world.py unet --out runs/latent_world --resume runs/latent_world/unet/last.ckpt
    python tools/world/train_latent_world.py vae --out runs/latent_world/decoder --vae MODEL/vae --decoder-only
    python tools/world/train_latent_world.py unet --out runs/latent_world --unet SNAP --text SNAP --vae SNAP/vae
    python tools/world/train_latent_world.py flow --out runs/flow_world --vae SNAP/vae --text SNAP --max-minutes 90

Stage `vae` trains the AutoencoderKL on 128 px scenes (L1 + MSE, SD's KL weight 1e-6); every
--save-every steps its EMA weights, the held-out round-trip PSNR and the measured scaling_factor
(1 / std of the latents, as SD's was measured) are written to OUT/vae/ema-latest. Stage `unet`
freezes that VAE and trains the UNet (and fine-tunes the pixel world's CLIP text encoder) on its
scaled latents; every --save-every steps the EMA weights are written as a complete SD 1.x-layout
folder, OUT/unet/ema-latest, so a run stopped early still leaves a usable model. Both stages write
Lightning checkpoints (OUT/STAGE/last.ckpt, EMA state included) that --resume continues from.
--unet SNAP continues from a snapshot folder alone (results/latent_world/snapshot is the one kept
in the repository between sessions, whose run folders do not survive); its optimiser state starts afresh.
--decoder-only improves a VAE's decoder after the UNet is trained: the encoder, and so the
latents and the scaling_factor the UNet learnt, stay as they were.
Stage `flow` trains the rectified-flow twin (gas_lightning.worlds.flow_model: an SD3-layout folder) on
the same frozen VAE's latents with flow matching; its text encoders are the latent world's CLIP and a
fixed random T5, frozen; --transformer SNAP --text SNAP continues from a kept snapshot.
Data are generated on the fly (gas_lightning.worlds.scenes), so there is no dataset and no epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_world import SceneStream, ThreadTuner, cosine_factor, denoising_loss  # noqa: E402

from gas_lightning.worlds.latent_model import (  # noqa: E402
    IMAGE_SIZE,
    UNET_CHANNELS,
    build_scheduler,
    build_unet,
    build_vae,
    save_folder,
)
from gas_lightning.worlds.model import MODEL_DIR  # noqa: E402
from gas_lightning.worlds.scenes import render, sample_scene  # noqa: E402

HELD_OUT_SEED = 77  # scenes for the VAE's held-out PSNR (the training stream draws from [seed, worker])


def held_out_pixels(n: int = 64, size: int = IMAGE_SIZE) -> torch.Tensor:
    rng = np.random.default_rng(HELD_OUT_SEED)
    imgs = np.stack([render(sample_scene(rng, size)) for _ in range(n)]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def round_trip_psnr(vae, pixels: torch.Tensor) -> float:
    """Mean PSNR (dB) of uint8 decode(encode(x).mode()) against the uint8 scene, as an edit sees it."""
    vae = vae.eval()
    out = torch.cat([vae.decode(vae.encode(x).latent_dist.mode()).sample for x in pixels.split(16)])
    q = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round() / 255.0  # noqa: E731
    mse = (q(out) - q(pixels)).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((-10 * torch.log10(mse)).mean())


@torch.no_grad()
def latent_std(vae, pixels: torch.Tensor) -> float:
    """Std of the unscaled latent means over the images; scaling_factor = 1 / it."""
    z = torch.cat([vae.encode(x).latent_dist.mode() for x in pixels.split(16)])
    return float(z.std())


class Schedule:
    """Warm-up then cosine over steps or wall time (see train_world.cosine_factor)."""

    def __init__(self, warmup: int, max_steps: int, max_seconds: float):
        self.warmup, self.max_steps, self.max_seconds, self.t0 = warmup, max_steps, max_seconds, None

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        self.t0 = self.t0 or time.time()
        return cosine_factor(step, self.warmup, self.max_steps, time.time() - self.t0, self.max_seconds)


def random_crops(x: torch.Tensor, crop: int) -> torch.Tensor:
    """One random crop x crop window per image, on the 8-pixel grid the latent cells sit on."""
    if crop >= x.shape[-1]:
        return x
    cells = (x.shape[-1] - crop) // 8 + 1
    offs = torch.randint(0, cells, (x.shape[0], 2)) * 8
    return torch.stack([im[:, y : y + crop, c : c + crop] for im, (y, c) in zip(x, offs.tolist())])


class VaeStage(L.LightningModule):
    """The VAE is fully convolutional (no attention), so it learns on crops and runs on whole scenes.

    It decodes the posterior mean, the latent the editor encodes with: sampling (SD's way) starts
    with unit-variance noise on every latent, which a CPU run spends most of its steps unlearning.
    The KL term stays (SD's weight) and keeps the latents' scale in check.
    """

    def __init__(
        self, vae, lr: float, schedule: Schedule, kl_weight: float = 1e-6, crop: int = 64, measure_scale: bool = True
    ):
        super().__init__()
        self.vae, self.lr, self.schedule, self.kl_weight, self.crop = vae, lr, schedule, kl_weight, crop
        # --decoder-only keeps the scaling_factor a UNet learnt on, even where a re-measure would differ
        self.measure_scale = measure_scale

    def training_step(self, batch, batch_idx):
        x = random_crops(batch[0], self.crop)
        post = self.vae.encode(x).latent_dist
        y = self.vae.decode(post.mode()).sample
        l1, mse = (y - x).abs().mean(), (y - x).pow(2).mean()
        # SD's KL term: summed over latent cells per image, weight 1e-6 against a per-pixel sum.
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + mse + self.kl_weight * kl
        self.log_dict({"train/loss": loss, "train/l1": l1, "train/psnr": -10 * torch.log10(mse / 4)})
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.vae.parameters(), lr=self.lr, weight_decay=0.0)
        # A plain function, not the Schedule object: LambdaLR saves and restores an object's
        # attributes, which would bring back an old run's clock and budget on --resume.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.schedule(step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, folder: Path, held_out: torch.Tensor) -> dict:
        vae = self.vae
        std = latent_std(vae, held_out)
        if self.measure_scale:
            vae.register_to_config(scaling_factor=1.0 / std)
        stats = {
            "psnr_db": round_trip_psnr(vae, held_out),
            "latent_std": std,
            "scaling_factor": vae.config.scaling_factor,
        }
        vae.save_pretrained(folder, safe_serialization=True)
        (folder / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        vae.train()
        return stats


class LatentPool:
    """A ring of encoded scenes (scaled latent means, caption ids) that each step refreshes in part.

    Encoding 128 px scenes costs as much as the UNet step itself on a CPU; each scene stays in the
    pool for size / refresh steps and is drawn again with a fresh timestep and noise.
    """

    def __init__(self, size: int):
        self.size, self.filled, self.next = size, 0, 0
        self.z = self.ids = None

    def add(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        if self.z is None:
            self.z, self.ids = z.new_zeros((self.size, *z.shape[1:])), ids.new_zeros((self.size, *ids.shape[1:]))
        for zi, i in zip(z, ids):
            self.z[self.next], self.ids[self.next] = zi, i
            self.next, self.filled = (self.next + 1) % self.size, min(self.size, self.filled + 1)

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.randint(0, self.filled, (n,), device=self.z.device)
        return self.z[k], self.ids[k]


class UnetStage(L.LightningModule):
    def __init__(
        self,
        tokenizer,
        text_encoder,
        unet,
        vae,
        scheduler,
        lr: float,
        text_lr: float,
        schedule: Schedule,
        min_snr: float,
        batch_size: int,
        pool: int,
    ):
        super().__init__()
        self.tokenizer, self.noise_scheduler = tokenizer, scheduler
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae.requires_grad_(False).eval()
        self.lr, self.text_lr, self.schedule, self.min_snr = lr, text_lr, schedule, min_snr
        self.batch_size, self.pool = batch_size, LatentPool(pool)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)

    def training_step(self, batch, batch_idx):
        x, ids = batch
        with torch.no_grad():  # the posterior mean, as the VAE was trained and as the editor encodes
            self.pool.add(self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor, ids)
        z, ids = self.pool.draw(self.batch_size)
        loss, mse = denoising_loss(self.unet, self.text_encoder(ids)[0], self.alphas_cumprod, z, self.min_snr)
        self.log_dict({"train/loss": loss, "train/mse": mse})
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            [
                {"params": self.unet.parameters(), "lr": self.lr},
                {"params": self.text_encoder.parameters(), "lr": self.text_lr},
            ],
            weight_decay=0.01,
        )
        # A plain function, not the Schedule object: LambdaLR saves and restores an object's
        # attributes, which would bring back an old run's clock and budget on --resume.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.schedule(step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, folder: Path, held_out: torch.Tensor) -> dict:
        save_folder(folder, self.tokenizer, self.text_encoder, self.unet, self.noise_scheduler, self.vae)
        return {}


def flow_matching_loss(velocity, x0: torch.Tensor) -> torch.Tensor:
    """Rectified flow as SD3 trains it: z_t = (1 - t) x0 + t n, the target velocity n - x0, t drawn
    logit-normal (sigmoid of a standard normal: most samples at middle noise)."""
    b = x0.shape[0]
    t = torch.sigmoid(torch.randn(b, device=x0.device))
    noise = torch.randn_like(x0)
    tt = t.view(b, *([1] * (x0.dim() - 1)))
    return (velocity((1 - tt) * x0 + tt * noise, t) - (noise - x0)).pow(2).mean()


class FlowStage(L.LightningModule):
    """The flow twin's transformer on the frozen VAE's latents, conditioned through SD3Backbone itself
    (the same text path and velocity call an edit uses); the text encoders stay frozen."""

    def __init__(self, tokenizer, clip, t5, transformer, vae, scheduler, lr, schedule: Schedule, batch_size, pool):
        super().__init__()
        from gas_lightning.backbone import VaeCodec
        from gas_lightning.flow_backbone import SD3Backbone

        self.tokenizer, self.noise_scheduler, self.lr, self.schedule = tokenizer, scheduler, lr, schedule
        self.clip, self.t5 = clip.requires_grad_(False).eval(), t5.requires_grad_(False).eval()
        self.transformer, self.codec = transformer, VaeCodec(vae.requires_grad_(False).eval())
        self.batch_size, self.pool = batch_size, LatentPool(pool)
        self.backbone = SD3Backbone(
            transformer=transformer, codec=self.codec, scheduler=scheduler, source="training", offload_text=False,
            text_encoder=clip, tokenizer=tokenizer, text_encoder_2=clip, tokenizer_2=tokenizer,
            text_encoder_3=t5, tokenizer_3=tokenizer,
        )  # fmt: skip

    def training_step(self, batch, batch_idx):
        x, ids = batch
        self.pool.add(self.codec.encode(x), ids)
        z, ids = self.pool.draw(self.batch_size)
        cond = self.backbone.embed_ids(ids, ids, ids)
        loss = flow_matching_loss(lambda zt, t: self.backbone.velocity(zt, t, cond), z)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.transformer.parameters(), lr=self.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.schedule(step))  # see UnetStage
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, folder: Path, held_out: torch.Tensor) -> dict:
        from gas_lightning.worlds import flow_model

        vae = self.codec.vae
        flow_model.save_folder(folder, self.tokenizer, self.clip, self.t5, self.transformer, self.noise_scheduler, vae)
        return {}


class Snapshot(L.Callback):
    """Every `every` steps: print the mean loss, write the EMA weights to OUT/ema-latest."""

    def __init__(self, ema: EMAWeightAveraging, out: Path, every: int, held_out: int = 64):
        self.ema, self.out, self.every, self.t0 = ema, out, every, time.time()
        self.held_out = held_out_pixels(held_out)
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.losses = [*self.losses[-99:], outputs["loss"].detach()]
        minutes = (time.time() - self.t0) / 60
        if step % 50 == 0:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            print(
                f"[{minutes:.1f} min] step {step}: loss (mean of 100) {float(torch.stack(self.losses).mean()):.4f} "
                f"lr {lr:.2e}",
                flush=True,
            )
        if step % self.every == 0:
            self.save(step, minutes)

    def on_train_end(self, trainer, module):
        self.save(trainer.global_step, (time.time() - self.t0) / 60)

    def save(self, step: int, minutes: float) -> None:
        averaged = self.ema._average_model
        source = averaged.module if averaged is not None else None
        if source is None:
            return
        folder = self.out / "ema-latest"
        stats = source.export(folder, self.held_out)
        (folder / "progress.json").write_text(json.dumps({"step": step, "minutes": round(minutes, 1), **stats}) + "\n")
        print(f"[{minutes:.1f} min] step {step}: EMA saved to {folder} {stats}", flush=True)


def trained_steps(folder: str | Path | None) -> int:
    """UNet steps behind a kept snapshot, over every run that continued it (0 for none or a fresh start)."""
    progress = Path(folder) / "progress.json" if folder else None
    if progress is None or not progress.is_file():
        return 0
    p = json.loads(progress.read_text())
    return int(p.get("total_steps", p.get("step", 0)))


def keep_snapshot(snapshot: Path, dest: Path, prior_steps: int = 0, net: str = "unet") -> None:
    """Copy an ema-latest folder to `dest` with the denoiser's weights (`net`: unet/ or transformer/) in
    float16 (half the bytes): the copy kept in the repository between sessions, whose run folders do not
    survive. `--unet dest` (`--transformer dest`) reads it back in float32. Its progress.json adds
    `total_steps`: `prior_steps` (the runs it continued) + this run's."""
    import shutil

    import diffusers

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(snapshot, tmp)
    progress = json.loads((tmp / "progress.json").read_text())
    progress["total_steps"] = prior_steps + int(progress["step"])
    (tmp / "progress.json").write_text(json.dumps(progress) + "\n")
    cls = getattr(diffusers, json.loads((snapshot / net / "config.json").read_text())["_class_name"])
    model = cls.from_pretrained(str(snapshot / net), torch_dtype=torch.float32)
    shutil.rmtree(tmp / net)
    model.to(torch.float16).save_pretrained(str(tmp / net))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def resumed_minutes(ckpt: str | None) -> float:
    """Training minutes a checkpoint's Timer already counted (0 without one)."""
    if not ckpt:
        return 0.0
    state = torch.load(ckpt, map_location="cpu", weights_only=False).get("callbacks", {})
    timer = next((v for k, v in state.items() if k.startswith("Timer")), {})
    return timer.get("time_elapsed", {}).get("train", 0.0) / 60


def build_stage(args):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    schedule = Schedule(args.warmup, args.steps, 60 * (args.max_minutes - 1.0))
    if args.stage == "vae":
        vae = AutoencoderKL.from_pretrained(args.vae) if args.vae else build_vae()
        if args.decoder_only:  # the latents, and so a UNet trained on them, stay valid
            for part in (vae.encoder, vae.quant_conv):
                part.requires_grad_(False)
        return VaeStage(vae, args.lr, schedule, crop=args.crop, measure_scale=not args.decoder_only), None
    vae = AutoencoderKL.from_pretrained(args.vae or str(Path(args.out) / "vae" / "ema-latest"))
    tok = CLIPTokenizer.from_pretrained(str(Path(args.text) / "tokenizer"))
    if args.stage == "flow":
        return flow_stage(args, schedule, vae, tok), tok
    text = CLIPTextModel.from_pretrained(str(Path(args.text) / "text_encoder"))
    if args.unet:  # a saved snapshot's weights (its own widths); the optimiser state starts afresh
        unet = UNet2DConditionModel.from_pretrained(str(Path(args.unet) / "unet"), torch_dtype=torch.float32)
    else:
        unet = build_unet(tuple(int(c) for c in args.channels.split(",")))
    module = UnetStage(
        tok,
        text.train(),
        unet,
        vae,
        build_scheduler(),
        args.lr,
        args.text_lr,
        schedule,
        args.min_snr,
        args.batch_size,
        args.pool,
    )
    return module, tok


def flow_stage(args, schedule: Schedule, vae, tok) -> FlowStage:
    """The flow twin's stage: the text encoders from --text (the latent world's CLIP, or a flow snapshot's
    own), the transformer from --transformer (a snapshot) or new."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from gas_lightning.worlds import flow_model

    text = Path(args.text)
    if (text / "text_encoder_3").is_dir():  # an SD3-layout snapshot: its own (frozen) encoders
        clip = CLIPTextModelWithProjection.from_pretrained(str(text / "text_encoder"))
        t5 = T5EncoderModel.from_pretrained(str(text / "text_encoder_3"))
    else:
        clip = flow_model.clip_with_projection(CLIPTextModel.from_pretrained(str(text / "text_encoder")))
        t5 = flow_model.build_t5(len(tok))
    if args.transformer:
        path = str(Path(args.transformer) / "transformer")
        transformer = SD3Transformer2DModel.from_pretrained(path, torch_dtype=torch.float32)
    else:
        layers, heads, head_dim = (int(c) for c in args.transformer_size.split(","))
        transformer = flow_model.build_transformer(layers, heads, head_dim, clip.config.hidden_size)
    return FlowStage(
        tok,
        clip,
        t5,
        transformer,
        vae,
        flow_model.build_flow_scheduler(),
        args.lr,
        schedule,
        args.batch_size,
        args.pool,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=("vae", "unet", "flow"))
    ap.add_argument("--out", default="runs/latent_world", help="run folder; each stage writes OUT/STAGE/")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 8 (vae), 32 (unet)")
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3 (vae), 5e-4 (unet)")
    ap.add_argument("--text-lr", type=float, default=2e-4, help="unet stage: the text encoder's (fine-tuned) lr")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=None, help="EMA decay; default 0.995 (vae), 0.999 (unet)")
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--channels", default=",".join(map(str, UNET_CHANNELS)), help="unet stage: the UNet's block widths")
    ap.add_argument("--pool", type=int, default=512, help="unet and flow stages: encoded scenes kept and drawn from")
    ap.add_argument(
        "--refresh", type=int, default=8, help="unet and flow stages: new scenes encoded into the pool per step"
    )
    ap.add_argument(
        "--held-out", type=int, default=64, help="vae stage: scenes for the round-trip PSNR of each snapshot"
    )
    ap.add_argument(
        "--crop", type=int, default=64, help="vae stage: train on random crops this wide (a quarter of the cost)"
    )
    ap.add_argument(
        "--vae",
        default=None,
        help="unet and flow stages: the VAE folder (default OUT/vae/ema-latest); "
        "vae stage: start from this VAE instead of random weights",
    )
    ap.add_argument(
        "--decoder-only",
        action="store_true",
        help="vae stage: train the decoder alone (with --vae), so a UNet trained on the latents stays valid",
    )
    ap.add_argument(
        "--text",
        default=str(MODEL_DIR),
        help="unet and flow stages: the folder whose tokenizer/ and text_encoder/ start the run",
    )
    ap.add_argument(
        "--unet",
        default=None,
        help="unet stage: start from this SD-layout folder's unet/ weights (an ema-latest snapshot) instead of "
        "random ones; pass the same folder as --text and --vae FOLDER/vae to continue a run whose checkpoint is gone",
    )
    ap.add_argument(
        "--transformer",
        default=None,
        help="flow stage: start from this SD3-layout folder's transformer/ (a kept snapshot; pass it as --text too)",
    )
    ap.add_argument(
        "--transformer-size",
        default="6,4,32",
        help="flow stage: a new transformer's layers, heads and head width",
    )
    ap.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="unet and flow stages: after training, copy the EMA snapshot here with the UNet (transformer) in "
        "float16 (results/latent_world/snapshot, results/flow_world/snapshot: the copies the repository keeps "
        "between sessions)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument(
        "--max-minutes", type=float, default=60.0, help="wall-time budget: the lr decays and training stops by then"
    )
    ap.add_argument("--resume", default=None, help="a Lightning checkpoint (OUT/STAGE/last.ckpt) to continue from")
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args(argv)
    vae_stage = args.stage == "vae"
    args.batch_size = args.batch_size or (8 if vae_stage else 32)
    args.lr = args.lr or (1e-3 if vae_stage else 5e-4)
    decay = args.ema or (0.995 if vae_stage else 0.999)

    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)
    out = Path(args.out) / args.stage
    out.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")
    module, tok = build_stage(args)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    print(f"stage {args.stage}: {trainable / 1e6:.2f}M trainable parameters", flush=True)
    if tok is None:
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(Path(args.text) / "tokenizer"))
    ema = EMAWeightAveraging(decay=decay, update_starting_at_step=args.warmup)
    per_step = args.batch_size if vae_stage else args.refresh
    data = DataLoader(
        SceneStream(tok, per_step, args.seed, size=IMAGE_SIZE),
        batch_size=None,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        precision=args.precision,
        devices=1,
        max_steps=args.steps,
        # Lightning's Timer restores the time already spent; --max-minutes is this run's own budget.
        max_time={"minutes": args.max_minutes + resumed_minutes(args.resume)},
        logger=TensorBoardLogger(str(out), name="tb"),
        log_every_n_steps=25,
        gradient_clip_val=1.0,
        enable_progress_bar=False,
        callbacks=[
            ema,
            Snapshot(ema, out, args.save_every, args.held_out),
            ThreadTuner(args.threads),
            ModelCheckpoint(dirpath=str(out), save_last=True, every_n_train_steps=args.save_every, save_top_k=0),
        ],
    )
    t0 = time.time()
    prior = trained_steps(
        args.transformer if args.stage == "flow" else args.unet
    )  # read before --keep may overwrite that folder
    trainer.fit(module, data, ckpt_path=args.resume)
    print(
        f"done: {trainer.global_step} steps in {(time.time() - t0) / 60:.1f} min; EMA in {out / 'ema-latest'}",
        flush=True,
    )
    if args.keep is not None and not vae_stage:
        net = "transformer" if args.stage == "flow" else "unet"
        keep_snapshot(out / "ema-latest", args.keep, prior, net)
        print(f"kept: {args.keep}", flush=True)


if __name__ == "__main__":
    main()
