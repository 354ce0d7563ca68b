"""``gnl-train``: compose -> instantiate -> fit -> test, and a results file per run.

Everything of substance lives in the library (models, tasks, data modules, callbacks); this module only wires a
composed config together, so that a run is reproducible from its ``.hydra/config.yaml`` alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gnlightning.layers import resolve_norm_name
from gnlightning.models import build_model, task_of
from gnlightning.schema import check_target, register
from gnlightning.tasks import DetectionTask, SegmentationTask

log = logging.getLogger("gnlightning")

register()


def norm_settings(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """The norm name and convert_norms options of a ``norm`` node."""
    options = OmegaConf.to_container(cfg, resolve=True)
    name = resolve_norm_name(options.pop("name"))
    options.pop("sync_group_size", None)
    return name, {k: v for k, v in options.items() if v is not None}


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes the configured trainer will run (devices x nodes); ``-1`` / ``"auto"`` count visible GPUs."""
    devices = trainer_cfg.get("devices", 1)
    if devices in (-1, "-1", "auto"):
        devices = max(1, torch.cuda.device_count()) if trainer_cfg.get("accelerator") in ("gpu", "cuda") else 1
    elif isinstance(devices, str):
        devices = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    elif not isinstance(devices, int):
        devices = len(devices)
    return devices * int(trainer_cfg.get("num_nodes", 1))


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, list]:
    """The data module, the task with its (converted) model, and the trainer plugins for ``cfg``."""
    task_type = task_of(cfg.model.name)  # an unknown model name fails here, listing the valid ones
    for group in ("data", "trainer", "logger"):
        if cfg.get(group):
            check_target(cfg[group], group)
    for name, node in (cfg.callbacks or {}).items():
        if node is not None:
            check_target(node, f"callbacks.{name}")
    norm, options = norm_settings(cfg.norm)
    plugins = []
    if norm == "syncbn":
        # BN is built, and SyncBatchNormPlugin synchronises it inside each DDP process (and reverts after fit).
        norm = "bn"
        if world_size(cfg.trainer) > 1:
            from gnlightning import SyncBatchNormPlugin

            plugins.append(SyncBatchNormPlugin(group_size=cfg.norm.get("sync_group_size")))
        else:
            log.info("norm=syncbn on a single device: nothing to synchronise with, training plain BatchNorm")
    data = instantiate(cfg.data)
    model_options = dict(cfg.model.options)
    if "num_classes" in model_options:
        raise ValueError("model.options.num_classes: the number of classes comes from the data "
                         f"(data has {data.num_classes}); remove it from the model config")
    model = build_model(cfg.model.name, data.num_classes, norm=norm, norm_options=options,
                        weights=cfg.model.weights, image_size=_detection_size(data) if task_type == "detection" else None,
                        **model_options)
    task_class = SegmentationTask if task_type == "segmentation" else DetectionTask
    task = task_class(model, num_classes=data.num_classes, optimizer=instantiate(cfg.optim.optimizer),
                      scheduler=instantiate(cfg.optim.scheduler), warmup_steps=cfg.optim.warmup_steps,
                      weight_decay=cfg.optim.weight_decay, class_names=getattr(data, "class_names", None))
    return data, task, plugins


def _detection_size(data: L.LightningDataModule) -> int | None:
    """The size a detection model resizes images to: the data's own, so that nothing is rescaled twice."""
    size = getattr(data, "image_size", None) or data.hparams.get("image_size")
    return max(size) if isinstance(size, (tuple, list)) else size


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and test one configuration; returns the final metrics."""
    L.seed_everything(cfg.seed, workers=True)
    data, task, plugins = build(cfg)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values() if node is not None]
    logger = instantiate(cfg.logger) if cfg.logger else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, plugins=plugins,
                                     default_root_dir=str(output_dir))
    trainer.fit(task, datamodule=data, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.run_test:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        for result in trainer.test(task, datamodule=data, ckpt_path=best, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    if trainer.is_global_zero:
        write_results(output_dir, cfg, metrics, trainer)
    return metrics


def write_results(output_dir: Path, cfg: DictConfig, metrics: dict[str, float], trainer: L.Trainer) -> None:
    """``results.json`` (what sweep summaries read) and a metrics table on stdout."""
    from gnlightning.lightning.precise_bn import PreciseBN

    batch_size = cfg.data.get("batch_size")
    precise_bn = any(isinstance(callback, PreciseBN) for callback in trainer.callbacks)
    settings = {
        # "variant" is what sweep summaries compare: bn with and without PreciseBN are different recipes
        "variant": cfg.norm.name + ("+precise_bn" if precise_bn else ""),
        "norm": cfg.norm.name, "model": cfg.model.name, "data": cfg.data._target_.rsplit(".", 1)[-1],
        "batch_size_per_device": batch_size, "world_size": trainer.world_size,
        "total_batch_size": batch_size * trainer.world_size if batch_size else None, "seed": cfg.seed,
        "max_epochs": trainer.max_epochs, "global_step": trainer.global_step,
    }
    (output_dir / "results.json").write_text(json.dumps({"settings": settings, "metrics": metrics}, indent=2))
    width = max(map(len, metrics), default=10)
    print("\n".join([f"{'metric'.ljust(width)}  value", f"{'-' * width}  ------"]
                    + [f"{k.ljust(width)}  {v:.4f}" for k, v in sorted(metrics.items())]))
    print(f"results: {output_dir / 'results.json'}")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    return metrics.get("val/mIoU", metrics.get("val/mAP"))  # for sweepers that optimise


if __name__ == "__main__":
    main()
