"""What an edit prints: our INFO lines, and none of the library lines a user cannot act on.

Shared by the entry points below the CLI, the app and the Python API (which all import this,
never each other): `setup_terminal` for a process that is ours (gas-edit, gas-edit app), and
`library_noise_off` for one `edit()` call inside someone else's process, which leaves the
logging and warning configuration as it found it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

log = logging.getLogger("gas_lightning")

# Library messages a user cannot act on, by the logger that emits them. The device is said once by
# StepProgressBar; the end of the run by the "edited:" line; a stop by the line naming its checkpoint.
_NOISE = {
    "lightning.pytorch.utilities.rank_zero": (
        "GPU available:",
        "TPU available:",
        "\U0001f4a1 Tip:",
        "`Trainer.fit` stopped:",
        "\nDetected KeyboardInterrupt",
    ),
    "lightning.fabric.utilities.rank_zero": ("GPU available:", "TPU available:", "\U0001f4a1 Tip:"),
    "lightning.pytorch.accelerators.cuda": ("LOCAL_RANK:",),
    # accelerate only speeds up loading; the edit does not need it
    "diffusers.models.modeling_utils": ("Cannot initialize model with low cpu memory usage",),
    "diffusers.pipelines.pipeline_utils": ("Cannot initialize model with low cpu memory usage",),
}
_WARNINGS = (
    ".*ModelCheckpoint with manual optimization.*",  # we checkpoint the latent after its update on purpose
    ".*isinstance.treespec, LeafSpec.*",  # Lightning's own use of a torch API
    ".*does not have many workers.*",  # the "data" is a stream of dummy ticks; workers would only add processes
    ".*Checkpoint directory .* exists and is not empty.*",  # a resumed edit continues in its own folder on purpose
)


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


def _ignore_warnings() -> None:
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def _add_filters() -> list[tuple[logging.Logger, logging.Filter]]:
    added = []
    for name, starts in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            f = _DropNoise(starts)
            logger.addFilter(f)
            added.append((logger, f))
    return added


def _set_bar_hook(hook):
    from transformers.utils import logging as hf_logging

    return hf_logging.set_tqdm_hook(hook) if hasattr(hf_logging, "set_tqdm_hook") else None  # transformers >= 5


@contextlib.contextmanager
def library_noise_off() -> Iterator[None]:
    """The same lines off for one call only: filters, warning filters and the loading-bar hook are
    put back as they were, so the caller's own logging and warnings are untouched."""
    with warnings.catch_warnings():
        _ignore_warnings()
        added = _add_filters()
        previous = _set_bar_hook(_no_weight_loading_bar)
        try:
            yield
        finally:
            _set_bar_hook(previous)
            for logger, f in added:
                logger.removeFilter(f)


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
    """Our INFO lines on stderr, library noise off for the whole process: what `gas-edit` and
    `gas-edit app` print."""
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    _ignore_warnings()
    _add_filters()
    _set_bar_hook(_no_weight_loading_bar)
