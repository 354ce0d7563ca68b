"""AtomicCheckpointIO: a checkpoint file is either the old one or the complete new one, never a torn mix.

Why not Lightning's own ``TorchCheckpointIO``: it writes through an fsspec transaction, whose local temporary file is
made by ``tempfile.mkstemp()`` in the *system* temporary directory and committed with ``shutil.move``. When that
directory is on the same filesystem as the checkpoint, the move is an atomic rename. When it is not -- a tmpfs
``/tmp``, or a node-local ``/tmp`` with checkpoints on shared storage, the usual multi-node set-up -- the move
falls back to a copy that first truncates the existing ``last.ckpt`` and then fills it: a full disk or a preemption
during that copy leaves no valid checkpoint at all (tests/test_robustness.py shows both behaviours). Nothing is
fsynced either, so a power loss right after the rename can still leave an empty file on some filesystems.

This plugin writes beside the target (same directory, so same filesystem), fsyncs the data, renames over the
target with ``os.replace`` (atomic on POSIX and Windows) and fsyncs the directory. Remote paths (``s3://`` ...)
go to Lightning's implementation unchanged: object stores publish an upload only when it completes.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from gnlightning.lightning.compat import bases

__all__ = ["AtomicCheckpointIO", "save_atomically"]


def _fsync_directory(directory: str) -> None:
    """Make a rename inside ``directory`` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(handle)


def save_atomically(checkpoint: Any, path: str | os.PathLike) -> None:
    """``torch.save(checkpoint, path)``, all or nothing: on any error (or a kill) ``path`` keeps its old content.

    The temporary file is hidden (``.last.ckpt.<random>.tmp``) and removed on error; only a process killed
    mid-write leaves one behind, next to the intact checkpoint. It is created with the usual umask-governed mode,
    like a file ``torch.save`` would create."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


class AtomicCheckpointIO(*bases("plugins.io.TorchCheckpointIO")):
    """Lightning's ``TorchCheckpointIO`` with local files written atomically and durably (see module docstring)::

        Trainer(plugins=[AtomicCheckpointIO()])

    Works with a ``lightning.pytorch`` and a ``pytorch_lightning`` Trainer; loading and removing checkpoints are
    Lightning's own.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        filesystem, local_path = fsspec.core.url_to_fs(os.fspath(path) if isinstance(path, os.PathLike) else path)
        if storage_options is not None or not isinstance(filesystem, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote, or Lightning's error for options
            return
        save_atomically(checkpoint, local_path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
