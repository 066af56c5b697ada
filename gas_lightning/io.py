"""Files that survive a kill, and checkpoints that load as data only.

An edit may be stopped at any moment (Ctrl-C, SIGKILL, a lost machine). Every file it writes goes
to a temporary file in the same folder, is flushed to disk and then renamed over the target, so
the target is always either the old file or the new one, never a truncated one. Checkpoints are
read with `torch.load(weights_only=True)`: a file that carries pickled Python objects is refused
instead of run.
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from gas_lightning.errors import GasError


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success fsync it and `os.replace` it onto `path`.

    On an exception the temporary file is removed and `path` is untouched. A kill leaves at most
    a stray `.<name>.<random>.tmp` (a name no reader globs for) beside the intact old file. Pass
    `format=` to writers that guess it from the file name (PIL's `Image.save`).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide the mode, as a plain open() of `path` would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and data-only loading.

    Lightning's own `_atomic_save` stages the file in the system temp folder and moves it without
    an fsync (a copy, not a rename, when that folder is another filesystem), so a kill can still
    leave a truncated `last.ckpt`. Every checkpoint the Trainer writes (ModelCheckpoint's
    `stepNNNNNN.ckpt` and `last.ckpt`, `FinalCheckpoint`'s `last.ckpt`/`interrupted.ckpt`) goes
    through `save_checkpoint` here. Loading defaults to `weights_only=True`; a checkpoint holding
    other pickled objects is refused with a `GasError`, before any of its code can run.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        with atomic_write(path) as f:
            torch.save(checkpoint, f)

    @override
    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(
                path, map_location=map_location, weights_only=True if weights_only is None else weights_only
            )
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            raise GasError(
                f"refusing to load {path}: it holds Python objects, not only tensors and plain data"
                + (f" (it calls {found.group(1)})" if found else "")
                + "; gas-edit reads checkpoints as data only (weights_only=True). "
                "Resume from a checkpoint that gas-edit wrote, or start a new run without --resume"
            ) from None


def looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else the user typed is meant as a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or os.path.exists(name)


def with_atomic_io(plugins: Any = None) -> list:
    """The Trainer's `plugins` plus an `AtomicCheckpointIO`, unless the user chose a CheckpointIO."""
    from lightning.fabric.plugins import CheckpointIO

    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    return plugins if any(isinstance(p, CheckpointIO) for p in plugins) else [*plugins, AtomicCheckpointIO()]
