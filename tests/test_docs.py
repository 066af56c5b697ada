"""The docs site's pages: every command in them is run or parsed by a named test, as the README's are.

A command that a README claim in tests/test_readme.py covers runs there, once (those tests read
their sections from the README or from the docs page the section moved to). The rest are claimed
here. Study commands that take hours (the narratives' eval_world runs) are parsed by the tool's own
argument parser and stopped before any work, as the README's prose commands are.
"""

from __future__ import annotations

import re

from test_readme import CLAIMS, DOCS, README, REPO, fenced_commands, parse_tool_commands, python_blocks

DOCS_CLAIMS = [
    (r'pip install -e "\.\[docs\]" && mkdocs build --strict$', "here: test_the_docs_build_is_what_ci_runs"),
    # the narratives' study runs (hours each): parsed by the tool, stopped before any work
    (r"(OMP_NUM_THREADS=1 )?(nice -n 10 )?python3? tools/(world|bench)/\w+\.py ", "parsed: test_docs_tool_commands_parse"),
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
        local = where.startswith(("here", "parsed"))
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


def test_docs_tool_commands_parse(monkeypatch):
    """The narratives' study commands (hours of editing each): the tool's parser must accept them."""
    commands = [c for cs in docs_commands().values() for c in cs
                if TOOL.match(c) and docs_claim(c) == "parsed: test_docs_tool_commands_parse"]
    assert len(commands) >= 5, commands
    parse_tool_commands(list(dict.fromkeys(commands)), monkeypatch)


def test_every_readme_section_link_lands_on_the_site():
    """Links from the README into the docs point at pages that exist."""
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (REPO / target).is_file(), target
