"""`gas-edit`: one Ground-A-Score edit with the Lightning Trainer.

Built on Lightning's own argument parser (jsonargparse), so config files, `--print_config`,
`--trainer.*` flags and `class_path` callbacks behave as in LightningCLI. LightningCLI itself
is not used because an edit needs work before the module exists (plan, grounding, model
loading) and the module is built from tensors, not from config values.
"""

from __future__ import annotations

import contextvars
import logging
import sys

from gas_lightning.errors import EditInterrupted, GasError, RunError
from gas_lightning.terminal import setup_terminal
from gas_lightning.usage import parse_or_explain, short_help

log = logging.getLogger("gas_lightning")
_DEBUG = contextvars.ContextVar("gas_edit_debug", default=False)  # set once --debug is parsed


def run(argv: list[str] | None = None) -> int:
    from gas_lightning.callbacks.progress import step_progress_bar
    from gas_lightning.planners.llm import check_base_url
    from gas_lightning.runner import build_parser, run_edit

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["batch"]:  # gas-edit batch --jobs FILE ...: many edits (gas_lightning/batch.py)
        from gas_lightning import batch

        return batch.run(argv[1:], debug=_DEBUG)
    parser = build_parser(exit_on_error=False)
    if "--help-all" in argv:
        parser.print_help()
        return 0
    if "-h" in argv or "--help" in argv:
        print(short_help(parser), end="")
        return 0
    # jsonargparse prints --print_config inside parse_args, before any check could run: parse without
    # it, check, then print, so a password in --llm_base_url never reaches the terminal either.
    printing = [a for a in argv if a == "--print_config" or a.startswith("--print_config=")]
    cfg = parse_or_explain(parser, [a for a in argv if a not in printing])
    check_base_url(cfg.llm_base_url)  # a password in it must not reach config.yaml or a log
    if printing:
        print(parser.dump(cfg, skip_validation=True), end="")
        return 0
    _DEBUG.set(bool(cfg.debug))
    result = run_edit(cfg, parser, callbacks=step_progress_bar(cfg.trainer))
    out = result.output_dir
    if cfg.plan_only:
        print(f"plan: {out / 'plan.json'}\ngrounding: {out / 'grounding.png'}")
    elif result.image is not None:  # rank zero
        print(
            f"edited: {out / 'edited.png'}  (comparison.png, plan.json, config.yaml, checkpoints/ beside it; "
            f"attention={result.attention}; tensorboard --logdir {out})"
        )
        if result.report is not None:  # docs/guide/checking.md
            c, passes = result.report["counts"], len(result.report["passes"]) - 1
            print(
                f"checked ({result.report['checker']}): {c['done']} done, {c['not done']} not done, "
                f"{c['unsure']} unsure after {passes} refine pass{'' if passes == 1 else 'es'}: {out / 'report.json'}"
            )
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["app"]:
        try:  # Gradio is an extra: imported only for the app
            from gas_lightning.app_ui import main as app_main
        except ImportError as e:
            print(
                f"gas-edit app: error: the app needs Gradio ({e.name} is missing): pip install 'gas-lightning[app]'",
                file=sys.stderr,
            )
            sys.exit(2)
        sys.exit(app_main(argv[1:]))
    setup_terminal()
    _DEBUG.set(False)
    try:
        code = run(argv)
    except KeyboardInterrupt as stop:
        print(
            "gas-edit batch: stopped; the same command again skips the finished jobs"
            if argv[:1] == ["batch"]
            else _stopped(stop),
            file=sys.stderr,
        )
        code = 130
    except Exception as e:
        if _DEBUG.get():
            raise
        code = _report(e)
    sys.exit(code)


def _stopped(stop: KeyboardInterrupt) -> str:
    """Where the steps of a stopped edit are kept, and the command that continues it."""
    if isinstance(stop, EditInterrupted) and stop.checkpoint is not None:
        return (
            f"gas-edit: stopped at step {stop.step}; kept in {stop.checkpoint}\n"
            f"  continue with: gas-edit --config {stop.output_dir / 'config.yaml'} --resume last"
        )
    return "gas-edit: interrupted before the first step; nothing to continue"


def _report(error: Exception) -> int:
    """One line on stderr; the exit status is 2 for bad input, 1 for a failure while running or a bug."""
    first = " ".join(str(error).split())[:300]
    if isinstance(error, GasError):
        print(f"gas-edit: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, RunError) else 2
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        print(
            f"gas-edit: error: out of memory ({first}); lower --resolution, use --trainer.precision 16-mixed, "
            "or close what else uses the memory",
            file=sys.stderr,
        )
        return 1
    print(
        f"gas-edit: internal error: {type(error).__name__}: {first} (run with --debug true for the traceback)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    main()
