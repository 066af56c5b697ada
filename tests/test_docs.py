"""The docs site's pages: every command in them is run or parsed by a named test, as the README's are.

A command that a README claim in tests/test_readme.py covers runs there, once (those tests read
their sections from the README or from the docs page the section moved to). The rest are claimed
here. Study commands that take hours (the narratives' eval_world runs) are parsed by the tool's own
argument parser and stopped before any work, as the README's prose commands are.
"""

from __future__ import annotations

import json
import math
import re
import sys
from statistics import mean

from test_readme import CLAIMS, DOCS, README, REPO, fenced_commands, parse_tool_commands, python_blocks

DOCS_CLAIMS = [
    (r'pip install -e "\.\[docs\]" && mkdocs build --strict$', "here: test_the_docs_build_is_what_ci_runs"),
    (r"python tools/results/tables\.py$", "here: test_the_published_tables_are_their_records (its --check)"),
    (r'gas-edit --config "\$\(python -c ', ".ci/wheel_check, here: test_the_wheel_command_is_what_ci_runs"),
    # the narratives' study runs (hours each): parsed by the tool, stopped before any work
    (
        r"(OMP_NUM_THREADS=1 )?(nice -n 10 )?python3? tools/(world|bench)/\w+\.py ",
        "parsed: test_docs_tool_commands_parse",
    ),
]
TOOL = re.compile(r"(OMP_NUM_THREADS=1 )?(nice -n 10 )?python3? tools/(world|bench)/\w+\.py ")


def docs_claim(command: str) -> str:
    """The README's claim when one covers the command (it runs there), else exactly one of ours."""
    readme = [where for pattern, where in CLAIMS if re.match(pattern, command)]
    if readme:
        assert len(readme) == 1, f"docs command claimed {len(readme)} times: {command}"
        return "tests/test_readme.py: " + readme[0]
    found = [where for pattern, where in DOCS_CLAIMS if re.match(pattern, command)]
    assert len(found) == 1, f"docs command claimed {len(found)} times: {command}"
    return found[0]


def docs_commands() -> dict[str, list[str]]:
    return {page: fenced_commands(text) for page, text in DOCS.items()}


def test_every_docs_command_is_run_somewhere():
    pages = docs_commands()
    commands = [c for cs in pages.values() for c in cs]
    assert len(commands) >= 30, pages  # the user guide's commands moved from the README are among them
    claims = {command: docs_claim(command) for command in commands}
    unused = [pattern for pattern, _ in DOCS_CLAIMS if not any(re.match(pattern, c) for c in commands)]
    assert unused == [], f"claims for commands no docs page has: {unused}"
    here = {name for name, obj in globals().items() if name.startswith("test_") and callable(obj)}
    import test_readme

    readme_tests = {name for name in dir(test_readme) if name.startswith("test_")}
    for command, where in claims.items():
        local = not where.startswith("tests/test_readme.py: ")
        for ref in re.findall(r"(?:here|parsed): (test_\w+)", where):
            assert ref in (here if local else readme_tests), (command, ref)


def test_docs_python_blocks_run_in_the_readme_tests():
    """Each Python block of the docs is one the README's tests run (tests/test_api.py runs the first,
    test_readme the second); a new one needs a test of its own."""
    readme_blocks = python_blocks()
    for page, text in DOCS.items():
        for block in re.findall(r"```python\n(.*?)```", text, re.S):
            assert block in readme_blocks, (page, block)


def test_the_docs_build_is_what_ci_runs():
    """The contributing page's build command is the one .ci/run runs (strict: a broken link or a
    missing API object fails CI)."""
    ci = (REPO / ".ci" / "run").read_text()
    command = next(c for c in docs_commands()["docs/contributing.md"] if "mkdocs" in c)
    install, build = command.split(" && ")
    assert build == "mkdocs build --strict" and build in ci
    assert re.search(r'pip install .*"\.\[[a-z,]*docs[a-z,]*\]"', ci), ci
    assert re.search(r"^docs = \[.*mkdocs", (REPO / "pyproject.toml").read_text(), re.M)


def test_the_wheel_command_is_what_ci_runs():
    """The install page's command for the installed wheel is the one .ci/wheel_check runs there, and
    .ci/run runs that check."""
    command = next(c for c in docs_commands()["docs/guide/install.md"] if "resolve_bundled" in c)
    inner = re.search(r'python -c "(.*)"\)"$', command).group(1)
    check = (REPO / ".ci" / "wheel_check").read_text()
    assert inner in check and '"$work/venv/bin/gas-edit" --config "$preset"' in check
    assert "bash .ci/wheel_check" in (REPO / ".ci" / "run").read_text()


def test_docs_tool_commands_parse(monkeypatch):
    """The narratives' study commands (hours of editing each): the tool's parser must accept them."""
    commands = [
        c
        for cs in docs_commands().values()
        for c in cs
        if TOOL.match(c) and docs_claim(c) == "parsed: test_docs_tool_commands_parse"
    ]
    assert len(commands) >= 5, commands
    parse_tool_commands(list(dict.fromkeys(commands)), monkeypatch)


