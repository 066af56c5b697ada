"""gas-edit batch on a tiny random model: the jobs file, one edit per job as gas-edit makes it, failures
that do not stop the rest, reruns that skip finished jobs, and two processes (gloo) that give each
job the latent one process gives it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gas_lightning.cli import main
from gas_lightning.errors import GasError
from gas_lightning.jobs import MAX_LINE_BYTES, read_jobs

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
REQUEST = "change the red block into a yellow block. change the grass into snow."
BOXES = [[0.05, 0.05, 0.45, 0.5], [0.0, 0.0, 1.0, 1.0]]


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def write_jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def batch_args(model: str, jobs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "batch",
        "--config",
        TINY,
        "--model",
        model,
        "--jobs",
        str(jobs),
        "--output_dir",
        str(out),
        "--trainer.max_steps",
        "2",
        *extra,
    ]


def latent(folder: Path) -> torch.Tensor:
    return torch.load(folder / "latent.pt", weights_only=True)["latent"]


# the jobs file ---------------------------------------------------------------------------------
GOOD = {"name": "a", "image": "x.png", "request": "change the dog into a cat."}


@pytest.mark.parametrize(
    "line, message",
    [
        ("[1, 2]", "is a JSON list, not an object"),
        ('{"name": "a",', "is not valid JSON"),
        ('{"name": "a", "name": "b", "image": "x.png", "request": "r"}', "appears twice"),
        (json.dumps({**GOOD, "seed": 1}).replace("1}", "NaN}"), "NaN is not a JSON number"),
        (json.dumps({**GOOD, "name": "../up"}), "must be a folder name"),
        (json.dumps({**GOOD, "name": "a/b"}), "must be a folder name"),
        (json.dumps({**GOOD, "name": ".."}), "must be a folder name"),
        (json.dumps({**GOOD, "name": "summary.json"}), "must be a folder name"),
        (json.dumps({**GOOD, "name": 3}), "must be a folder name"),
        (json.dumps({"name": "a", "request": "change a into b."}), '"image" must name'),
        (json.dumps({"name": "a", "image": "x.png"}), "no edit given"),
        (json.dumps({**GOOD, "source": "a dog", "target": "a cat"}), "request and source+target given"),
        (json.dumps({"name": "a", "image": "x.png", "source": "a dog"}), "'target' is missing"),
        (
            json.dumps({**GOOD, "model": "other"}),
            "'model' cannot be set per job; set it for the whole batch with --model",
        ),
        (json.dumps({**GOOD, "output_dir": "/tmp"}), "'output_dir' cannot be set per job"),
        (json.dumps({**GOOD, "trainer": {"devices": 2}}), "trainer.devices cannot be set per job"),
        (json.dumps({**GOOD, "seed": "1"}), '"seed" must be an integer'),
        (json.dumps({**GOOD, "seed": True}), '"seed" must be an integer'),
    ],
)
def test_a_bad_line_is_one_error_naming_the_line(tmp_path, line, message):
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({**GOOD, "name": "first"}) + "\n\n" + line + "\n")
    with pytest.raises(GasError) as e:
        read_jobs(path)
    assert f"{path}, line 3" in str(e.value) and message in str(e.value), str(e.value)


def test_names_unique_lines_bounded_keys_known_paths_beside_the_file(tmp_path):
    path = write_jobs(tmp_path / "jobs.jsonl", [GOOD, {**GOOD, "name": "A"}])
    with pytest.raises(GasError, match="line 2: the name 'A' is already used on line 1"):
        read_jobs(path)
    path.write_text(json.dumps({**GOOD, "request": "x" * MAX_LINE_BYTES}) + "\n")
    with pytest.raises(GasError, match="line 1 is longer than 64 KiB"):
        read_jobs(path)
    path.write_bytes(b'{"name": "a", "image": "\xff"}\n')
    with pytest.raises(GasError, match="line 1 is not UTF-8"):
        read_jobs(path)
    from gas_lightning.runner import build_parser

    known = build_parser(exit_on_error=False).get_defaults()
    write_jobs(path, [{**GOOD, "guidance": {"guidance_scal": 7.5}}])
    with pytest.raises(GasError, match="line 1: unknown key 'guidance.guidance_scal'"):
        read_jobs(path, known=known)
    write_jobs(
        path,
        [
            {
                **GOOD,
                "plan": None,
                "guidance": {"guidance_scale": 7.5},
                "trainer": {"max_steps": 3},
                "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.1}},
            },
            {"name": "b-2.x_y", "image": "/abs/y.png", "plan": "sub/plan.json"},
        ],
    )
    jobs = read_jobs(path, known=known)
    assert [(j.name, j.line) for j in jobs] == [("a", 1), ("b-2.x_y", 2)]
    assert jobs[0].settings["image"] == str(tmp_path / "x.png")  # relative to the jobs file's folder
    assert jobs[1].settings == {"image": "/abs/y.png", "plan": str(tmp_path / "sub" / "plan.json")}
    with pytest.raises(GasError, match="no such file"):
        read_jobs(tmp_path / "none.jsonl")


def test_a_bad_jobs_file_stops_the_batch_with_exit_2(tiny_sd, tmp_path, capsys):
    path = write_jobs(tmp_path / "jobs.jsonl", [GOOD, {**GOOD, "nme": "typo"}])
    assert run_cli(batch_args(tiny_sd, path, tmp_path / "out")) == 2
    assert "line 2: unknown key 'nme'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# one process -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch_run(tiny_sd, tmp_path_factory):
    """Two good jobs and three that fail (missing image, bad plan, no box found), in one batch."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("batch")
    image = tmp / "input.png"
    im = Image.new("RGB", (48, 40), (90, 160, 60))
    im.paste((200, 40, 40), (4, 4, 20, 20))
    im.save(image)
    (tmp / "bad_plan.json").write_text('{"subtasks": [{"source": "a dog"}]}')
    jobs = write_jobs(
        tmp / "jobs.jsonl",
        [
            {
                "name": "req",
                "image": "input.png",
                "request": REQUEST,
                "boxes": BOXES,
                "seed": 3,
                "preserve_form": [1, 0],
            },
            {"name": "missing", "image": "nowhere.png", "request": REQUEST, "boxes": BOXES},
            {
                "name": "sentences",
                "image": "input.png",
                "source": "a red block on grass",
                "target": "a blue block on sand",
                "boxes": [BOXES[0], [0.0, 0.6, 1.0, 1.0]],
                "guidance": {"guidance_scale": 3.0},
            },
            {"name": "badplan", "image": "input.png", "plan": "bad_plan.json"},
            {
                "name": "nobox",
                "image": "input.png",
                "request": "change the purple triangle into a red circle.",
                "detector": "world",
            },
        ],
    )
    out = tmp / "out"
    code = run_cli(batch_args(tiny_sd, jobs, out))
    return code, out, jobs, str(image)


