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

from gas_lightning.errors import GasError, RunError

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
    parser = build_parser()
    # jsonargparse prints --print_config inside parse_args, before any check could run: parse without
    # it, check, then print, so a password in --llm_base_url never reaches the terminal either.
    printing = [a for a in argv if a == "--print_config" or a.startswith("--print_config=")]
    cfg = parser.parse_args([a for a in argv if a not in printing])
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
        print(f"edited: {out / 'edited.png'}  (comparison.png, plan.json, config.yaml, checkpoints/ beside it; "
              f"attention={result.attention}; tensorboard --logdir {out})")
    return 0


# Library messages a user of gas-edit cannot act on, by the logger that emits them. The device is said
# once by StepProgressBar; the end of the run by the "edited:" line.
_NOISE = {
    "lightning.pytorch.utilities.rank_zero": ("GPU available:", "TPU available:", "\U0001f4a1 Tip:", "`Trainer.fit` stopped:"),
    "lightning.fabric.utilities.rank_zero": ("GPU available:", "TPU available:", "\U0001f4a1 Tip:"),
    "lightning.pytorch.accelerators.cuda": ("LOCAL_RANK:",),
    # accelerate only speeds up loading; the edit does not need it
    "diffusers.models.modeling_utils": ("Cannot initialize model with low cpu memory usage",),
    "diffusers.pipelines.pipeline_utils": ("Cannot initialize model with low cpu memory usage",),
}


class _DropNoise(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _no_weight_loading_bar(factory, args, kwargs):
    """transformers' bar over the tensors of a small local file; its download bars stay."""
    if kwargs.get("desc") == "Loading weights":
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def _quiet_library_noise() -> None:
    """For the gas-edit and app entry points only: the Python API leaves global logging alone."""
    import warnings

    # We checkpoint the latent after its update on purpose; this advice does not apply.
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    # The "data" is a stream of dummy ticks; DataLoader workers would only add processes.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # A resumed edit continues in its own checkpoint folder on purpose.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    for name, starts in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(starts))
    from transformers.utils import logging as hf_logging

    if hasattr(hf_logging, "set_tqdm_hook"):  # transformers >= 5
        hf_logging.set_tqdm_hook(_no_weight_loading_bar)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so main() called twice in one process (tests,
    notebooks) never logs into a stream an earlier call captured and closed."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_terminal() -> None:
    """Our INFO lines on stderr, library noise off: what `gas-edit` and `gas-edit app` print."""
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    _quiet_library_noise()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["app"]:
        from gas_lightning.app import main as app_main

        sys.exit(app_main(argv[1:]))
    setup_terminal()
    _DEBUG.set(False)
    try:
        code = run(argv)
    except KeyboardInterrupt:
        print("gas-edit: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:
        if _DEBUG.get():
            raise
        code = _report(e)
    sys.exit(code)


def _report(error: Exception) -> int:
    """One line on stderr; the exit status is 2 for bad input, 1 for a failure while running or a bug."""
    first = " ".join(str(error).split())[:300]
    if isinstance(error, GasError):
        print(f"gas-edit: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, RunError) else 2
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        print(f"gas-edit: error: out of memory ({first}); lower --resolution, use --trainer.precision 16-mixed, "
              "or close what else uses the memory", file=sys.stderr)
        return 1
    print(f"gas-edit: internal error: {type(error).__name__}: {first} (run with --debug true for the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
