"""Every command the README shows is run: here, by the test named for it, or by .ci/run.

The commands are read from README.md, not copied, and run as written. Only what cannot exist on a
test machine is substituted, and each substitution is named where it is made: a tiny random model
for `/models/...` folders and hub ids, 2 steps instead of hundreds, zero detection thresholds for a
detector with random weights, a local mock for the OpenAI endpoint. A command that nothing runs
fails `test_every_readme_command_is_run_somewhere`, so a new one cannot slip in untested.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_grounding import tiny_gdino, tokenizer  # noqa: F401  (fixtures: a random GroundingDINO)
from test_llm_planner import ChatServer
from test_segmenter import tiny_sam  # noqa: F401  (fixture: a random SAM)

from gas_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(REPO / "tools" / "world"),
    str(REPO / "tools" / "bench"),
]  # eval_world, summarize_eval, benchmark and the prose's tools
README = (REPO / "README.md").read_text()
# the docs site's pages: sections moved out of the README keep their titles there, and their commands run
DOCS = {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted((REPO / "docs").rglob("*.md"))}
STEPS = ["--trainer.max_steps", "2"]
SEPARATOR = "\0"  # joins a command with a fragment run in its place, in the claims below


def section(title: str) -> str:
    """A '## ' section of the README or, once moved there, of a docs page."""
    for text in (README, *DOCS.values()):
        start = text.find(f"\n## {title}")
        if start >= 0:
            end = text.find("\n## ", start + 1)
            return text[start : end if end > 0 else None]
    raise AssertionError(f"no section {title!r} in README.md or docs/")


def fenced_commands(text: str = README) -> list[str]:
    """The shell commands of the bash blocks: continuations joined, comments dropped, a heredoc's
    body left out (its command line stands for it)."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        pending, heredoc = "", None
        for line in block.splitlines():
            if heredoc:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            code = re.sub(r"\s+#\s.*$", "", line).strip()
            if not pending and (not code or code.startswith("#")):
                continue
            if code.endswith("\\"):
                pending += code[:-1]
                continue
            command = " ".join((pending + code).split())
            pending = ""
            commands.append(command)
            match = re.search(r"<<'(\w+)'", command)
            heredoc = match.group(1) if match else None
    return commands


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def gas_edit(*argv: str) -> None:
    """One in-process `gas-edit` run; it must exit 0."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 0, argv


def argv_of(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "gas-edit", command
    return words[1:]


def drop(argv: list[str], *flags: str) -> list[str]:
    """argv without the given flags and their values."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in flags:
            skip = True
        else:
            out.append(word)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A user's folder: the repository's configs/ beside their own dog.png, as the README assumes."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    dog = Image.new("RGB", (96, 80), (80, 150, 60))  # grass, a brown dog, a grey house
    dog.paste((130, 90, 50), (30, 36, 62, 76))
    dog.paste((150, 150, 160), (6, 4, 56, 44))
    dog.save(tmp_path / "dog.png")
    return tmp_path