def test_every_readme_section_link_lands_on_the_site():
    """Links from the README into the docs point at pages that exist."""
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (REPO / target).is_file(), target


sys.path.insert(0, str(REPO / "tools" / "results"))
import tables  # noqa: E402  (tools/results/tables.py)


def test_the_published_tables_are_their_records(capsys):
    """Every generated table in the README and the docs is what its records give now."""
    assert tables.main(["--check"]) == 0, capsys.readouterr().out


def row_of(table: str, label_start: str) -> list[str]:
    line = next(row for row in table.splitlines() if row.startswith("| " + label_start))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_table_generator_reads_the_records():
    """A few cells worked out from the record files directly, without summarize_eval."""
    cases = [
        json.loads(line)
        for line in (REPO / "results/world/world_eval_seeds_112_114_cases.jsonl").read_text().splitlines()
    ]
    preset = [c for c in cases if c["method"] == "gas_target_balance+masks_same_outline"]
    per_seed = [mean(c["all_attributes"] for c in preset if c["seed"] == s) for s in (112, 113, 114)]
    outside = mean(c["psnr_outside"] for c in preset if math.isfinite(c["psnr_outside"]))
    row = row_of(tables.TABLES["world-preset-112-114"](), "**the preset**")
    assert row[1] == " / ".join(f"{v:.2f}" for v in per_seed)
    assert row[2].startswith(f"{mean(per_seed):.3f} (")
    assert row[7] == f"{outside:.1f} dB"

    fp16 = json.loads((REPO / "results/gpu/fp16.json").read_text())
    row = row_of(tables.gpu_h200(), "SD 1.5, 512 px, fp16 weights")
    assert abs(float(row[3]) - fp16["sequential"]["s_per_step"] / fp16["batched"]["s_per_step"]) < 0.01
    assert row[4] == f"{500 * fp16['batched']['s_per_step']:.1f}"


def test_the_import_graph_reads_function_level_and_relative_imports(tmp_path):
    """On a package written here: a top-level, a function-level and a relative import, and one loop."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\nimport os\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import thing\n    return thing\n")
    (pkg / "c.py").write_text("from .a import thing\nfrom . import b\n")
    text = tables.imports(pkg)
    assert row_of(text, "`pkg.a`") == ["`pkg.a`", "`b`"]
    assert row_of(text, "`pkg.b`") == ["`pkg.b`", "`a`"]
    assert row_of(text, "`pkg.c`") == ["`pkg.c`", "`a`, `b`"]
    assert "round a loop): `pkg.a` / `pkg.b`." in text


def test_the_results_index_commands_parse(monkeypatch):
    """results/README.md (shown in the site by a snippet) names the command behind each record."""
    text = (REPO / "results" / "README.md").read_text()
    spans = dict.fromkeys(" ".join(s.split()) for s in re.findall(r"`([^`]+)`", text))
    commands = [s for s in spans if TOOL.match(s)]
    assert len(commands) >= 15, commands
    parse_tool_commands(commands, monkeypatch)


def test_every_tool_has_a_docstring_and_a_line_in_the_index():
    """tools/README.md (shown on the contributing page) names every tool, and each says what it is for."""
    import ast

    index = (REPO / "tools" / "README.md").read_text()
    tools = sorted(p for p in (REPO / "tools").rglob("*") if p.suffix in (".py", ".sh"))
    assert len(tools) >= 15, tools
    for path in tools:
        name = path.relative_to(REPO).as_posix()
        assert f"`{name}`" in index, name
        text = path.read_text()
        said = ast.get_docstring(ast.parse(text)) if path.suffix == ".py" else text.splitlines()[1]
        assert said and said.strip("# ").strip(), name


def test_the_import_graph_names_imports_against_the_flow(tmp_path):
    """A package laid out as gas_lightning's stages, whose plan imports the API above it."""
    pkg = tmp_path / "gas_lightning"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "plan.py").write_text("def f():\n    from gas_lightning.api import edit\n")  # a stage-1 module
    (pkg / "api.py").write_text("from gas_lightning.plan import f\n")  # the top stage
    (pkg / "extra.py").write_text("")
    text = tables.imports(pkg)
    assert "against the flow): `plan` -> `api`." in text
    assert "Modules in no stage: `gas_lightning.extra`." in text


def test_the_readme_is_a_short_door_into_the_docs():
    """At most 300 lines, and every code block it shows is one the docs hold verbatim, where the
    tests run it (tests/test_readme.py runs the docs pages' sections), so the two cannot drift apart."""
    assert len(README.splitlines()) <= 300
    docs = "\n".join(DOCS.values())
    blocks = re.findall(r"```(?:bash|python)\n(.*?)```", README, re.S)
    assert len(blocks) >= 6, blocks
    for block in blocks:
        assert block in docs, block