def test_failed_jobs_are_recorded_and_the_rest_go_on(batch_run, capsys):
    code, out, _, _ = batch_run
    assert code == 1  # some jobs failed
    summary = json.loads((out / "summary.json").read_text())
    status = {r["job"]: r["status"] for r in summary["jobs"]}
    assert status == {"req": "ok", "missing": "failed", "sentences": "ok", "badplan": "failed", "nobox": "failed"}
    errors = {r["job"]: r["error"] for r in summary["jobs"]}
    assert "nowhere.png' does not exist" in errors["missing"]
    assert "subtask 0 needs both 'source' and 'target'" in errors["badplan"]
    assert "found no 'the purple triangle'" in errors["nobox"]
    assert all("\n" not in e for e in errors.values() if e)
    assert (summary["ok"], summary["failed"]) == (2, 3)
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["req", "missing", "sentences", "badplan", "nobox"]  # the file's order
    assert set(rows[0]) >= {"job", "status", "seconds", "output", "psnr_outside", "ssim_outside", "error"}
    assert rows[0]["psnr_outside"] == "" and float(rows[0]["outside_fraction"]) == 0.0  # a whole-image box
    assert 0 < float(rows[2]["psnr_outside"]) <= 100 and 0 < float(rows[2]["outside_fraction"]) < 1
    assert rows[1]["psnr_outside"] == "" and rows[1]["seconds"] != ""
    assert rows[0]["output"] == str(out / "req")