# --- where each README command runs -------------------------------------------------------------------
# (pattern matched against the start of the command, where it runs). "here: NAME" is a test below.
CLAIMS = [
    (
        r"pip install -e \. && gas-edit --config configs/shapes.yaml$",
        ".ci/run (pip install -e) + tests/test_default_edit.py::test_the_main_command_makes_the_requested_edit",
    ),
    (
        r"apt-get update && apt-get install -y chromium chromium-driver && pip install -e \"\.\[test,app\]\"$",
        "here: test_the_set_up_and_test_commands_are_what_ci_runs",
    ),
    (r"python3 -m pytest -q$", "here: test_the_set_up_and_test_commands_are_what_ci_runs"),
    (r"pip install -e \"\.\[app\]\" && gas-edit app$", "tests/test_app_browser.py::test_edit_in_the_browser"),
    # the hub cannot be reached: the test writes the folder this download would fetch
    (
        r"hf download stabilityai/stable-diffusion-xl-base-1\.0 ",
        "not run, replaced: here: test_the_single_file_command",
    ),
    (r"gas-edit --config configs/sdxl\.yaml --model my-finetune\.safetensors ", "here: test_the_single_file_command"),
    (
        r"gas-edit --config configs/sd15\.yaml --image dog\.png (--output_dir outputs/dog[234]?|--plan outputs/dog/plan\.json) ",
        "here: test_the_stable_diffusion_commands",
    ),
    (
        r"gas-edit --config configs/sd15\.yaml --image dog\.png --output_dir outputs/dog5 ",
        "here: test_the_mask_commands",
    ),
    (r"gas-edit \.\.\. --masks labels\.png$", "here: test_the_mask_commands"),
    (
        r"gas-edit \.\.\. --detector /models/grounding-dino-tiny --segmenter /models/sam-vit-base$",
        "here: test_the_mask_commands",
    ),
    (
        r"gas-edit --config configs/shapes\.yaml --segmenter world --output_dir outputs/shapes-masks$",
        "here: test_the_mask_commands",
    ),
    (
        r"gas-edit --image dog\.png --request \"change the dog into a cat\. .* --detector IDEA-Research/grounding-dino-tiny .*--plan_only true$",
        "here: test_the_grounding_and_llm_commands",
    ),
    (r"export OPENAI_API_KEY=\.\.\.$", "here: test_the_grounding_and_llm_commands"),
    (r"gas-edit --image dog\.png --request .* --planner llm ", "here: test_the_grounding_and_llm_commands"),
    # groundingdino-py needs a CUDA build of its own; its backend runs through a stand-in package there
    (
        r"pip install 'groundingdino-py==0\.4\.0'$",
        "not run: tests/test_grounding.py::test_groundingdino_py_backend_builds_and_detects_through_the_bert_fix",
    ),
    (
        r"gas-edit \.\.\. --detector_backend groundingdino-py ",
        "tests/test_grounding.py::test_groundingdino_py_backend_builds_and_detects_through_the_bert_fix",
    ),
    (r"nice -n 10 python tools/world/eval_world\.py ", "here: test_the_evaluation_commands"),
    (r"python tools/world/summarize_eval\.py ", "here: test_the_evaluation_commands"),
    (r"tensorboard --logdir outputs/dog$", "here: test_the_stable_diffusion_commands"),
    (r"cat > jobs\.jsonl <<'JOBS'$", "tests/test_batch.py::test_the_readme_batch_example_runs"),
    (
        r"gas-edit batch --config configs/shapes\.yaml --jobs jobs\.jsonl --output_dir outputs/batch$",
        "tests/test_batch.py::test_the_readme_batch_example_runs",
    ),
    # several GPUs and machines: parsed here (no GPUs); the same code paths run on CPU processes in test_batch
    (r"gas-edit batch --config configs/sd15\.yaml .*--trainer\.devices 4$", "parsed: test_the_cluster_commands_parse"),
    (r"torchrun --nnodes 2 ", "parsed: test_the_cluster_commands_parse"),
    (r"srun gas-edit batch ", "parsed: test_the_cluster_commands_parse"),
    (
        r"python tools/bench/benchmark\.py( --low_memory true| --arch sd15 --width_mult 0\.25 .*)?$",
        "here: test_the_cpu_benchmark_commands",
    ),
    (
        r"python tools/bench/benchmark\.py --arch sd15 --resolution 512 --device cuda ",
        "parsed: tests/test_benchmark.py::test_readme_benchmark_commands_parse (needs CUDA)",
    ),
]


def claim_of(command: str) -> str:
    found = [where for pattern, where in CLAIMS if re.match(pattern, command)]
    assert len(found) == 1, f"README command claimed {len(found)} times: {command}"
    return found[0]


def test_every_readme_command_is_run_somewhere():
    commands = fenced_commands()
    assert len(commands) >= 6, commands  # the README's own; the docs pages' are claimed in tests/test_docs.py
    claims = {command: claim_of(command) for command in commands}
    everywhere = commands + [c for text in DOCS.values() for c in fenced_commands(text)]
    unused = [pattern for pattern, _ in CLAIMS if not any(re.match(pattern, c) for c in everywhere)]
    assert unused == [], f"claims for commands neither the README nor the docs have: {unused}"
    here = {name for name, obj in globals().items() if name.startswith("test_") and callable(obj)}
    for command, where in claims.items():
        for ref in re.findall(r"(?:here|parsed): (test_\w+)", where):
            assert ref in here, (command, ref)
        for path, name in re.findall(r"(tests/\w+\.py)::(test_\w+)", where):
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), (command, path, name)
    assert len(python_blocks()) == 2  # the five-line example (tests/test_api.py) and the one below


