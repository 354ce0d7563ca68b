"""Fixtures the test modules share. Plain helpers (for parametrize tables, module-scoped fixtures, spawned workers and
child processes) are in tests/helpers.py; the multi-process harness is tests/_dist.py.

Markers (pyproject.toml): ``slow`` on every test that trains for more than a step or two or starts processes
(``python -m pytest -m 'not slow'`` is the quick loop; CI runs everything), ``distributed`` on those that start
several ranks, ``gpu`` on those that need CUDA.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import pytest

from tests.helpers import compose_train, run_gnl_train


@pytest.fixture
def train_config(tmp_path: Path) -> Callable:
    """``train_config(overrides)``: gnl-train's config for ``overrides``, composed as ``gnl-train`` composes it, with
    the test's ``tmp_path`` as the run's output directory (see ``tests.helpers.compose_train``)."""

    def compose(overrides: Sequence[str]):
        return compose_train(overrides, tmp_path)

    return compose


@pytest.fixture
def gnl_train(tmp_path: Path) -> Callable:
    """``gnl_train(*overrides, env=None, timeout=300)``: run ``gnl-train *overrides`` in a child process whose
    working directory is the test's ``tmp_path`` (relative ``hydra.run.dir=run`` lands there); the finished
    process, exit status not checked (see ``tests.helpers.run_gnl_train``)."""

    def run(*overrides: str, **options):
        return run_gnl_train(*overrides, cwd=tmp_path, **options)

    return run


@pytest.fixture
def host(namespace: str):
    """The stranger's Lightning project of tests/host (``L``, ``MLP``, ``CNN``) built on the test's ``namespace``
    parameter (``lightning.pytorch`` or ``pytorch_lightning``); the test is skipped where that package is missing."""
    from tests.host.modules import host_classes

    pytest.importorskip(namespace)
    return host_classes(namespace)


@pytest.fixture
def quiet_lightning():
    """Lightning's own INFO and WARNING lines (device summaries, hints about workers) off while the test runs: they
    bury the output of a failing test. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)
