"""How `gas-edit` explains itself: a short `--help`, and one line for a wrong flag.

jsonargparse lists every Trainer option (hundreds of lines) and prints the whole usage before an
error; a user needs the dozen options they set and, for a mistake, what to type instead.
"""

from __future__ import annotations

import difflib
import re
import textwrap

from gas_lightning.errors import GasError

METHOD_DOC = "docs/method.md"  # the method, in the project's docs
# What a user sets, grouped; every other option is in --help-all.
GROUPS = {
    "what to edit": (
        "--jobs",
        "--image",
        "--request",
        "--boxes",
        "--keep",
        "--keep_unmentioned",
        "--source",
        "--target",
        "--plan",
        "--detector",
        "--segmenter",
    ),
    "model": ("--model", "--config", "--solver", "--resolution", "--dtype"),
    "output": ("--output_dir", "--overwrite", "--plan_only"),
    "run": (
        "--trainer.max_steps",
        "--trainer.accelerator",
        "--seed",
        "--schedule",
        "--guidance.guidance_scale",
        "--resume",
        "--print_config",
        "--debug",
    ),
}
# Shorter words than the libraries' own for the options above that come from them.
TEXT = {
    "--trainer.max_steps": "optimisation steps (the bundled preset: 150; the reference: 500)",
    "--trainer.accelerator": "cpu, gpu or auto",
    "--guidance.guidance_scale": "classifier-free guidance scale (the reference: 7.5)",
    "--print_config": "print the whole config as YAML (a file for --config) and stop",
    "--keep_unmentioned": "keep every object the detector lists that the request does not name (default true)",
}
# Names users try that gas-edit spells otherwise.
ALIASES = {
    "--steps": "--trainer.max_steps",
    "--iterations": "--trainer.max_steps",
    "--lr": "--optimizer.lr",
    "--learning_rate": "--optimizer.lr",
    "--prompt": "--request",
    "--input": "--image",
    "--output": "--output_dir",
    "--out": "--output_dir",
    "--device": "--trainer.accelerator",
    "--gpu": "--trainer.accelerator",
    "--cfg": "--guidance.guidance_scale",
    "--scale": "--guidance.guidance_scale",
}


def _options(parser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def suggest(parser, flag: str) -> str | None:
    """The option a mistyped `flag` most likely meant: a known alias, an option ending in `.flag`
    (--max_steps -> --trainer.max_steps), or the closest spelling."""
    options = _options(parser)
    name = flag.split("=", 1)[0]
    if name in ALIASES and ALIASES[name].split(".")[0] in {o.split(".")[0] for o in options}:
        return ALIASES[name]
    tail = [o for o in options if o.endswith("." + name[2:])]
    if tail:
        return min(tail, key=len)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
    return close[0] if close else None


def parse_or_explain(parser, argv: list[str], prog: str = "gas-edit"):
    """parser.parse_args, but a mistake raises one GasError line: what was wrong and what to type."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(argv)
    except ArgumentError as e:
        message = " ".join(str(e).split())
    unknown = re.match(r"unrecognized arguments: (.*)", message, re.I)
    if unknown:
        flags = [a for a in unknown.group(1).split() if a.startswith("-")] or unknown.group(1).split()[:1]
        hints = [f"{f} (did you mean {s}?)" if (s := suggest(parser, f)) else f for f in flags]
        raise GasError(
            f"unknown option {', '.join(hints)}; `{prog} --help` lists the options, `{prog} --help-all` every one"
        ) from None
    raise GasError(f"{message}; `{prog} --help` lists the options") from None


def short_help(parser, prog: str = "gas-edit") -> str:
    """The options of GROUPS with their own help text, plus the other commands."""
    actions = {s: a for a in parser._actions for s in a.option_strings}
    usage = (
        f"{prog} --jobs FILE [--config FILE] [--model MODEL] [options]"
        if "--jobs" in actions
        else f"{prog} --config FILE | --image IMAGE --request 'change A into B.' --model MODEL [options]"
    )
    lines = [f"usage: {usage}", "", parser.description or "", ""]
    for title, flags in GROUPS.items():
        lines.append(f"{title}:")
        for flag in flags:
            action = actions.get(flag)
            if action is None:
                continue
            text = TEXT.get(flag) or " ".join((action.help or "").split())
            wrapped = textwrap.wrap(text, 100 - 30, break_on_hyphens=False) or [""]
            lines.append(f"  {flag:<28}{wrapped[0]}")
            lines += [f"  {'':<28}{more}" for more in wrapped[1:]]
        lines.append("")
    lines += [
        "other commands:",
        f"  {prog} batch --jobs FILE    many edits from a JSON-lines file, the model loaded once (--help for its options)",
        f"  {prog} app                  the web app: upload, check the boxes, edit (http://127.0.0.1:7860)",
        "",
        f"{prog} --help-all lists every option (the Lightning Trainer's included). Any option can be set in a",
        f"--config YAML file. The bundled example: {prog} --config configs/shapes.yaml. The method: {METHOD_DOC}.",
    ]
    return "\n".join(lines) + "\n"