def test_each_job_writes_what_a_single_gas_edit_writes(batch_run, tiny_sd, tmp_path):
    _, out, _, image = batch_run
    single = tmp_path / "single"
    assert (
        run_cli(
            [
                "--config",
                TINY,
                "--model",
                tiny_sd,
                "--image",
                image,
                "--request",
                REQUEST,
                "--boxes",
                json.dumps(BOXES),
                "--seed",
                "3",
                "--trainer.max_steps",
                "2",
                "--output_dir",
                str(single),
            ]
        )
        == 0
    )
    assert torch.equal(latent(out / "req"), latent(single))

    def files(folder: Path) -> set[str]:  # TensorBoard names its event file by time and process
        return {"events" if p.name.startswith("events.out.tfevents") else p.name for p in folder.iterdir()}

    assert files(out / "req") == files(single) | {"metrics.json", "job.json"}
    assert {p.name for p in (out / "req" / "checkpoints").iterdir()} == {
        p.name for p in (single / "checkpoints").iterdir()
    }
    assert json.loads((out / "req" / "plan.json").read_text()) == json.loads((single / "plan.json").read_text())
    # config.yaml repeats the job as one gas-edit; the per-job override reached it
    cfg = yaml.safe_load((out / "sentences" / "config.yaml").read_text())
    assert cfg["guidance"]["guidance_scale"] == 3.0 and cfg["source"] == "a red block on grass"
    assert cfg["trainer"]["devices"] == 1 and cfg["trainer"]["enable_progress_bar"] is False
    metrics = json.loads((out / "req" / "metrics.json").read_text())
    assert set(metrics) == {"psnr_outside", "ssim_outside", "outside_fraction"}
    assert metrics["outside_fraction"] == 0.0  # the grass box covers the whole image
    assert metrics["psnr_outside"] is None


def test_a_rerun_skips_finished_jobs_and_redoes_changed_or_unfinished_ones(batch_run, tiny_sd, monkeypatch):
    code, out, jobs, _ = batch_run
    import gas_lightning.runner as runner

    ran: list[str] = []
    real = runner.run_edit

    def counting(cfg, *a, **k):
        ran.append(Path(cfg.output_dir).name)
        return real(cfg, *a, **k)

    monkeypatch.setattr(runner, "run_edit", counting)
    first = latent(out / "req")
    assert run_cli(batch_args(tiny_sd, jobs, out)) == 1
    assert ran == ["missing", "badplan", "nobox"]  # failed jobs are tried again, finished ones not
    reused = {r["job"]: r["reused"] for r in csv.DictReader(open(out / "summary.csv"))}
    assert reused == {"req": "True", "missing": "False", "sentences": "True", "badplan": "False", "nobox": "False"}

    # a kill in the middle of "sentences" (its job.json is removed first) and a changed seed for "req"
    (out / "sentences" / "job.json").unlink()
    lines = jobs.read_text().splitlines()
    lines[0] = lines[0].replace('"seed": 3', '"seed": 4')
    jobs.write_text("\n".join(lines[:1] + lines[2:3]) + "\n")  # only the two good jobs this time
    ran.clear()
    assert run_cli(batch_args(tiny_sd, jobs, out)) == 0
    assert ran == ["req", "sentences"]
    assert not torch.equal(latent(out / "req"), first)
    ran.clear()
    assert run_cli(batch_args(tiny_sd, jobs, out)) == 0
    assert ran == []


