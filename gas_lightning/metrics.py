"""Per-edit metrics: how much of what should not change did change, and how well the edit reads.

"Outside the boxes" is exact and the same for every metric: each box of a subtask that changes
something (keep subtasks and intensity 0 excluded) is rasterised on the image's pixel grid
(`masks.box_cover`: a pixel the box partly covers is inside), and
the outside is every pixel in no such box.

- `psnr_outside`: torchmetrics PSNR (data range 1) over the outside pixels only, all three channels
  (the mean squared error of those pixels alone); 100 dB when they are identical, None without any.
- `ssim_outside`: torchmetrics SSIM's per-pixel map (`return_full_image`, 11x11 Gaussian window,
  sigma 1.5, reflect padding) averaged over the outside pixels and channels. A pixel near a box
  sees some of it through its window.
- `lpips_outside`: torchmetrics LPIPS between the source and the edited image with the boxes'
  pixels copied from the source, so only the outside can differ (LPIPS averages over the whole
  image, so it is diluted by the boxes' area). Needs the torchvision backbone weights on disk.
- `clip_score`: torchmetrics CLIPScore of the edited image against the plan's target prompt,
  from a local CLIP folder.

Nothing is downloaded: a weight that is not where the user said is a GasError naming the file.
torchmetrics metric objects are told not to synchronise across processes, because the batch runner
computes them in each of its processes at different times.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gas_lightning.errors import GasError
from gas_lightning.masks import box_cover
from gas_lightning.plan import WHOLE_IMAGE

if TYPE_CHECKING:
    from PIL import Image

    from gas_lightning.plan import EditPlan

MAX_PSNR = 100.0  # identical pixels: PSNR is infinite, which JSON cannot hold
LPIPS_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


@dataclass
class MetricsSpec:
    """Optional learned metrics, each from local weights (`--metrics.clip`, `--metrics.lpips`)."""

    clip: str | None = None  # a CLIP folder (CLIPModel + CLIPProcessor, save_pretrained layout)
    lpips: str | None = None  # the torchvision backbone file for LPIPS (e.g. alexnet-owt-7be5be79.pth) or its folder
    lpips_net: str = "alex"  # alex | vgg | squeeze

    def __post_init__(self) -> None:
        if self.lpips_net not in LPIPS_WEIGHTS:
            raise GasError(f"--metrics.lpips_net must be one of {', '.join(LPIPS_WEIGHTS)}, got {self.lpips_net!r}")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> (1, 3, H, W) float in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def edited_boxes(plan: EditPlan) -> list:
    """The boxes of the subtasks that change something (a missing box is the whole image)."""
    return [s.box if s.box is not None else WHOLE_IMAGE for s in plan.subtasks if not s.keep and s.intensity > 0]


def outside_mask(boxes, height: int, width: int) -> torch.Tensor:
    """(height, width) bool: True on the pixels no box touches."""
    inside = torch.zeros(height, width, dtype=torch.bool)
    for box in boxes:
        inside |= box_cover(box, height, width).bool()
    return ~inside


def psnr_outside(source: torch.Tensor, edited: torch.Tensor, outside: torch.Tensor) -> float | None:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if not outside.any():
        return None
    value = float(peak_signal_noise_ratio(edited[:, :, outside], source[:, :, outside], data_range=1.0))
    return min(value, MAX_PSNR)


def ssim_outside(source: torch.Tensor, edited: torch.Tensor, outside: torch.Tensor) -> float | None:
    from torchmetrics.functional.image import structural_similarity_index_measure

    if not outside.any() or min(source.shape[-2:]) < 6:  # the window's reflect padding needs 6 pixels a side
        return None
    _, full = structural_similarity_index_measure(
        edited.double(), source.double(), data_range=1.0, return_full_image=True
    )
    return float(full[:, :, outside].mean())


def paste_inside(source: torch.Tensor, edited: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """The edited image with every pixel inside the boxes taken from the source."""
    return torch.where(outside, edited, source)


class EditMetrics:
    """Computes one edit's metrics; the learned ones are loaded once, when built.

    Args:
        spec: which learned metrics to add, and where their weights are.
        device: where CLIP and LPIPS run.

    Raises:
        GasError: when a weights path does not hold what the metric needs.
    """

    def __init__(self, spec: MetricsSpec | None = None, device: str | torch.device = "cpu"):
        self.spec = spec or MetricsSpec()
        self.device = torch.device(device)
        self.clip = load_clip_score(self.spec.clip, self.device) if self.spec.clip else None
        self.lpips = load_lpips(self.spec.lpips, self.spec.lpips_net, self.device) if self.spec.lpips else None

    def __call__(self, source: Image.Image, edited: Image.Image, plan: EditPlan) -> dict[str, Any]:
        """`source` is resized (Lanczos, as the edit saw it) to the edited image's working size."""
        from PIL import Image

        if source.size != edited.size:
            source = source.convert("RGB").resize(edited.size, Image.Resampling.LANCZOS)
        src, out = to_tensor(source), to_tensor(edited)
        outside = outside_mask(edited_boxes(plan), out.shape[-2], out.shape[-1])
        values: dict[str, Any] = {
            "psnr_outside": psnr_outside(src, out, outside),
            "ssim_outside": ssim_outside(src, out, outside),
            "outside_fraction": float(outside.float().mean()),
        }
        if self.lpips is not None:
            self.lpips.reset()
            self.lpips.update(paste_inside(src, out, outside).to(self.device), src.to(self.device))
            values["lpips_outside"] = float(self.lpips.compute())
        if self.clip is not None:
            self.clip.reset()
            pixels = torch.from_numpy(np.array(edited.convert("RGB"))).permute(2, 0, 1).contiguous()
            self.clip.update(pixels.to(self.device), plan.target_prompt)
            values["clip_score"] = float(self.clip.compute())
        return values


