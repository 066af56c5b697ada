"""Single-file checkpoints (`--model model.safetensors --model_config FOLDER`), SD 1.x and SDXL.

diffusers converts original-layout (LDM/SGM) files to its own layout but ships no converter
back, so this test writes a tiny model's weights in the original key layout itself (the inverse
of the names diffusers' single-file converter reads; its fixed-name tables are reused as they
are). The loaded model must equal the folder it came from, weight for weight.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_fidelity_units import _one_thread  # noqa: F401  (autouse: one torch thread in this process)

from gas_lightning.testing import build_tiny_sd, build_tiny_sdxl

REPO = Path(__file__).resolve().parents[1]
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = [
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
]


# --- diffusers layout -> original layout (test-only) -----------------------------------------


def _weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(next((folder / component).glob("*.safetensors")))


def _rename_first(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_to_ldm(state: dict, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    per = config["layers_per_block"] + 1
    out = {}
    for key, value in state.items():
        p = key.split(".")
        if key in fixed:
            new = fixed[key]
        elif p[0] == "down_blocks" and p[2] == "downsamplers":
            new = f"input_blocks.{1 + int(p[1]) * per + per - 1}.0.op.{p[-1]}"
        elif p[0] == "down_blocks":
            block, rest = 1 + int(p[1]) * per + int(p[3]), ".".join(p[4:])
            new = (
                f"input_blocks.{block}.0.{_rename_first(rest, UNET_RESNET)}"
                if p[2] == "resnets"
                else f"input_blocks.{block}.1.{rest}"
            )
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            new = (
                f"middle_block.{2 * int(p[2])}.{_rename_first(rest, UNET_RESNET)}"
                if p[1] == "resnets"
                else f"middle_block.1.{rest}"
            )
        elif p[0] == "up_blocks" and p[2] == "upsamplers":
            has_attention = any(k.startswith(f"up_blocks.{p[1]}.attentions.") for k in state)
            new = f"output_blocks.{int(p[1]) * per + per - 1}.{2 if has_attention else 1}.conv.{p[-1]}"
        elif p[0] == "up_blocks":
            block, rest = int(p[1]) * per + int(p[3]), ".".join(p[4:])
            new = (
                f"output_blocks.{block}.0.{_rename_first(rest, UNET_RESNET)}"
                if p[2] == "resnets"
                else f"output_blocks.{block}.1.{rest}"
            )
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        p = key.split(".")
        side = p[0]
        if key in fixed:
            new = fixed[key]
        elif p[1] == "down_blocks" and p[3] == "resnets":
            new = f"{side}.down.{p[2]}.block.{p[4]}.{'.'.join(p[5:])}".replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "down_blocks":
            new = f"{side}.down.{p[2]}.downsample.conv.{p[-1]}"
        elif p[1] == "up_blocks" and p[3] == "resnets":
            new = f"{side}.up.{n_up - 1 - int(p[2])}.block.{p[4]}.{'.'.join(p[5:])}".replace(
                "conv_shortcut", "nin_shortcut"
            )
        elif p[1] == "up_blocks":
            new = f"{side}.up.{n_up - 1 - int(p[2])}.upsample.conv.{p[-1]}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{side}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
        elif p[1] == "mid_block":
            rest = ".".join(p[4:])
            for d, o in VAE_ATTENTION.items():
                rest = re.sub(rf"^{re.escape(d)}\.", o + ".", rest)
            new = f"{side}.mid.attn_1.{rest}"
            value = value[:, :, None, None] if value.ndim == 2 else value  # original attention is 1x1 convolutions
        else:
            raise KeyError(key)
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """OpenAI CLIP keeps transformers' names under a prefix (text_model. restored where transformers flattened it)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def openclip_to_ldm(state: dict, prefix: str) -> dict:
    """OpenCLIP (SDXL's second encoder): fused q/k/v, its own layer names, the projection transposed."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out, fused = {}, {}
    for key, value in state.items():
        if key in fixed:
            out[prefix + fixed[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        layer, rest = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key).groups()
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            fused.setdefault((layer, qkv.group(2)), {})[qkv.group(1)] = value
            continue
        for d, o in OPENCLIP_LAYER:
            rest = rest.replace(d, o)
        out[f"{prefix}transformer.resblocks.{layer}.{rest}"] = value
    for (layer, kind), parts in fused.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return out


def write_single_file(folder: Path, target: Path) -> Path:
    """The whole model as one original-layout .safetensors file."""
    config = lambda c: json.loads((folder / c / "config.json").read_text())  # noqa: E731
    state = {
        **unet_to_ldm(_weights(folder, "unet"), config("unet")),
        **vae_to_ldm(_weights(folder, "vae"), config("vae")),
    }
    if (folder / "text_encoder_2").is_dir():
        state.update(clip_to_ldm(_weights(folder, "text_encoder"), "conditioner.embedders.0.transformer."))
        state.update(openclip_to_ldm(_weights(folder, "text_encoder_2"), "conditioner.embedders.1.model."))
    else:
        state.update(clip_to_ldm(_weights(folder, "text_encoder"), "cond_stage_model.transformer."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


def config_folder(folder: Path, target: Path) -> Path:
    """The model folder without its weights: configs, tokenizers, scheduler, model_index.json."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def single(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"single_{request.param}")
    folder = (build_tiny_sdxl if request.param == "sdxl" else build_tiny_sd)(tmp / "model")
    return (
        request.param,
        folder,
        write_single_file(folder, tmp / "model.safetensors"),
        config_folder(folder, tmp / "config"),
    )