def test_fenced_commands_reads_continuations_comments_and_heredocs():
    text = (
        "```bash\n# a comment\ngas-edit --a 1 \\\n  --b '[x, y]'   # trailing\n"
        'cat > f <<\'END\'\n{"not": "a command"}\nEND\nls\n```\n```python\nprint(1)\n```\n'
    )
    assert fenced_commands(text) == ["gas-edit --a 1 --b '[x, y]'", "cat > f <<'END'", "ls"]


def test_the_set_up_and_test_commands_are_what_ci_runs():
    """The README's set-up and test commands are the ones .ci/run executes on a fresh clone."""
    ci = (REPO / ".ci" / "run").read_text()
    quick = section("Quick start")
    setup, test = fenced_commands(quick)[1:3]
    assert "apt-get install -y -qq chromium chromium-driver" in ci and "chromium chromium-driver" in setup
    assert re.search(r"pip install .*-e \"\.\[test,app\]\"", ci) and setup.endswith('pip install -e ".[test,app]"')
    assert ci.rstrip().splitlines()[-1] == test == "python3 -m pytest -q"


def test_the_stable_diffusion_commands(workdir, tiny_sd, recwarn):
    """'Editing your own images': the four plan forms, as written, on a tiny random SD 1.5 layout
    (`--model` added: no weights can be downloaded) for 2 steps; then `tensorboard` reads the run."""
    commands = [c for c in fenced_commands(section("Editing your own images")) if "configs/sd15.yaml" in c]
    assert len(commands) == 4
    for command in commands:
        gas_edit(*argv_of(command), "--model", tiny_sd, *STEPS)
    plans = [
        json.loads((workdir / "outputs" / name / "plan.json").read_text()) for name in ("dog", "dog2", "dog3", "dog4")
    ]
    assert [s["target"] for s in plans[0]["subtasks"]] == ["a cat", "snow", "an igloo"]
    assert {s["target"] for s in plans[1]["subtasks"]} == {"a cat", "the snow", "an igloo"}
    assert [s["preserve_form"] for s in plans[2]["subtasks"]] == [True, False]
    assert plans[3]["subtasks"] == plans[0]["subtasks"]  # the saved plan, run again
    for name in ("dog", "dog2", "dog3", "dog4"):
        width, height = Image.open(workdir / "outputs" / name / "edited.png").size  # the working size (README)
        assert abs(width / height - 96 / 80) < 0.1
    # sd15.yaml's 16-mixed is CUDA autocast: on the CPU the edit runs in 32-true, not Lightning's bf16 swap
    assert not [w for w in recwarn if "precision" in str(w.message)], [str(w.message) for w in recwarn]

    tensorboard = next(
        c for c in fenced_commands(section("Watching, stopping, resuming")) if c.startswith("tensorboard ")
    )
    proc = subprocess.run([*shlex.split(tensorboard), "--inspect"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^scalars\b", proc.stdout, re.M) and "subtask0_the-dog/grad_norm" in proc.stdout, proc.stdout[
        -2000:
    ]


def test_the_single_file_command(workdir):
    """The single-file SDXL command as written, on a tiny random SDXL saved in the original
    checkpoint layout. `hf download` is not run (no hub here): the folder it would fetch, the model's
    configs and tokenizers without weights, is written in its place."""
    from test_single_file import config_folder, write_single_file

    from gas_lightning.testing import build_tiny_sdxl

    commands = fenced_commands(section("Editing your own images"))
    download = shlex.split(next(c for c in commands if c.startswith("hf download")))
    command = next(c for c in commands if "--model_config" in c)
    folder = build_tiny_sdxl(workdir / "tiny-sdxl")
    write_single_file(folder, workdir / "my-finetune.safetensors")
    config_folder(folder, workdir / download[download.index("--local-dir") + 1])
    gas_edit(*argv_of(command), "--output_dir", "outputs/single", *STEPS)
    assert torch.load(workdir / "outputs" / "single" / "latent.pt")["step"] == 2


def test_the_python_api_with_a_model_loaded_once(workdir, tiny_sd, monkeypatch):
    """The README's second Python block, with /models/sd15 pointing at the tiny model and 2 steps."""
    import gas_lightning

    block = python_blocks()[1]
    assert '"/models/sd15"' in block
    for name in ("dog.png", "cat.png"):
        Image.open(workdir / "dog.png").save(workdir / name)
    loads = []
    real_load = gas_lightning.load_model
    monkeypatch.setattr(gas_lightning, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(gas_lightning, "edit", partial(gas_lightning.edit, steps=2))
    exec(compile(block.replace('"/models/sd15"', repr(tiny_sd)), "README.md", "exec"), {})
    assert len(loads) == 1
    for name in ("dog", "cat"):
        plan = json.loads((workdir / "outputs" / name / "plan.json").read_text())
        assert plan["subtasks"][0]["box"] == [0, 0.6, 1, 1]


def test_the_grounding_and_llm_commands(workdir, tiny_gdino, monkeypatch):  # noqa: F811
    """Detected boxes and the LLM planner, as written: the detector is a random GroundingDINO (its
    scores are near zero, hence zero thresholds) and the endpoint a local mock of OpenAI's."""
    commands = fenced_commands(section("Grounding and LLM planning"))
    detect = next(c for c in commands if "--detector IDEA-Research/grounding-dino-tiny" in c and "--planner" not in c)
    thresholds = ["--box_threshold", "0", "--text_threshold", "0"]
    gas_edit(*argv_of(detect.replace("IDEA-Research/grounding-dino-tiny", str(tiny_gdino))), *thresholds)
    plan = json.loads((workdir / "outputs" / "dog" / "plan.json").read_text())
    assert len(plan["subtasks"]) == 2 and all(len(s["box"]) == 4 for s in plan["subtasks"])

    export = next(c for c in commands if c.startswith("export OPENAI_API_KEY="))
    llm = next(c for c in commands if "--planner llm" in c)
    server = ChatServer()
    try:
        key = "sk-test-" + "k" * 20
        monkeypatch.setenv(export.split()[1].split("=")[0], key)
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)  # the endpoint: a local mock, not api.openai.com
        server.script = [
            (
                "reply",
                json.dumps(
                    {
                        "source_prompt": "a dog under a blue sky",
                        "target_prompt": "a tiger under a stormy sky",
                        "source_phrases": ["a dog", "the sky"],
                        "target_phrases": ["a tiger", "a stormy sky"],
                        "preserve_form": [1, 0],
                    }
                ),
            )
        ]
        gas_edit(
            *argv_of(llm.replace("IDEA-Research/grounding-dino-tiny", str(tiny_gdino))),
            *thresholds,
            "--output_dir",
            "outputs/llm",
        )
        body = json.loads(server.requests[0]["body"])
        assert body["model"] == "gpt-4o-mini" and "tiger" in json.dumps(body)
    finally:
        server.close()
    plan = json.loads((workdir / "outputs" / "llm" / "plan.json").read_text())
    assert [s["target"] for s in plan["subtasks"]] == ["a tiger", "a stormy sky"]
    assert all(key not in p.read_text(errors="replace") for p in (workdir / "outputs" / "llm").iterdir() if p.is_file())


def test_the_mask_commands(workdir, tiny_sd, tiny_gdino, tiny_sam):  # noqa: F811
    """'Masks instead of boxes': the per-subtask PNGs as written; each `gas-edit ...` fragment with the
    first command's model, image and request; the SAM line with random SAM and GroundingDINO."""
    commands = [c for c in fenced_commands(section("Masks instead of boxes")) if c.startswith("gas-edit")]
    assert len(commands) == 4
    first, labels, segment, world = commands
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (30, 36, 62, 76))
    mask.save(workdir / "dog_mask.png")
    label_map = Image.new("L", (96, 80), 2)  # grass everywhere ...
    label_map.paste(1, (30, 36, 62, 76))  # ... but the dog
    label_map.save(workdir / "labels.png")

    base = argv_of(first)
    gas_edit(*base, "--model", tiny_sd, *STEPS)
    base = drop(base, "--masks", "--boxes", "--output_dir")
    gas_edit(*base, *argv_of(labels)[1:], "--output_dir", "outputs/labels", "--model", tiny_sd, *STEPS)
    segment_argv = argv_of(segment)[1:]
    segment_argv = [
        str(tiny_gdino) if a == "/models/grounding-dino-tiny" else tiny_sam if a == "/models/sam-vit-base" else a
        for a in segment_argv
    ]
    gas_edit(
        *base,
        *segment_argv,
        "--box_threshold",
        "0",
        "--text_threshold",
        "0",
        "--output_dir",
        "outputs/sam",
        "--model",
        tiny_sd,
        *STEPS,
    )
    gas_edit(*argv_of(world), "--output_dir", "outputs/world", *STEPS, "--lr_scheduler.T_max", "2")

    for name, expect_masks in (("dog5", [True, False]), ("labels", [True, True]), ("sam", [True, True])):
        plan = json.loads((workdir / "outputs" / name / "plan.json").read_text())
        assert [bool(s.get("mask")) for s in plan["subtasks"]] == expect_masks, name
    world_plan = json.loads((workdir / "outputs" / "world" / "plan.json").read_text())
    assert any(s.get("mask") for s in world_plan["subtasks"])