class _ClipFeatures(torch.nn.Module):
    """A CLIPModel whose get_*_features return tensors: transformers 5 returns an output object,
    which torchmetrics 1.9's CLIPScore cannot normalise (Lightning-AI/torchmetrics#3428)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(features) -> torch.Tensor:
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def load_clip_score(path: str, device: torch.device):
    """torchmetrics CLIPScore on a local CLIP folder, read with local_files_only (never a download)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise GasError(
            f"--metrics.clip {path!r}: no CLIP model there (no config.json); pass a local folder holding a "
            "CLIPModel and its CLIPProcessor, e.g. one saved with save_pretrained or downloaded with "
            "`huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR` on a machine with internet"
        )
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise GasError(
            f"--metrics.clip {path!r}: could not load a CLIP model and processor from it "
            f"({' '.join(str(e).split())[:200]}); it needs config.json, the weights, the tokenizer "
            "files and preprocessor_config.json"
        ) from None
    return CLIPScore(model_name_or_path=lambda: (_ClipFeatures(model), processor), sync_on_compute=False).to(device)


def load_lpips(path: str, net: str, device: torch.device):
    """torchmetrics LPIPS with its backbone read from `path` instead of downloaded.

    torchmetrics ships LPIPS's linear layers; the backbone comes from torchvision, which looks in
    torch.hub's cache before downloading. The file (checked to hold tensors only) is shown to it
    there, under the name torchvision expects, so nothing is fetched.
    """
    import tempfile

    import torchvision
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    expected = os.path.basename(getattr(torchvision.models, LPIPS_WEIGHTS[net]).DEFAULT.url)
    given = Path(path).expanduser()
    weights = given / expected if given.is_dir() else given
    if given.is_dir() and not weights.is_file():
        weights = given / "checkpoints" / expected  # a torch hub folder (TORCH_HOME/hub)
    if not weights.is_file():
        raise GasError(
            f"--metrics.lpips {path!r}: no {expected} there; LPIPS ({net}) needs torchvision's ImageNet "
            f"backbone weights: fetch {getattr(torchvision.models, LPIPS_WEIGHTS[net]).DEFAULT.url} "
            "on a machine with internet and pass the file"
        )
    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GasError(
            f"--metrics.lpips {str(weights)!r} is not a readable weights file holding tensors only "
            f"({type(e).__name__}); pass torchvision's {expected}"
        ) from None
    with tempfile.TemporaryDirectory(prefix="gas-lpips-") as hub, _hub_dir(hub):
        (Path(hub) / "checkpoints").mkdir()
        (Path(hub) / "checkpoints" / expected).symlink_to(weights.resolve())
        try:
            metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True, sync_on_compute=False)
        except RuntimeError as e:  # state-dict keys or shapes of another network
            raise GasError(
                f"--metrics.lpips {str(weights)!r} does not fit torchvision's {net} backbone "
                f"({' '.join(str(e).split())[:160]}); pass its {expected}"
            ) from None
    return metric.to(device)


@contextmanager
def _hub_dir(folder: str) -> Iterator[None]:
    old = torch.hub.get_dir()
    torch.hub.set_dir(folder)
    try:
        yield
    finally:
        torch.hub.set_dir(old)
