"""Shared fixtures: tiny random diffusion models written to disk once per session."""

from __future__ import annotations

import lightning.pytorch  # noqa: F401  (first import here, see below)
import pytest
import torch
from PIL import Image

from gas_lightning.testing import build_tiny_sd

torch.set_num_threads(2)
# Lightning binds a log handler to sys.stderr when first imported. Imported here, that is the
# session's stream; imported first inside a test, it would be that test's capsys stream, closed
# after it, and later tests' Lightning messages would print "--- Logging error ---" tracebacks.


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """SD layout (VAE + epsilon UNet), random weights, saved with save_pretrained."""
    return str(build_tiny_sd(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> str:
    """The same layout with v-prediction, as SD 2.x."""
    return str(build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction"))


@pytest.fixture(scope="session")
def tiny_pixel(tmp_path_factory) -> str:
    """A pixel-space model without a VAE, as the bundled shapes model."""
    return str(build_tiny_sd(tmp_path_factory.mktemp("tiny_pixel"), with_vae=False))


@pytest.fixture(scope="session")
def backbone(tiny_sd):
    from gas_lightning.loading import load_backbone

    return load_backbone(tiny_sd, attention="sdpa")


@pytest.fixture()
def image_file(tmp_path) -> str:
    """A 48x40 picture with two coloured blocks (non-square on purpose)."""
    im = Image.new("RGB", (48, 40), (90, 160, 60))
    im.paste((200, 40, 40), (4, 4, 20, 20))
    im.paste((40, 40, 200), (28, 18, 44, 36))
    path = tmp_path / "input.png"
    im.save(path)
    return str(path)