# --- tests -----------------------------------------------------------------------------------


def test_single_file_equals_the_folder_it_came_from(single):
    from gas_lightning.loading import load_backbone

    family, folder, file, config = single
    ref = load_backbone(str(folder), attention="sdpa")
    got = load_backbone(str(file), attention="sdpa", model_config=str(config))
    assert got.family == ref.family == family and got.source == str(file)
    pairs = [(got.unet, ref.unet), (got.codec.vae, ref.codec.vae), (got.text_encoder, ref.text_encoder)]
    if family == "sdxl":
        pairs.append((got.text_encoder_2, ref.text_encoder_2))
    for loaded, original in pairs:
        want = original.state_dict()
        have = loaded.state_dict()
        assert set(have) == set(want), type(original).__name__
        for key in want:
            torch.testing.assert_close(have[key], want[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    prompts = ["a cat", "snow"]
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    torch.testing.assert_close(
        got.predict_eps(z, t, got.encode_prompts(prompts)),
        ref.predict_eps(z, t, ref.encode_prompts(prompts)),
        rtol=0,
        atol=0,
    )


def test_single_file_edit_end_to_end(single, image_file, tmp_path):
    from gas_lightning.cli import main

    family, _, file, config = single
    out = tmp_path / "out"
    argv = [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--model",
        str(file),
        "--model_config",
        str(config),
        "--image",
        image_file,
        "--request",
        "change the red block into a yellow block. change the grass into snow.",
        "--boxes",
        "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]]",
        "--output_dir",
        str(out),
        "--trainer.max_steps",
        "2",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert (out / "edited.png").is_file() and torch.load(out / "latent.pt")["step"] == 2


def test_a_single_file_model_loaded_once_edits_through_the_api(single, image_file, tmp_path):
    """load_model(file, model_config=...) then edit(model=...): config.yaml names both, and reruns the edit."""
    import yaml

    from gas_lightning import edit, load_model
    from gas_lightning.cli import main

    _, _, file, config = single
    model = load_model(str(file), device="cpu", model_config=str(config))
    result = edit(
        image_file,
        "change the red block into a yellow block. change the grass into snow.",
        boxes=[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]],
        model=model,
        steps=1,
        config=REPO / "configs" / "tiny.yaml",
        output_dir=tmp_path / "api",
    )
    saved = yaml.safe_load((tmp_path / "api" / "config.yaml").read_text())
    assert saved["model"] == str(file) and saved["model_config"] == str(config)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(tmp_path / "api" / "config.yaml"), "--output_dir", str(tmp_path / "again")])
    assert exit_info.value.code == 0
    again = torch.load(tmp_path / "again" / "latent.pt", weights_only=True)["latent"]
    torch.testing.assert_close(result.latent, again, rtol=0, atol=0)


def _expect(capsys, tmp_path, image_file, model, *extra) -> str:
    from gas_lightning.cli import main

    argv = [
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--model",
        str(model),
        "--image",
        image_file,
        "--request",
        "change the red block into a yellow block. change the grass into snow.",
        "--boxes",
        "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]]",
        "--output_dir",
        str(tmp_path / "o"),
        *extra,
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_single_file_errors(single, tmp_path, image_file, capsys):
    family, folder, file, config = single
    assert "needs --model_config FOLDER" in _expect(capsys, tmp_path, image_file, file)
    assert "drop --model_config" in _expect(capsys, tmp_path, image_file, folder, "--model_config", str(config))
    assert "is not a folder" in _expect(capsys, tmp_path, image_file, file, "--model_config", str(file))
    other = config_folder(
        build_tiny_sd(tmp_path / "sd") if family == "sdxl" else build_tiny_sdxl(tmp_path / "xl"),
        tmp_path / "other_config",
    )
    capsys.readouterr()  # the builder's progress bars
    err = _expect(capsys, tmp_path, image_file, file, "--model_config", str(other))
    assert "is a checkpoint of" in err and "config folder of" in err
    resized = config_folder(config, tmp_path / "resized_config")  # same family, another UNet width
    unet_config = json.loads((resized / "unet" / "config.json").read_text())
    (resized / "unet" / "config.json").write_text(json.dumps({**unet_config, "block_out_channels": [16, 64]}))
    assert "could not be loaded with the configs in --model_config" in _expect(
        capsys, tmp_path, image_file, file, "--model_config", str(resized)
    )
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    assert "holds no UNet weights" in _expect(capsys, tmp_path, image_file, lora, "--model_config", str(config))
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(file)}, pickled)
    assert "--allow_pickle_weights true" in _expect(
        capsys, tmp_path, image_file, pickled, "--model_config", str(config)
    )
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(file.read_bytes()[:1000])
    assert "not a readable .safetensors file" in _expect(
        capsys, tmp_path, image_file, truncated, "--model_config", str(config)
    )


def test_single_file_family_check_reads_the_family_from_key_names():
    from gas_lightning.single_file import checkpoint_family

    # SD3 and FLUX files are transformers, loaded by flow_loading.py (tests/test_flow.py)
    assert checkpoint_family({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"}) == "sd3"
    assert checkpoint_family({"double_blocks.0.img_attn.qkv.weight"}) == "flux"
    assert checkpoint_family({"model.diffusion_model.out.0.weight", "conditioner.embedders.0.transformer.x"}) == "sdxl"
    assert checkpoint_family({"model.diffusion_model.out.0.weight", "cond_stage_model.transformer.x"}) == "sd"