# two processes ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def four_jobs(tiny_sd, tmp_path_factory):
    """4 jobs, run once in one process: the reference every launcher's two processes must match."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("four")
    Image.new("RGB", (48, 40), (90, 160, 60)).save(tmp / "input.png")
    jobs = write_jobs(
        tmp / "jobs.jsonl",
        [
            {
                "name": f"j{k}",
                "image": "input.png",
                "request": REQUEST,
                "boxes": BOXES,
                "seed": k,
                "preserve_form": [k % 2, 0],
            }
            for k in range(4)
        ],
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    args = [
        *batch_args(tiny_sd, jobs, tmp / "one"),
        "--trainer.callbacks+=batch_probe.InnerTrainerProbe",
        "--trainer.accelerator",
        "cpu",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "gas_lightning.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return args, env, tmp / "one"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, args: list[str], env: dict) -> list[subprocess.CompletedProcess]:
    """Two processes as Lightning's launcher, torchrun, or srun (its variables, on this machine) start them."""
    cli = ["-m", "gas_lightning.cli", *args, "--trainer.devices", "2"]
    if launcher == "lightning":
        return [subprocess.run([sys.executable, *cli], env=env, capture_output=True, text=True, timeout=600)]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cli]
        return [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)]
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NAME": "gas-batch",
        "SLURM_JOB_ID": "4242",
        "SLURM_NODELIST": "localhost",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, *cli],
            env={**env, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


@pytest.mark.parametrize("launcher", ["lightning", "torchrun", "slurm"])
def test_two_processes_give_every_job_the_latent_one_process_gives_it(four_jobs, launcher, tmp_path):
    """4 jobs over 2 CPU processes (gloo) against 1 process, bit for bit; each job's Trainer runs alone
    (one device, its own rank 0) while the processes' group of 2 stays as it was."""
    args, env, one = four_jobs
    out = tmp_path / "two"
    args = [a if a != str(one) else str(out) for a in args]
    for proc in _launch(launcher, args, env):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Epoch 0" not in proc.stderr  # no per-step bars from the inner Trainers
    for k in range(4):
        assert torch.equal(latent(one / f"j{k}"), latent(out / f"j{k}")), f"job j{k}"
    probes = {k: json.loads((out / f"j{k}" / "probe.json").read_text()) for k in range(4)}
    assert probes[0]["pid"] == probes[2]["pid"] != probes[1]["pid"] == probes[3]["pid"]  # jobs r, r + 2, ...
    for p in probes.values():
        assert (p["world_size"], p["global_rank"], p["strategy"]) == (1, 0, "SingleDeviceStrategy")
        assert p["outer_world"] == 2 and p["local_rank_env"] is None and p["rank_zero_only"] == 0
        assert p["cluster"] == "LightningEnvironment"  # not SLURM's (which would requeue the job on SIGUSR1)
    assert json.loads((one / "j0" / "probe.json").read_text())["outer_world"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert [r["job"] for r in summary["jobs"]] == ["j0", "j1", "j2", "j3"] and summary["ok"] == 4


def test_several_devices_are_refused_from_python(tiny_sd, image_file, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{**GOOD, "image": image_file, "boxes": [[0, 0, 1, 1]]}])
    assert (
        run_cli(batch_args(tiny_sd, jobs, tmp_path / "out", "--trainer.devices", "2", "--trainer.accelerator", "cpu"))
        == 2
    )
    assert "run gas-edit batch (or python -m gas_lightning.cli batch) from a shell" in capsys.readouterr().err


# the world's held-out cases as jobs ------------------------------------------------------------------
@pytest.mark.parametrize("masks", [False, True])
def test_a_world_case_through_batch_is_eval_worlds_edit(tmp_path, monkeypatch, masks):
    """tools/world/eval_world.py --write_jobs: the batch edits a case to the latent eval_world's edit_case gets."""
    import importlib.util
    from types import SimpleNamespace

    from gas_lightning.loading import load_backbone
    from gas_lightning.worlds import MODEL_DIR, held_out_cases

    spec = importlib.util.spec_from_file_location("eval_world", REPO / "tools" / "world" / "eval_world.py")
    eval_world = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "eval_world", eval_world)  # dataclasses look their module up there
    spec.loader.exec_module(eval_world)
    settings = {
        "steps": 6,
        "lr": 0.2,
        "lr_schedule": "cosine",
        "lr_final": 0.0,
        "loss_scale": 2000.0,
        "guidance_scale": 12.5,
        "seed": 5,
    }
    flags = [f"--{k}={v}" for k, v in settings.items()]
    jobs = tmp_path / "world" / "jobs.jsonl"
    jobs.parent.mkdir()
    assert (
        eval_world.main(
            [
                *flags,
                "--cases",
                "2",
                "--first_case",
                "1",
                "--methods",
                "gas,gas_penalty",
                "--write_jobs",
                str(jobs),
                *(["--masks"] if masks else []),
            ]
        )
        == 0
    )
    names = [json.loads(line)["name"] for line in jobs.read_text().splitlines()]
    tag = "_masks" if masks else ""
    assert names == [f"gas{tag}_s5_c001", f"gas_penalty{tag}_s5_c001"]
    plan = json.loads((jobs.parent / "plans" / f"gas_penalty{tag}_s5_c001.json").read_text())
    assert any("mask" in s for s in plan["subtasks"]) == masks
    one = jobs.parent / "one.jsonl"  # the penalty method: gas's settings plus a callback from the jobs file
    one.write_text(jobs.read_text().splitlines()[1] + "\n")
    out = tmp_path / "out"
    assert (
        run_cli(
            [
                "batch",
                "--model",
                "gas-lightning:shapes-model",
                "--attention",
                "sdpa",
                "--jobs",
                str(one),
                "--output_dir",
                str(out),
                "--trainer.accelerator",
                "cpu",
            ]
        )
        == 0
    )

    modules = []
    real = eval_world.build_edit
    monkeypatch.setattr(eval_world, "build_edit", lambda *a, **k: modules.append(real(*a, **k)) or modules[-1])
    args = SimpleNamespace(**settings, wide_guidance_scale=None, accelerator="cpu", masks="all" if masks else None)
    case = held_out_cases(2, seed=5)[1]
    eval_world.edit_case(
        load_backbone(str(MODEL_DIR), device="cpu", attention="sdpa"), case, eval_world.METHODS["gas_penalty"], args
    )
    assert torch.equal(modules[0].latent.detach(), latent(out / f"gas_penalty{tag}_s5_c001"))
    assert not torch.equal(modules[0].latent.detach(), modules[0].z_src)  # the edit moved


