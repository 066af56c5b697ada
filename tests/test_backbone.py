"""Loading through the real from_pretrained path; attention choice; pixel-space models."""

import logging

import pytest
import torch

from gas_lightning.backbone import IdentityCodec, VaeCodec, set_attention
from gas_lightning.errors import ModelLoadError
from gas_lightning.loading import load_backbone


def test_sd_layout_loads_with_vae(backbone):
    assert isinstance(backbone.codec, VaeCodec)
    assert backbone.default_resolution == 32 and backbone.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in backbone.unet.parameters())
    assert backbone.attention == "sdpa"


def test_pixel_space_model_uses_identity_codec(tiny_pixel):
    bb = load_backbone(tiny_pixel)
    assert isinstance(bb.codec, IdentityCodec) and bb.default_resolution == 32
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(bb.codec.encode(x), x)


def test_missing_model_names_the_local_path_option(tmp_path):
    with pytest.raises(ModelLoadError, match="--model /path/to/model"):
        load_backbone("someone/not-a-model-" + "x" * 8, local_files_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_backbone(str(tmp_path / "empty"))


def test_xformers_request_falls_back_to_sdpa_and_says_so(backbone, caplog, monkeypatch):
    import importlib.util

    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else importlib.util.find_spec(name)
    )
    with caplog.at_level(logging.WARNING, logger="gas_lightning.backbone"):
        assert set_attention(backbone.unet, "xformers") == "sdpa"
    assert "xformers" in caplog.text and "SDPA" in caplog.text
    assert set_attention(backbone.unet, "auto") == "sdpa"  # no CUDA here
    with pytest.raises(ModelLoadError, match="unknown attention backend"):
        set_attention(backbone.unet, "flash")


def test_long_prompt_truncation_is_reported(backbone, caplog):
    with caplog.at_level(logging.WARNING, logger="gas_lightning.backbone"):
        emb = backbone.encode_prompts(["a very long prompt about many many things"])
    assert len(emb) == 1 and "keeps only" in caplog.text
