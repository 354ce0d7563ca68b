"""Resume without loss: a run that crashes after any step and restarts from its last checkpoint continues with the
same batches, learning rates and losses as a run that never stopped (CPU, deterministic)."""

import json

import lightning.pytorch as L
import pytest
import torch

from gnlightning.train import build
from tests.callbacks import Crash, CrashAtStep, RecordSteps
from tests.helpers import compose_train
# 20 images in batches of 4: 5 steps per epoch, 3 epochs.
SMALL = ["data.num_train=20", "data.num_val=4", "data.num_test=4", "data.image_size=32", "data.batch_size=4",
         "trainer.max_epochs=3", "model.options.decoder_channels=16"]
STEPS = 15


def fit_in_process(tmp_path, crash_at=None, ckpt_path=None) -> dict[int, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = compose_train(["norm=gn_ws", *SMALL], tmp_path)
    L.seed_everything(cfg.seed, workers=True)
    data, task, plugins = build(cfg)
    record = RecordSteps(str(tmp_path / "steps.json"))
    callbacks = [record, L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0,
                                                     every_n_train_steps=1)]
    if crash_at is not None:
        callbacks.append(CrashAtStep(crash_at))
    trainer = L.Trainer(accelerator="cpu", max_epochs=cfg.trainer.max_epochs, callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        deterministic=True)
    try:
        trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    except Crash:
        pass
    return record.steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    steps = fit_in_process(tmp_path_factory.mktemp("full"))
    assert sorted(steps) == list(range(1, STEPS + 1))
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", [3, 5, 12], ids=["mid-epoch", "epoch-end", "later-epoch"])
def test_gn_ws_resumes_from_any_step_with_the_same_losses(uninterrupted, crash_at, tmp_path):
    first = fit_in_process(tmp_path / "a", crash_at=crash_at)
    assert sorted(first) == list(range(1, crash_at + 1))
    resumed = fit_in_process(tmp_path / "b", ckpt_path=tmp_path / "a" / "ckpt" / "last.ckpt")
    assert sorted(resumed) == list(range(crash_at + 1, STEPS + 1)), "resumed on the wrong step"
    for step, seen in resumed.items():
        expected = uninterrupted[step]
        assert seen["batch"] == expected["batch"], f"step {step}: a different batch than the uninterrupted run"
        assert seen["lr"] == pytest.approx(expected["lr"], rel=1e-12), f"step {step}: scheduler not restored"
        torch.testing.assert_close(seen["loss"], expected["loss"], rtol=1e-6, atol=1e-7,
                                   msg=f"step {step}: loss differs from the uninterrupted run")


@pytest.mark.slow
@pytest.mark.distributed
def test_syncbn_ddp_run_resumes_after_a_crash_with_the_same_losses(gnl_train, tmp_path):
    """gnl-train itself, 2 processes with SyncBatchNorm and PreciseBN; the run crashes mid-epoch on every rank."""
    common = ["norm=syncbn", "trainer=ddp_cpu", "callbacks=precise_bn", "callbacks.precise_bn.num_batches=2",
              "callbacks.last_checkpoint.every_n_train_steps=1", "run_test=false", "trainer.enable_progress_bar=false",
              *SMALL, "data.num_train=24",  # 12 images per rank: 3 steps per epoch, 9 in all
              "+callbacks.record._target_=tests.callbacks.RecordSteps"]

    def record(name):
        return f"+callbacks.record.path='{tmp_path / name}_{{rank}}.json'"

    full = gnl_train(f"hydra.run.dir={tmp_path / 'full'}", *common, record("full"))
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = gnl_train(f"hydra.run.dir={tmp_path / 'crashed'}", *common, record("crashed"),
                        "+callbacks.crash._target_=tests.callbacks.CrashAtStep", "+callbacks.crash.step=4")
    assert crashed.returncode != 0 and "simulated crash after step 4" in crashed.stderr, crashed.stderr[-3000:]
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    resumed = gnl_train(f"hydra.run.dir={tmp_path / 'resumed'}", *common, record("resumed"), f"ckpt_path='{last}'")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    for rank in (0, 1):
        expected = json.loads((tmp_path / f"full_{rank}.json").read_text())
        before = json.loads((tmp_path / f"crashed_{rank}.json").read_text())
        after = json.loads((tmp_path / f"resumed_{rank}.json").read_text())
        assert sorted(map(int, expected)) == list(range(1, 10))
        assert sorted(map(int, before)) == [1, 2, 3, 4] and sorted(map(int, after)) == [5, 6, 7, 8, 9]
        for step, seen in {**before, **after}.items():
            assert seen["batch"] == expected[step]["batch"], f"rank {rank} step {step}: another batch"
            assert seen["lr"] == pytest.approx(expected[step]["lr"], rel=1e-12)
            torch.testing.assert_close(seen["loss"], expected[step]["loss"], rtol=1e-6, atol=1e-7,
                                       msg=f"rank {rank} step {step}: loss differs from the uninterrupted run")
    # The end state agrees too: running statistics (re-estimated by PreciseBN) and weights give the same metric.
    full_metrics = json.loads((tmp_path / "full" / "results.json").read_text())["metrics"]
    resumed_metrics = json.loads((tmp_path / "resumed" / "results.json").read_text())["metrics"]
    assert resumed_metrics["val/mIoU"] == pytest.approx(full_metrics["val/mIoU"], abs=1e-6)
