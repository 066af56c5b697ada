"""A password or key inside --llm_base_url is refused before gas-edit writes anything, in every
planner mode, even when the URL would never be used: config.yaml, plan.json, TensorBoard events
and logs must not carry it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gas_lightning.cli import main

PASSWORD = "hunter2-Pa55w0rd-xyz"
REQUEST = "change the red block into a yellow block. change the grass into snow."
BOXES = "[[0.05, 0.05, 0.45, 0.5], [0, 0, 1, 1]]"
WITH_PASSWORD = f"https://alice:{PASSWORD}@llm.example.com/v1"


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def files_holding(folder: Path, secret: str) -> list[str]:
    return [str(f) for f in folder.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]


@pytest.mark.parametrize(
    "edit",
    [
        ["--request", REQUEST],  # auto planner, no LLM model: the URL is never used
        ["--request", REQUEST, "--planner", "rules"],
        ["--request", REQUEST, "--llm_model", "m"],  # auto planner, structured request: the LLM is not asked
        ["--request", "make the block yellow", "--planner", "llm", "--llm_model", "m"],
        ["--source", "a red block on grass", "--target", "a yellow block on grass"],
    ],
    ids=["auto", "rules", "auto-structured", "llm", "sentences"],
)
@pytest.mark.parametrize(
    "url",
    [WITH_PASSWORD, f"https://llm.example.com/v1?api_key={PASSWORD}", f"https://{PASSWORD}@llm.example.com/v1"],
    ids=["user-password", "query", "user"],
)
def test_credentials_in_the_base_url_are_refused_and_written_nowhere(image_file, tmp_path, capsys, caplog, edit, url):
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        code = run_cli(
            [
                "--image",
                image_file,
                *edit,
                "--boxes",
                BOXES,
                "--llm_base_url",
                url,
                "--output_dir",
                str(out),
                "--plan_only",
                "true",
            ]
        )
    captured = capsys.readouterr()
    assert code == 2
    assert "OPENAI_API_KEY" in captured.err and "Traceback" not in captured.err
    assert PASSWORD not in captured.out + captured.err + caplog.text
    assert files_holding(tmp_path, PASSWORD) == []


def test_credentials_in_a_config_file_are_refused_before_a_full_edit(tiny_sd, image_file, tmp_path, capsys, caplog):
    """The same URL from a YAML config on a real (tiny) edit: no config.yaml, no TensorBoard events."""
    config = tmp_path / "my.yaml"
    config.write_text(f"llm_base_url: {WITH_PASSWORD}\n")
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        code = run_cli(
            [
                "--config",
                str(config),
                "--model",
                tiny_sd,
                "--image",
                image_file,
                "--request",
                REQUEST,
                "--boxes",
                BOXES,
                "--output_dir",
                str(out),
                "--trainer.max_steps",
                "1",
            ]
        )
    captured = capsys.readouterr()
    assert code == 2 and "OPENAI_API_KEY" in captured.err
    assert PASSWORD not in captured.out + captured.err + caplog.text
    assert files_holding(out.parent, PASSWORD) == [str(config)]  # only the user's own file


def test_a_plain_base_url_is_still_accepted_by_the_rules_planner(image_file, tmp_path):
    out = tmp_path / "out"
    assert (
        run_cli(
            [
                "--image",
                image_file,
                "--request",
                REQUEST,
                "--boxes",
                BOXES,
                "--llm_base_url",
                "https://llm.example.com/v1",
                "--output_dir",
                str(out),
                "--plan_only",
                "true",
            ]
        )
        == 0
    )
    assert "https://llm.example.com/v1" in (out / "config.yaml").read_text()


def test_print_config_does_not_print_a_password(tmp_path, capsys):
    """jsonargparse prints --print_config while parsing; gas-edit checks the URL first."""
    code = run_cli(
        ["--image", "x.png", "--llm_base_url", WITH_PASSWORD, "--print_config", "--output_dir", str(tmp_path / "out")]
    )
    out, err = capsys.readouterr()
    assert code == 2 and "OPENAI_API_KEY" in err
    assert PASSWORD not in out + err
    assert run_cli(["--image", "x.png", "--llm_base_url", "http://localhost:8000/v1", "--print_config"]) == 0
    assert "llm_base_url: http://localhost:8000/v1" in capsys.readouterr().out
