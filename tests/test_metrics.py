"""Per-edit metrics against hand computations on tiny images, and the learned ones from local
weights built here (random CLIP, random AlexNet), with every download path made to fail."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gas_lightning.errors import GasError
from gas_lightning.metrics import EditMetrics, MetricsSpec, outside_mask, psnr_outside, ssim_outside
from gas_lightning.plan import EditPlan, Subtask

H, W = 8, 12
BOX = (0.25, 0.25, 0.5, 0.75)  # rows 2..5, columns 3..5 of an 8 x 12 picture


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    import huggingface_hub
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def pictures(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    source = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    edited = source.copy()
    edited[2:6, 3:6] = rng.integers(0, 256, (4, 3, 3))  # changes inside the box
    noise = rng.integers(-20, 21, (H, W, 3))
    edited = np.where(
        np.pad(np.ones((4, 3, 3), bool), ((2, 2), (3, 6), (0, 0))), edited, np.clip(edited.astype(int) + noise, 0, 255)
    ).astype(np.uint8)  # and smaller ones outside
    return source, edited


def as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1)[None]


def plan_with(*subtasks: Subtask) -> EditPlan:
    return EditPlan("a", "b", subtasks)


def test_outside_is_every_pixel_no_edited_box_touches():
    expected = np.ones((H, W), bool)
    expected[2:6, 3:6] = False  # x 0.25*12=3 .. 0.5*12=6, y 0.25*8=2 .. 0.75*8=6
    assert np.array_equal(outside_mask([BOX], H, W).numpy(), expected)
    # a box edge that cuts a pixel takes the whole pixel (as the latent masks do)
    expected[1, 3:6] = False
    assert np.array_equal(outside_mask([(0.25, 0.2, 0.5, 0.75)], H, W).numpy(), expected)


def test_psnr_outside_is_the_psnr_of_the_outside_pixels_alone():
    source, edited = pictures()
    out = np.ones((H, W), bool)
    out[2:6, 3:6] = False
    mse = np.mean((edited[out].astype(np.float64) - source[out].astype(np.float64)) ** 2) / 255**2
    assert mse > 0
    value = psnr_outside(as_tensor(source), as_tensor(edited), outside_mask([BOX], H, W))
    assert value == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)
    # identical outside: 100 dB (not infinity); nothing outside: None
    same = source.copy()
    same[2:6, 3:6] = 0
    assert psnr_outside(as_tensor(source), as_tensor(same), outside_mask([BOX], H, W)) == 100.0
    assert psnr_outside(as_tensor(source), as_tensor(edited), outside_mask([(0, 0, 1, 1)], H, W)) is None


def _ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM per pixel and channel written out: 11x11 Gaussian (sigma 1.5) over a reflect-padded image,
    C1 = (0.01)^2, C2 = (0.03)^2 for data range 1 (Wang et al. 2004, with torchmetrics' padding)."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    g /= g.sum()
    k = np.outer(g, g)

    def blur(a):
        p = np.pad(a, ((5, 5), (5, 5), (0, 0)), mode="reflect")
        return sum(k[i, j] * p[i : i + a.shape[0], j : j + a.shape[1]] for i in range(11) for j in range(11))

    x, y = x.astype(np.float64) / 255, y.astype(np.float64) / 255
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (np.maximum(vx, 0) + np.maximum(vy, 0) + c2))


def test_ssim_outside_averages_the_ssim_map_over_the_outside_pixels():
    source, edited = pictures(1)
    out = np.ones((H, W), bool)
    out[2:6, 3:6] = False
    expected = _ssim_map(edited, source)[out].mean()
    whole = _ssim_map(edited, source).mean()
    assert abs(expected - whole) > 1e-3  # the box matters
    value = ssim_outside(as_tensor(source), as_tensor(edited), outside_mask([BOX], H, W))
    assert value == pytest.approx(expected, abs=1e-6)
    # flat pictures a and b: (2ab + C1) / (a^2 + b^2 + C1) everywhere
    a, b = 100 / 255, 140 / 255
    flat = ssim_outside(
        as_tensor(np.full((H, W, 3), 100, np.uint8)),
        as_tensor(np.full((H, W, 3), 140, np.uint8)),
        outside_mask([BOX], H, W),
    )
    assert flat == pytest.approx((2 * a * b + 1e-4) / (a * a + b * b + 1e-4), abs=1e-6)


def test_edit_metrics_use_the_edited_boxes_and_the_working_size():
    source, edited = pictures(2)
    plan = plan_with(Subtask("x", "y", box=BOX), Subtask("k", "k", box=(0, 0, 0.2, 0.2)))  # a keep subtask
    values = EditMetrics()(Image.fromarray(source), Image.fromarray(edited), plan)
    out = outside_mask([BOX], H, W)  # the keep box still counts as outside: it must not change
    assert values["psnr_outside"] == psnr_outside(as_tensor(source), as_tensor(edited), out)
    assert values["outside_fraction"] == pytest.approx(1 - 12 / 96)
    assert set(values) == {"psnr_outside", "ssim_outside", "outside_fraction"}
    # a larger source is brought to the edited picture's size as the edit brought it (Lanczos)
    big = Image.fromarray(source).resize((W * 4, H * 4), Image.Resampling.NEAREST)
    again = EditMetrics()(big, Image.fromarray(edited), plan)
    small = np.asarray(big.resize((W, H), Image.Resampling.LANCZOS))
    assert again["psnr_outside"] == psnr_outside(as_tensor(small), as_tensor(edited), out)


# learned metrics from local weights ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP (tiny CLIPConfig) with a processor, saved as a user would download one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from gas_lightning.testing import write_char_clip_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    write_char_clip_tokenizer(folder, max_length=32)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_is_100_times_the_cosine_of_clips_own_embeddings(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    source, edited = pictures(3)
    metrics = EditMetrics(MetricsSpec(clip=str(tiny_clip)))
    scores = []
    for prompt in ("a red block", "snow", "a cat on grass"):
        plan = EditPlan("a thing", prompt, (Subtask("x", "y", box=BOX),))
        with torch.no_grad():
            img = model.get_image_features(**processor(images=Image.fromarray(edited), return_tensors="pt"))
            txt = model.get_text_features(**processor(text=[prompt], return_tensors="pt", padding=True))
        img, txt = (f if isinstance(f, torch.Tensor) else f.pooler_output for f in (img, txt))
        cosine = float(torch.nn.functional.cosine_similarity(img, txt).item())
        value = metrics(Image.fromarray(source), Image.fromarray(edited), plan)["clip_score"]
        assert value == pytest.approx(max(100 * cosine, 0.0), abs=1e-3)
        scores.append(100 * cosine)
    assert max(scores) > 0  # at least one prompt checks a value, not the clamp


def test_missing_weights_are_one_clear_error_not_a_download(tmp_path):
    with pytest.raises(GasError, match="--metrics.clip .*no CLIP model there"):
        EditMetrics(MetricsSpec(clip=str(tmp_path / "nowhere")))
    with pytest.raises(GasError, match="--metrics.clip .*no CLIP model there"):
        EditMetrics(MetricsSpec(clip="openai/clip-vit-large-patch14"))  # a hub id is not fetched
    with pytest.raises(GasError, match="no alexnet-owt-7be5be79.pth there.*download.pytorch.org"):
        EditMetrics(MetricsSpec(lpips=str(tmp_path)))
    (tmp_path / "alexnet-owt-7be5be79.pth").write_bytes(b"not torch")
    with pytest.raises(GasError, match="not a readable weights file"):
        EditMetrics(MetricsSpec(lpips=str(tmp_path)))
    with pytest.raises(GasError, match="lpips_net must be one of"):
        MetricsSpec(lpips_net="resnet")


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """Random torchvision AlexNet weights under the name torchvision gives the ImageNet ones."""
    import torchvision

    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    path = folder / os.path.basename(torchvision.models.AlexNet_Weights.DEFAULT.url)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


def test_lpips_outside_compares_the_source_with_the_edit_outside_the_boxes(alexnet_file):
    from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity

    from gas_lightning.metrics import _hub_dir

    rng = np.random.default_rng(4)
    source = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    edited = np.clip(source.astype(int) + rng.integers(-30, 31, source.shape), 0, 255).astype(np.uint8)
    box = (0.25, 0.25, 0.75, 0.75)  # rows 8..23, columns 10..29
    plan = plan_with(Subtask("x", "y", box=box))
    metrics = EditMetrics(MetricsSpec(lpips=str(alexnet_file)))
    value = metrics(Image.fromarray(source), Image.fromarray(edited), plan)["lpips_outside"]
    pasted = edited.copy()
    pasted[8:24, 10:30] = source[8:24, 10:30]
    with _hub_dir(str(alexnet_file.parent.parent / "hub")):  # the library's own function, on the same weights
        (alexnet_file.parent.parent / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
        link = alexnet_file.parent.parent / "hub" / "checkpoints" / alexnet_file.name
        link.unlink(missing_ok=True)
        link.symlink_to(alexnet_file)
        expected = float(
            learned_perceptual_image_patch_similarity(
                as_tensor(pasted), as_tensor(source), net_type="alex", normalize=True
            )
        )
        whole = float(
            learned_perceptual_image_patch_similarity(
                as_tensor(edited), as_tensor(source), net_type="alex", normalize=True
            )
        )
    assert value == pytest.approx(expected, rel=1e-5) and abs(whole - expected) > 1e-4 * whole
    # only the inside changed: nothing outside differs
    inside_only = source.copy()
    inside_only[8:24, 10:30] = 255 - source[8:24, 10:30]
    assert metrics(Image.fromarray(source), Image.fromarray(inside_only), plan)["lpips_outside"] == 0.0
