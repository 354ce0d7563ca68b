"""gnlightning's log lines reach the user once, from global rank 0, with or without the app's own logging set-up.

The plain-script and Hydra cases run in a fresh interpreter: pytest installs handlers on the root logger, which is
exactly the "app configured logging" case, so the "no logging configured" case cannot be seen in-process.
"""

from __future__ import annotations

import logging
import textwrap

import pytest

import gnlightning.log as gnl_log
from tests.helpers import RANK_VARIABLES, REPO, run_python, subprocess_env

SUMMARY = "convert_norms(gn): converted 1 BatchNorm2d -> GroupNorm"

CONVERT = """
import torch.nn as nn
import gnlightning
gnlightning.convert_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "gn", num_groups=2)
"""


@pytest.mark.slow
def test_plain_script_shows_formatted_lines_once(tmp_path):
    code = CONVERT + 'import logging; logging.getLogger("gnlightning.some.child").warning("careful: %d", 7)\n'
    result = run_python("-c", code, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert output.count(SUMMARY) == 1, output
    assert f"[gnlightning] INFO: {SUMMARY}" in result.stderr
    assert output.count("careful: 7") == 1 and "[gnlightning] WARNING: careful: 7" in result.stderr


@pytest.mark.slow
def test_plain_script_on_rank_1_shows_nothing(tmp_path):
    result = run_python("-c", CONVERT + 'import logging; logging.getLogger("gnlightning").warning("careful")\n',
                        cwd=tmp_path, env=subprocess_env(RANK="1"))
    assert "convert_norms" not in result.stderr + result.stdout and "careful" not in result.stderr


@pytest.mark.slow
def test_basic_config_after_import_takes_over(tmp_path):
    """An app that configures logging after importing gnlightning gets the lines in its own format, once."""
    code = ("import logging, gnlightning\nlogging.basicConfig(format='APP %(name)s %(levelname)s %(message)s')\n"
            + CONVERT)
    result = run_python("-c", code, cwd=tmp_path)
    assert result.stderr.count(SUMMARY) == 1 and f"APP gnlightning INFO {SUMMARY}" in result.stderr
    assert "[gnlightning]" not in result.stderr


@pytest.mark.slow
def test_hydra_app_logs_once_to_console_and_file(tmp_path):
    """Hydra configures root logging after the app's imports; gnlightning's lines go to Hydra's console and job log,
    each once, in Hydra's format (and not a second time in gnlightning's own)."""
    pytest.importorskip("hydra")
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent("""
        import hydra
        import torch.nn as nn
        import gnlightning

        @hydra.main(version_base=None, config_path=None)
        def main(cfg):
            gnlightning.convert_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), "gn", num_groups=2)

        if __name__ == "__main__":
            main()
    """))
    result = run_python(app, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert output.count(SUMMARY) == 1, output
    assert f"[gnlightning][INFO] - {SUMMARY}" in output and "[gnlightning] INFO" not in output
    assert (tmp_path / "run" / "app.log").read_text().count(SUMMARY) == 1


@pytest.fixture
def no_rank_variables(monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def app_handler():
    """A handler the app put on the root logger, as Hydra or logging.basicConfig do."""
    handler = Collect()
    logging.getLogger().addHandler(handler)
    yield handler
    logging.getLogger().removeHandler(handler)


@pytest.mark.parametrize("rank_from", ["RANK", "LOCAL_RANK", "SLURM_PROCID", "lightning"])
@pytest.mark.parametrize("logger", ["gnlightning", "gnlightning.layers.group_norm"])
def test_only_global_rank_zero_emits(rank_from, logger, no_rank_variables, app_handler, monkeypatch):
    """The rank filter also covers child loggers (a logger's own filters would not see their records), and takes
    the rank from the launcher's variables or, in ddp_spawn workers, from Lightning."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    for rank in (0, 1):
        if rank_from == "lightning":
            monkeypatch.setattr(rank_zero_only, "rank", rank, raising=False)
        else:
            monkeypatch.setenv(rank_from, str(rank))
        assert gnl_log.global_rank() == rank
        logging.getLogger(logger).info("hello from %d", rank)
    assert app_handler.messages == ["hello from 0"]


def test_app_handler_gets_each_record_once(app_handler, caplog):
    """Forwarding by hand must not hand a record twice to a handler that is attached both to the root and to
    "gnlightning" itself (pytest's caplog handler is, as is any tool's that serves non-propagating loggers)."""
    logging.getLogger("gnlightning").addHandler(app_handler)
    try:
        with caplog.at_level(logging.INFO, logger="gnlightning"):
            logging.getLogger("gnlightning.layers.group_norm").info("child")
            logging.getLogger("gnlightning").warning("parent")
    finally:
        logging.getLogger("gnlightning").removeHandler(app_handler)
    assert app_handler.messages == ["child", "parent"]
    assert [record.getMessage() for record in caplog.records] == ["child", "parent"]


def test_torch_distributed_rank_wins(no_rank_variables, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    assert gnl_log.global_rank() == 3


def test_install_keeps_the_users_choices():
    logger = logging.getLogger("gnlightning.tests.own_setup")
    own = logging.NullHandler()
    logger.addHandler(own)
    logger.setLevel(logging.ERROR)
    try:
        gnl_log.install(logger.name)
        assert logger.handlers == [own] and logger.propagate and logger.level == logging.ERROR
    finally:
        logger.removeHandler(own)
    package = gnl_log.install()  # idempotent: one handler however often it is installed (pytest adds its own here)
    assert [type(h).__name__ for h in package.handlers].count("RankZeroHandler") == 1 and not package.propagate


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_ddp_spawn_normswap_summary_once_from_rank_zero(namespace, tmp_path):
    pytest.importorskip(namespace)
    result = run_python(REPO / "tests" / "scripts" / "host_spawn.py", "normswap", cwd=tmp_path,
                        env=subprocess_env(GNL_LIGHTNING=namespace))
    output = result.stdout + result.stderr
    assert output.count("NormSwap(gn): converted 2 BatchNorm1d -> GroupNorm") == 1, output
    assert output.count("[gnlightning] INFO: rank 0 was here") == 1, output
    assert "rank 1 was here" not in output