def test_the_evaluation_commands(workdir, monkeypatch):
    """The masks-against-boxes evaluation, as written but for 1 case of 2 steps, and its summary."""
    import eval_world
    import summarize_eval

    commands = fenced_commands(section("Masks instead of boxes"))
    evals = [c for c in commands if "tools/world/eval_world.py" in c]
    summary = next(c for c in commands if "tools/world/summarize_eval.py" in c)
    assert len(evals) == 2
    for command in evals:
        words = shlex.split(command)
        assert words[:4] == ["nice", "-n", "10", "python"]
        assert eval_world.main([*words[5:], "--cases", "1", "--steps", "2"]) == 0
    assert summarize_eval.main(shlex.split(summary)[2:]) == 0
    rows = [json.loads(line) for line in (workdir / "runs" / "val2_masks.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["gas+masks"]


def test_the_cluster_commands_parse(monkeypatch):
    """Several GPUs and machines cannot run here: their arguments must still parse, as `gas-edit
    batch` parses them (the launcher, torchrun and SLURM paths run on CPU processes in test_batch)."""
    from gas_lightning.batch import build_parser

    monkeypatch.chdir(REPO)
    parser = build_parser()
    commands = [c for c in fenced_commands(section("Many edits: gas-edit batch")) if "--trainer.devices 4" in c]
    assert len(commands) == 3
    for command in commands:
        words = shlex.split(command)
        args = words[words.index("batch") + 1 :]
        cfg = parser.parse_args(args)
        assert str(cfg.trainer.devices) == "4" and cfg.jobs == "jobs.jsonl"


def test_the_cpu_benchmark_commands(tmp_path):
    """The three CPU benchmark lines as written, each shortened to one repeat of 2 steps."""
    import benchmark

    commands = [
        c
        for c in fenced_commands(section("Speed and memory"))
        if c.startswith("python tools/bench/benchmark.py") and "--device cuda" not in c
    ]
    assert len(commands) == 3
    for k, command in enumerate(commands):
        out = tmp_path / f"bench{k}.json"
        argv = shlex.split(command)[2:] + ["--steps", "2", "--warmup", "1", "--repeats", "1", "--json", str(out)]
        assert benchmark.main(argv) == 0
        result = json.loads(out.read_text())
        assert (
            result["ratio"] > 0 and result["batched"]["unet_samples_per_step"] == 10
        )  # 2 null + 2 x (3 subtasks + the whole scene)


def test_inline_tool_commands_parse(monkeypatch):
    """Commands quoted in the README's prose (reproduction commands of its numbers): each tool must
    accept their arguments. Parsing stops before any work."""
    prose = re.sub(r"```.*?```", "", "\n".join((README, *DOCS.values())), flags=re.S)
    spans = list(dict.fromkeys(" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)))  # each once
    tools = [s for s in spans if re.match(r"(nice -n \d+ )?python3? tools/\w+/\w+\.py ", s)]
    assert len(tools) >= 5, tools
    parse_tool_commands(tools, monkeypatch)


class Parsed(Exception):
    """Raised where a tool would start its work: its arguments have parsed."""


def parse_tool_commands(commands: list[str], monkeypatch) -> None:
    """Each `python tools/...` command through its tool's own argument parser, stopped before any work
    (`--help` prints and exits 0); leading VAR=value settings and `nice -n N` are dropped."""
    import argparse

    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for command in commands:
        words = shlex.split(command)
        while "=" in words[0]:
            words.pop(0)
        words = words[3:] if words[0] == "nice" else words
        module = __import__(Path(words[1]).stem)
        with pytest.raises(SystemExit if "--help" in words else Parsed) as stop:
            module.main(words[2:])
        assert not isinstance(stop.value, SystemExit) or stop.value.code == 0, command
