"""SyncBatchNormPlugin under a real Lightning DDP fit: 2 CPU processes, gloo, both Lightning namespaces."""

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import run_python, subprocess_env
from tests.scripts.fit_syncbn import dataset

SCRIPT = Path(__file__).parent / "scripts" / "fit_syncbn.py"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_fit_with_plugin_synchronises_running_statistics(namespace, tmp_path):
    pytest.importorskip(namespace)
    run_python(SCRIPT, tmp_path, cwd=tmp_path, env=subprocess_env(GNL_LIGHTNING=namespace))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in ranks:
        # 12 images, 2 ranks, batch 2: 3 steps each; the plugin composes with a NormSwap on the head
        assert result["types"] == [("SyncBatchNorm", "GroupNorm")] * 3

    # Reference: one BatchNorm fed, at each step, the global batch (both ranks' images of that step).
    images = dataset().tensors[0]
    reference = nn.BatchNorm2d(3)
    for step in range(3):
        reference(images[ranks[0]["indices"][step] + ranks[1]["indices"][step]])
    assert sorted(sum(ranks[0]["indices"] + ranks[1]["indices"], [])) == list(range(12))
    for result in ranks:
        torch.testing.assert_close(result["running_mean"], reference.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["running_var"], reference.running_var, rtol=1e-5, atol=1e-5)
        assert result["num_batches_tracked"].item() == 3


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
@pytest.mark.parametrize("sync_batchnorm", [True, False])
def test_plugin_combines_with_lightnings_sync_batchnorm_flag(namespace, sync_batchnorm):
    # Many projects' DDP configs set sync_batchnorm=True; Lightning accepts a LayerSync plugin with it only when the
    # plugin is its TorchSyncBatchNorm. The plugin must then be the one used, converting to gnlightning's SyncBN.
    L = pytest.importorskip(namespace)
    from gnlightning import SyncBatchNorm, SyncBatchNormPlugin

    plugin = SyncBatchNormPlugin()
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, sync_batchnorm=sync_batchnorm,
                        plugins=[plugin], logger=False, enable_checkpointing=False)
    assert trainer.strategy._layer_sync is plugin
    converted = plugin.apply(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert type(converted[1]) is SyncBatchNorm
