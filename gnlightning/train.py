"""``gnl-train``: compose -> instantiate -> fit -> test, and a results file per run.

Everything of substance lives in the library (models, tasks, data modules, callbacks); this module only wires a
composed config together, so that a run is reproducible from its ``.hydra/config.yaml`` alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from gnlightning.config_values import divisors
from gnlightning.lightning.checkpoint_io import AtomicCheckpointIO
from gnlightning.lightning.precise_bn import PreciseBN
from gnlightning.models import build_model, task_of
from gnlightning.norm_spec import NormSpec
from gnlightning.schema import check_target, explicit_arguments, register
from gnlightning.tasks import DetectionTask, SegmentationTask

log = logging.getLogger("gnlightning")

register()


def norm_spec(cfg: DictConfig) -> NormSpec:
    """The NormSpec of a ``norm`` node: its ``name`` and options (null: NormSpec's default)."""
    options = OmegaConf.to_container(cfg, resolve=True)
    return NormSpec.of(options.pop("name"), **{key: value for key, value in options.items() if value is not None})


def built_norm(spec: NormSpec) -> NormSpec:
    """What the model is built with: ``syncbn`` trains BatchNorm, which SyncBatchNormPlugin synchronises inside each
    DDP process (and reverts after fit)."""
    return dataclasses.replace(spec, norm="bn", sync_group_size=None) if spec.norm == "syncbn" else spec


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes the configured trainer will run (devices x nodes); ``-1`` / ``"auto"`` count visible GPUs."""
    devices = trainer_cfg.get("devices", 1)
    if devices in (-1, "-1", "auto"):
        on_gpu = trainer_cfg.get("accelerator") in ("gpu", "cuda") or (
            trainer_cfg.get("accelerator", "auto") == "auto" and torch.cuda.is_available())
        devices = max(1, torch.cuda.device_count()) if on_gpu else 1
    elif isinstance(devices, str):
        devices = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    elif not isinstance(devices, int):
        devices = len(devices)
    return devices * int(trainer_cfg.get("num_nodes", 1))


def check_config(cfg: DictConfig) -> None:
    """Settings that would otherwise fail late (inside fit, in every DDP process) or with a message that names
    neither the config key nor the fix: checked before anything is built."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hint = " (or data=shapes, the built-in data that needs no files)" if any(
            key.startswith("data.") for key in missing) else ""
        raise ValueError(f"{', '.join(missing)} must be set (the chosen config leaves it open: ???); add e.g. "
                         f"{missing[0]}=<value> to the command line{hint}")
    batch_size = cfg.data.get("batch_size") if cfg.get("data") else None
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size < 1:
        raise ValueError(f"data.batch_size={batch_size}: the number of images per device must be at least 1 (2 or "
                         "more if the model trains BatchNorm), e.g. data.batch_size=2")
    devices = cfg.trainer.get("devices", 1)
    if devices not in (-1, "-1", "auto"):
        processes = world_size(cfg.trainer)
        sync_group_size = cfg.norm.get("sync_group_size")
        if cfg.norm.name == "syncbn" and sync_group_size and processes % sync_group_size:
            valid = divisors(processes)
            raise ValueError(f"norm.sync_group_size={sync_group_size} must divide the number of processes, "
                             f"{processes} (trainer.devices x trainer.num_nodes); valid choices: {valid}")
        from lightning.fabric.plugins.environments import TorchElasticEnvironment

        if TorchElasticEnvironment.detect():
            launched = int(os.environ.get("WORLD_SIZE", processes))
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", launched))
            if launched != processes:
                raise ValueError(
                    f"torchrun started {launched} process(es) (WORLD_SIZE={launched}, {per_node} per node) but the "
                    f"trainer is configured for {processes} (trainer.devices={devices} x trainer.num_nodes="
                    f"{cfg.trainer.get('num_nodes', 1)}); make them agree: trainer.devices={per_node} "
                    f"trainer.num_nodes={max(1, launched // per_node)}, or torchrun --nproc-per-node={devices}"
                )
    ckpt_path = cfg.get("ckpt_path")
    if (isinstance(ckpt_path, str) and ckpt_path not in ("last", "best", "hpc", "registry")
            and "://" not in ckpt_path and not ckpt_path.startswith("registry:") and not os.path.exists(ckpt_path)):
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file; pass the path of a .ckpt a "
                                "previous run wrote (<run dir>/checkpoints/last.ckpt), or ckpt_path=null to start "
                                "from scratch")


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, list]:
    """The data module, the task with its (converted) model, and the trainer plugins for ``cfg``."""
    task_type = task_of(cfg.model.name)  # an unknown model name fails here, listing the valid ones
    check_config(cfg)
    for group in ("data", "trainer", "logger"):
        if cfg.get(group):
            check_target(cfg[group], group)
    for name, node in (cfg.callbacks or {}).items():
        if node is not None:
            check_target(node, f"callbacks.{name}")
    spec = norm_spec(cfg.norm)
    plugins: list = [AtomicCheckpointIO()]  # last.ckpt is the old or the new one, never a torn file
    if spec.norm == "syncbn":
        if world_size(cfg.trainer) > 1:
            from gnlightning import SyncBatchNormPlugin

            plugins.append(SyncBatchNormPlugin(spec.sync_group_size))
        else:
            log.info("norm=syncbn on a single device: nothing to synchronise with, training plain BatchNorm")
    data = instantiate(cfg.data)
    model_options = dict(cfg.model.options)
    if "num_classes" in model_options:
        raise ValueError(f"model.options.num_classes={model_options['num_classes']}: the number of classes comes from "
                         f"the data (data has {data.num_classes}); remove it from the model config "
                         "(~model.options.num_classes) and set the data's classes instead")
    image_size = _detection_size(data) if task_type == "detection" else None
    model = build_model(cfg.model.name, data.num_classes, norm=built_norm(spec),
                        weights=cfg.model.weights, image_size=image_size, **model_options)
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
    trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=logger, plugins=plugins, output_dir=output_dir)
    trainer.fit(task, datamodule=data, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.run_test:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        for result in trainer.test(task, datamodule=data, ckpt_path=best, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    if trainer.is_global_zero:
        write_results(output_dir, cfg, metrics, trainer)
    return metrics


def build_trainer(trainer_cfg: DictConfig, callbacks: list, logger: Any, plugins: list, output_dir: Path) -> L.Trainer:
    """The Trainer of ``trainer_cfg``, with gnl-train's callbacks, logger and plugins.

    Only the arguments the config moves off the Trainer's defaults are passed (see ``explicit_arguments``). What the
    config gives the Trainer itself is combined with gnl-train's own: ``trainer.callbacks`` and ``trainer.plugins``
    (``_target_`` nodes) are added to them, ``trainer.logger`` (a node, or false) replaces the logger group's, and
    ``trainer.default_root_dir`` the run directory."""
    arguments = explicit_arguments(trainer_cfg)
    extra: dict[str, Any] = {}
    for key, ours in (("callbacks", callbacks), ("plugins", plugins)):
        theirs = arguments.pop(key, None)
        theirs = [] if theirs is None else theirs if isinstance(theirs, ListConfig) else [theirs]
        extra[key] = [*ours, *(instantiate(node) for node in theirs)]
    if "logger" not in arguments:
        extra["logger"] = logger
    if "default_root_dir" not in arguments:
        extra["default_root_dir"] = str(output_dir)
    return instantiate(arguments, _convert_="all", **extra)


def write_results(output_dir: Path, cfg: DictConfig, metrics: dict[str, float], trainer: L.Trainer) -> None:
    """``results.json`` (what sweep summaries read) and a metrics table on stdout."""
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


def remove_failed_run_dir(output_dir: Path) -> bool:
    """Delete the output directory of a run that failed before writing anything of its own; True if deleted.

    Why: Hydra creates the run directory, its ``.hydra/`` copies of the config and the job log before the task
    starts, so a run refused for a bad setting would leave a directory that looks like a run but holds no results
    (sweep summaries and "latest run" habits then pick it up). Only a directory holding nothing but those Hydra
    files (and empty directories, e.g. a logger's) is removed; one with a checkpoint, metrics, results or anything
    else is kept, and so is the current working directory or one of its parents.
    """
    if any(int(os.environ.get(name, 0)) for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK")):
        return False  # under DDP only the first process decides: another may be writing while this one failed
    output_dir = output_dir.resolve()
    if not output_dir.is_dir() or output_dir == Path.cwd().resolve() or output_dir in Path.cwd().resolve().parents:
        return False
    for path in output_dir.rglob("*"):
        relative = path.relative_to(output_dir)
        hydra_file = relative.parts[0] == ".hydra" or (len(relative.parts) == 1 and path.suffix == ".log")
        if path.is_file() and not hydra_file:
            return False
    shutil.rmtree(output_dir, ignore_errors=True)
    return True


@hydra.main(version_base="1.3", config_path="train_conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except BaseException:
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        if remove_failed_run_dir(output_dir):
            log.info("removed %s: the run failed before writing anything but Hydra's own files", output_dir)
        raise
    return metrics.get("val/mIoU", metrics.get("val/mAP"))  # for sweepers that optimise


if __name__ == "__main__":
    main()
