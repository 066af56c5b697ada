"""User-facing errors.

Every error a user can fix (bad input, missing weights, unreachable endpoint) is raised as a
`GasError` subclass with a message that says what was wrong and what to do. The CLI prints
the message alone and exits with status 2 for bad input, 1 for a `RunError` (the input was fine,
the run failed). Anything else is a bug: one line, exit 1, and the traceback with `--debug true`.
"""


class GasError(Exception):
    """An error the user can fix; the message is shown without a traceback."""


class PlanError(GasError, ValueError):
    """An edit plan (phrases, boxes, flags) is malformed."""


class ModelLoadError(GasError):
    """A model could not be loaded from the given id or path."""


class GroundingError(GasError):
    """A phrase could not be located in the image."""


class PlannerError(GasError):
    """A request could not be turned into subtasks."""


class RunError(GasError):
    """The input was valid but the edit failed while running (exit status 1, not 2)."""


class NonFiniteLatentError(RunError):
    """The latent became NaN or infinite during the edit."""


class EditInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped an edit; `checkpoint` (None before the first step) holds its `step` steps.

    A KeyboardInterrupt still, so a notebook or script stops as it would on Ctrl-C; the command
    line prints where the steps are kept and how to continue."""

    def __init__(self, step: int, checkpoint, output_dir):
        super().__init__(step, checkpoint, output_dir)
        self.step, self.checkpoint, self.output_dir = step, checkpoint, output_dir