def test_the_readme_batch_example_runs(tmp_path):
    """README "Many edits": its jobs file and command, with 2 steps instead of 150."""
    pages = [(REPO / "README.md").read_text(), (REPO / "docs" / "guide" / "batch.md").read_text()]
    readme = next(text for text in pages if "## Many edits: gas-edit batch" in text)  # moved to the docs site
    section = readme[readme.index("## Many edits: gas-edit batch") :]
    block = section[section.index("cat > jobs.jsonl <<'JOBS'\n") + len("cat > jobs.jsonl <<'JOBS'\n") :]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(block[: block.index("JOBS\n")])
    command = section[section.index("gas-edit batch --config configs/shapes.yaml") :].splitlines()[0].split()
    assert command == [
        "gas-edit",
        "batch",
        "--config",
        "configs/shapes.yaml",
        "--jobs",
        "jobs.jsonl",
        "--output_dir",
        "outputs/batch",
    ]
    out = tmp_path / "out"
    assert (
        run_cli(
            [
                "batch",
                "--config",
                str(REPO / "configs" / "shapes.yaml"),
                "--jobs",
                str(jobs),
                "--output_dir",
                str(out),
                "--trainer.max_steps",
                "2",
                "--lr_scheduler.T_max",
                "2",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [r["job"] for r in summary["jobs"]] == ["yellow-circle", "grass"] and summary["ok"] == 2
    assert yaml.safe_load((out / "grass" / "config.yaml").read_text())["guidance"]["guidance_scale"] == 7.5
