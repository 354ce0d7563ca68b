"""Tasks, models and weights: metrics on hand examples, short fits, weight loading."""

import functools
import math

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gnlightning.models import build_model, load_weights
from gnlightning.tasks import DetectionTask, SegmentationTask
from gnlightning.tasks.optim import param_groups, poly_warmup


class Fixed(nn.Module):
    """A 'model' that returns given logits, to check metrics against a hand computation."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        return {"out": self.logits[: len(images)] + self.dummy}


def test_miou_on_hand_example():
    # target  [[0, 0, 1, 1],      prediction [[0, 1, 1, 1],
    #          [2, 2, 255, 1]]                 [2, 0, 0, 1]]     (255 ignored)
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])
    prediction = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]])
    logits = nn.functional.one_hot(prediction, 3).permute(0, 3, 1, 2).float()
    task = SegmentationTask(Fixed(logits), num_classes=3, class_names=["bg", "a", "b"])
    task.update_metric((torch.zeros(1, 3, 2, 4), target), task.val_metric)
    iou = task.val_metric.compute()
    # class 0: tp 1 (pixel 0,0), fp 1 (1,1), fn 1 (0,1) -> 1/3; class 1: tp 3, fp 1 (0,1), fn 0 -> 3/4;
    # class 2: tp 1, fp 0, fn 1 -> 1/2. The ignored pixel (predicted 0) counts nowhere.
    torch.testing.assert_close(iou, torch.tensor([1 / 3, 3 / 4, 1 / 2]))
    assert math.isclose(iou.nanmean().item(), (1 / 3 + 3 / 4 + 1 / 2) / 3, rel_tol=1e-6)


def test_map_perfect_and_empty_images():
    pytest.importorskip("pycocotools")
    task = DetectionTask(build_model("fasterrcnn_resnet50_fpn", 3, image_size=64), num_classes=3)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    perfect = [{**targets[0], "scores": torch.tensor([0.9])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}]
    task.val_metric.update(perfect, targets)
    assert task.val_metric.compute()["map"].item() == pytest.approx(1.0)


def test_poly_schedule_and_no_decay_groups():
    assert poly_warmup(0, total_steps=100, warmup_steps=10) == pytest.approx(0.001)
    assert poly_warmup(10, total_steps=100, warmup_steps=10) == pytest.approx(0.9 ** 0.9)
    assert poly_warmup(100, total_steps=100, warmup_steps=10) == 0
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 1e-4)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert no_decay["weight_decay"] == 0 and len(no_decay["params"]) == 4


@pytest.mark.slow
def test_segmentation_task_fits_and_learns():
    torch.manual_seed(0)
    masks = nn.functional.interpolate((torch.rand(16, 1, 4, 4) > 0.5).float(), size=(32, 32)).squeeze(1).long()
    images = torch.rand(16, 3, 32, 32) * 0.5 + masks[:, None] * torch.tensor([0.5, -0.3, 0.0]).view(1, 3, 1, 1)
    loader = DataLoader(TensorDataset(images, masks), batch_size=4)
    task = SegmentationTask(build_model("timm_segmentation", 2, norm="gn_ws"), num_classes=2, warmup_steps=2,
                            optimizer=functools.partial(torch.optim.AdamW, lr=2e-3))
    trainer = L.Trainer(accelerator="cpu", max_epochs=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, loader, loader)
    assert trainer.callback_metrics["val/mIoU"] > 0.6


def test_class_count_mismatch_is_caught():
    task = SegmentationTask(build_model("timm_segmentation", 3), num_classes=2)
    with pytest.raises(ValueError, match="predicts 3 classes but the task has num_classes=2"):
        task.training_step((torch.rand(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long)), 0)


def test_load_weights_prefixes_mismatches_and_wrong_architecture(tmp_path, caplog):
    source = build_model("lraspp_mobilenet_v3_large", 3)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "run.ckpt")
    target = build_model("lraspp_mobilenet_v3_large", 5)  # another class count: the classifier is skipped
    missing, unexpected = load_weights(target, tmp_path / "run.ckpt")
    assert missing and set(missing) == set(unexpected) and all("classifier" in key for key in missing)
    key = "backbone.0.0.weight"
    assert torch.equal(target.state_dict()[key], source.state_dict()[key])
    in_memory = build_model("lraspp_mobilenet_v3_large", 5)  # what hub weights go through: a state dict
    assert load_weights(in_memory, source.state_dict()) == (missing, unexpected)
    with pytest.raises(ValueError, match="another architecture"):
        load_weights(build_model("fcn_resnet50", 3), tmp_path / "run.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(target, tmp_path / "missing.pth")


def test_hub_weights_offline_fail_fast(monkeypatch, tmp_path):
    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("socket.create_connection", unreachable)  # offline, wherever the test runs
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # and nothing cached
    with pytest.raises(RuntimeError, match="local path"):
        build_model("fcn_resnet50", 3, weights="DEFAULT")


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_tasks_and_data_modules_train_under_either_lightning_package(namespace, tmp_path):
    """gnlightning.tasks / gnlightning.data for lightning.pytorch, gnlightning.pl for pytorch_lightning: the same
    logic, each accepted by its own package's Trainer, with the data module's resume state in the checkpoint."""
    import importlib

    L = importlib.import_module(namespace)
    if namespace == "pytorch_lightning":
        from gnlightning.pl import SegmentationTask as Task, ShapesDataModule as Data
    else:
        from gnlightning.data import ShapesDataModule as Data
        from gnlightning.tasks import SegmentationTask as Task
    assert issubclass(Task, L.LightningModule) and issubclass(Data, L.LightningDataModule)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    data = Data(num_train=12, num_val=4, num_test=4, image_size=16, batch_size=4)
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[checkpoint],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Task(model, num_classes=4), datamodule=data)
    assert trainer.global_step == 2 and "val/mIoU" not in trainer.callback_metrics  # stopped mid-epoch 0
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)[type(data).__qualname__]
    assert state["epoch"] == 0 and state["batches"] == 2
