"""gnlightning's log lines: visible, formatted and said once (by global rank 0) under every launcher.

Why this module exists: gnlightning reports what it did (conversion summaries, PreciseBN, NormAdvisor's advice)
through the standard ``logging`` module, on the ``"gnlightning"`` logger and its children
(``gnlightning.layers.group_norm``, ...). Left alone, those lines get lost exactly where they matter: an app that
configures no logging -- a plain script, each worker that ``ddp_spawn`` starts -- drops every INFO line (Python's
last-resort handler prints WARNING and above only, and unformatted), and under DDP each rank would repeat each line.

Lightning solves the same problem for its own logger when ``lightning.pytorch`` is imported: INFO level, a
``StreamHandler`` if the root logger has none, and ``rank_zero_only`` around its messages. :func:`install` does the
equivalent for ``"gnlightning"``, with two differences that matter here:

* Whether to print is decided per record, not at import. Hydra -- gnl-train, and host apps that add gnlightning's
  config -- configures root logging *after* its imports; a decision taken at import would either miss Hydra's
  console and file log or print every line twice.
* The rank filter also covers the child loggers. A ``logging.Filter`` on the ``"gnlightning"`` logger would not: a
  logger's filters only see records created at that very logger, not records propagated from its children.

How: the ``"gnlightning"`` logger gets one :class:`RankZeroHandler` and stops propagating; that handler propagates by
hand. On a rank other than 0 it drops the record. On rank 0 it hands the record to the handlers that propagation
would have reached (the root's: Hydra's console and file, ``logging.basicConfig``'s, pytest's capture) and, only
when the app configured no handler at all on the way, prints it itself as ``[gnlightning] WARNING: ...``. The
logger also gets the rank filter, for handlers that tools attach to it directly.

What stays under the user's control, the standard way: ``logging.getLogger("gnlightning").setLevel(...)`` (a level
set before gnlightning is imported is kept; INFO otherwise), and handlers: an app that attached handlers to
``"gnlightning"`` itself before importing gnlightning keeps exactly its own set-up (nothing installed), and
``logging.config.dictConfig`` naming ``"gnlightning"`` replaces the set-up, as it would for any library.

This module must not import Lightning (``gnlightning.layers`` users never do); it reads Lightning's rank only if
Lightning is already loaded.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["FORMAT", "RankZeroFilter", "RankZeroHandler", "global_rank", "install"]

#: How a line looks when gnlightning prints it itself (no handler configured by the app).
FORMAT = "[gnlightning] %(levelname)s: %(message)s"

# The launchers' rank variables, in Lightning's order (lightning.fabric.utilities.rank_zero._get_rank): LOCAL_RANK
# before SLURM_PROCID because SLURM_PROCID is also set when SLURM does not manage the processes (one SLURM task
# in which Lightning starts the others).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def global_rank() -> int:
    """This process's global rank, from the most reliable source available at the moment of the call.

    1. torch.distributed's rank once a default process group exists (exact under every launcher);
    2. else the launcher's environment (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``...: torchrun, Lightning's own
       ``ddp`` launcher, srun), which already holds before the process group is created;
    3. else Lightning's ``rank_zero_only.rank`` if Lightning is loaded (``ddp_spawn`` workers have no rank
       variable; Lightning sets this attribute in each worker before anything of the model runs);
    4. else 0: a single process.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in _RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                continue  # a malformed variable says nothing about the rank; try the next source
    rank_zero = sys.modules.get("lightning_utilities.core.rank_zero")
    rank = getattr(getattr(rank_zero, "rank_zero_only", None), "rank", None)
    return int(rank) if rank is not None else 0


class RankZeroFilter(logging.Filter):
    """Let records through on global rank 0 only (see :func:`global_rank`); the rank is read per record because
    it changes during a run (a DDP launcher assigns it after gnlightning is imported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return global_rank() == 0


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever ``sys.stderr`` is at emit time (like ``logging.lastResort``), so that
    redirections made after import (pytest's capture, contextlib.redirect_stderr) are honoured."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the live sys.stderr wins
        pass


class RankZeroHandler(logging.Handler):
    """The one handler of the ``"gnlightning"`` logger (see the module docstring): on global rank 0, pass each record
    to the handlers propagation would reach, or print it formatted when the app has configured none."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RankZeroFilter())
        self.console = _StderrHandler()
        self.console.setFormatter(logging.Formatter(FORMAT))

    def handle(self, record: logging.LogRecord) -> bool:
        # No lock of our own around the forwarding: each handler called below takes its own.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        below = _handlers_below(logging.getLogger(record.name), self)
        upstream = _handlers_above(self._logger_of(record.name))
        for handler in upstream:
            # A handler attached both up there and below has had the record already (pytest's capture handler is
            # attached to the root *and* to every non-propagating logger, for instance).
            if handler not in below and record.levelno >= handler.level:
                handler.handle(record)
        if not upstream and not any(handler is not self for handler in below):
            self.console.handle(record)

    def _logger_of(self, name: str) -> logging.Logger:
        """The logger this handler is attached to: the first one at or above logger ``name`` that holds it."""
        logger: logging.Logger | None = logging.getLogger(name)
        while logger is not None and self not in logger.handlers:
            logger = logger.parent
        return logger or logging.getLogger(name)


def _handlers_above(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record would reach above ``logger`` if ``logger`` propagated (logging.Logger.callHandlers)."""
    handlers: list[logging.Handler] = []
    current = logger.parent
    while current is not None:
        handlers.extend(current.handlers)
        current = current.parent if current.propagate else None
    return handlers


def _handlers_below(owner: logging.Logger, ours: logging.Handler) -> list[logging.Handler]:
    """The handlers logging itself gives a record of logger ``owner`` before and beside ``ours``: those of ``owner``
    and of the loggers between it and the one holding ``ours``, and that logger's own (``ours`` included)."""
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = owner
    while current is not None:
        handlers.extend(current.handlers)
        if ours in current.handlers or not current.propagate:
            break
        current = current.parent
    return handlers


def install(name: str = "gnlightning") -> logging.Logger:
    """Set up the ``name`` logger as the module docstring explains; idempotent (importing gnlightning calls it).

    Leaves a level the user already set; leaves the logger entirely alone when the app attached handlers to it
    before gnlightning was imported (the app decided where these lines go, and on which ranks).
    """
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if logger.handlers:  # ours from an earlier call (also across importlib.reload), or the app's own
        return logger
    logger.addHandler(RankZeroHandler())
    # Also on the logger: a handler attached to "gnlightning" by a tool (pytest attaches its capture handler to every
    # non-propagating logger) then sees rank 0's records only, at least those of "gnlightning" itself.
    logger.addFilter(RankZeroFilter())
    logger.propagate = False
    return logger
