"""The Hydra config tree and gnl-train: every config composes and builds, runs end to end, sweeps summarise."""

import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from gnlightning.train import build, build_trainer, world_size
from tests._dist import free_port

CONF = Path(__file__).parents[1] / "gnlightning" / "train_conf"
# Stand-ins for SLURM's sbatch and srun on one node, for the SLURM launch paths.
FAKE_SLURM = Path(__file__).parent / "fake_slurm"
TINY = ["data.num_train=8", "data.num_val=4", "data.num_test=4", "data.image_size=32", "data.batch_size=2",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def composed(overrides, tmp_path):
    with initialize_config_module("gnlightning.train_conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group, choice", [(g, c) for g in ("norm", "trainer", "callbacks", "logger", "optim")
                                           for c in options(g)])
def test_every_group_option_composes_and_instantiates(group, choice, tmp_path):
    from hydra.utils import instantiate

    cfg = composed([f"{group}={choice}", *TINY], tmp_path)
    if group == "trainer":
        assert world_size(cfg.trainer) >= 1
        if cfg.trainer.accelerator == "cpu" and cfg.trainer.get("strategy") is None:
            instantiate(cfg.trainer, logger=False)
        return
    if group == "logger":
        if choice == "tensorboard":
            pytest.importorskip("tensorboard")
        instantiate(cfg.logger)
        return
    if group == "callbacks":
        for node in cfg.callbacks.values():
            instantiate(node)
        return
    data, task, plugins = build(cfg)
    assert task.hparams.num_classes == data.num_classes


@pytest.mark.parametrize("model", options("model"))
def test_every_model_config_builds_with_the_shapes_data(model, tmp_path):
    cfg = composed([f"model={model}", "norm=gn", *TINY], tmp_path)
    data, task, _ = build(cfg)
    assert data.task == ("detection" if type(task).__name__ == "DetectionTask" else "segmentation")


def test_syncbn_on_one_device_falls_back_to_bn_and_uses_plugin_on_two(tmp_path, caplog):
    cfg = composed(["norm=syncbn", *TINY], tmp_path)
    with caplog.at_level(logging.INFO, logger="gnlightning"):
        _, task, plugins = build(cfg)
    assert [type(p).__name__ for p in plugins] == ["AtomicCheckpointIO"]
    assert "nothing to synchronise with" in caplog.text
    cfg = composed(["norm=syncbn", "trainer=ddp_cpu", "norm.sync_group_size=2", *TINY], tmp_path)
    _, task, plugins = build(cfg)
    assert [type(p).__name__ for p in plugins] == ["AtomicCheckpointIO", "SyncBatchNormPlugin"]
    assert plugins[1].group_size == 2


@pytest.mark.parametrize("override, message", [
    ("norm.num_group=8", "num_group"),
    ("norm.num_groups=eight", "num_groups"),
    ("data.batch_sise=2", "batch_sise"),
    ("model=deeplab", "deeplab"),
    ("norm=gnws", "gnws"),
])
def test_typos_fail_fast_naming_the_key(override, message, tmp_path):
    with pytest.raises(Exception) as info:
        cfg = composed([*TINY, override], tmp_path)
        build(cfg)
    assert message in str(info.value)


def test_wrong_type_in_target_config_names_key_and_type(tmp_path):
    cfg = composed([*TINY, "data.num_train=many"], tmp_path)
    with pytest.raises(ValueError, match=r"data.num_train='many'.*expects int"):
        build(cfg)


def error_chain(error: BaseException) -> str:
    """An exception and its causes, as Hydra prints them."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return "\n".join(messages)


def test_every_trainer_argument_is_a_key_at_the_trainers_default(tmp_path):
    import lightning.pytorch as L

    cfg = composed(["trainer=cpu"], tmp_path)
    parameters = inspect.signature(L.Trainer).parameters
    assert set(cfg.trainer) == {"_target_", *parameters}
    written = OmegaConf.load(CONF / "trainer" / "cpu.yaml")
    for name, parameter in parameters.items():
        if name not in written:
            assert cfg.trainer[name] == parameter.default, name


def fitless_trainer(cfg, tmp_path, **kwargs):
    from gnlightning.lightning.checkpoint_io import AtomicCheckpointIO

    options = dict(callbacks=[], logger=False, plugins=[AtomicCheckpointIO()], output_dir=tmp_path)
    return build_trainer(cfg.trainer, **{**options, **kwargs})


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.max_steps=3", "trainer.limit_val_batches=1"], {"max_steps": 3, "limit_val_batches": 1}),
    (["trainer.limit_val_batches=0.5"], {"limit_val_batches": 0.5}),  # a fraction stays a float, one batch an int
    (["trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=2"],
     {"check_val_every_n_epoch": None, "val_check_interval": 2}),
    (["trainer.gradient_clip_val=0.5", "trainer.accumulate_grad_batches=2"],
     {"gradient_clip_val": 0.5, "accumulate_grad_batches": 2}),
    (["+trainer.num_sanity_val_steps=0"], {"num_sanity_val_steps": 0}),  # '+' still works on a key set to null
])
def test_trainer_arguments_set_without_plus_reach_the_trainer(overrides, expected, tmp_path):
    cfg = composed([*TINY, *overrides], tmp_path)
    build(cfg)
    trainer = fitless_trainer(cfg, tmp_path)
    assert {key: getattr(trainer, key) for key in expected} == expected
    assert all(type(getattr(trainer, key)) is type(value) for key, value in expected.items())


def test_arguments_left_at_the_trainers_default_are_not_passed(tmp_path, monkeypatch):
    # Lightning takes PL_TRAINER_<ARG> as the default of an argument that is not passed: a Trainer built from every
    # key of the schema would ignore such variables.
    monkeypatch.setenv("PL_TRAINER_LIMIT_TRAIN_BATCHES", "2")
    assert fitless_trainer(composed(TINY, tmp_path), tmp_path).limit_train_batches == 2
    cfg = composed([*TINY, "trainer.limit_train_batches=3"], tmp_path)
    assert fitless_trainer(cfg, tmp_path).limit_train_batches == 3


def test_object_arguments_from_the_config_join_gnl_trains_own(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor, Timer
    from lightning.pytorch.loggers import CSVLogger

    from gnlightning import SyncBatchNormPlugin
    from gnlightning.lightning.checkpoint_io import AtomicCheckpointIO

    cfg = composed([*TINY, "trainer.strategy=ddp", "trainer.devices=2", "trainer.sync_batchnorm=true",
                    "trainer.plugins=[{_target_:gnlightning.SyncBatchNormPlugin,group_size:2}]",
                    "trainer.callbacks=[{_target_:lightning.pytorch.callbacks.Timer}]", "trainer.logger=false",
                    f"trainer.default_root_dir={tmp_path / 'elsewhere'}"], tmp_path)
    build(cfg)
    trainer = fitless_trainer(cfg, tmp_path, logger=CSVLogger(tmp_path), callbacks=[LearningRateMonitor()])
    assert isinstance(trainer.strategy._layer_sync, SyncBatchNormPlugin)
    assert trainer.strategy._layer_sync.group_size == 2
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert [sum(isinstance(c, kind) for c in trainer.callbacks) for kind in (LearningRateMonitor, Timer)] == [1, 1]
    assert trainer.logger is None and trainer.default_root_dir == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("override, fragments", [
    ("trainer.max_step=3", ["trainer.max_step", "did you mean trainer.max_steps"]),
    ("+trainer.max_step=3", ["trainer.max_step", "did you mean trainer.max_steps"]),
    ("trainer.max_steps=many", ["trainer.max_steps", "many", "Integer"]),
    ("trainer.limit_val_batches=many", ["trainer.limit_val_batches", "many", "Union[float, int]"]),
    ("trainer.precision=16-mixd", ["trainer.precision", "did you mean 16-mixed"]),
    ("trainer.deterministic=always", ["trainer.deterministic", "warn", "bool"]),
    ("+trainer.max_steps=3", ["trainer.max_steps=3"]),  # Hydra: the key exists, drop the '+'
])
def test_trainer_typos_and_wrong_types_fail_naming_the_key(override, fragments, tmp_path):
    with pytest.raises(Exception) as info:
        build(composed([*TINY, override], tmp_path))
    for fragment in fragments:
        assert fragment in error_chain(info.value)


def launch_env(*path_dirs: Path, **variables: str) -> dict[str, str]:
    """Environment for gnl-train and its launch scripts: one thread per process, ``path_dirs`` then this
    interpreter's scripts (where gnl-train and torchrun are) first on PATH, plus ``variables``."""
    path = os.pathsep.join([*map(str, path_dirs), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {**os.environ, "OMP_NUM_THREADS": "1", **variables, "PATH": path}


def run_cli(args, cwd, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "gnlightning.train", *args], cwd=cwd, env=env or launch_env(),
                          timeout=timeout, capture_output=True, text=True, check=False)


def test_gnl_train_end_to_end_single_process(tmp_path):
    result = run_cli([*TINY, "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["settings"]["norm"] == "gn_ws" and results["settings"]["batch_size_per_device"] == 2
    assert 0 <= results["metrics"]["test/mIoU"] <= 1
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "test/mIoU" in result.stdout  # the final metrics table


@pytest.mark.distributed
def test_gnl_train_ddp_cpu_one_output_directory(tmp_path):
    result = run_cli([*TINY, "trainer=ddp_cpu", "norm=syncbn", "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no per-rank Hydra directories
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["settings"]["world_size"] == 2 and results["settings"]["total_batch_size"] == 4


@pytest.mark.distributed
def test_torchrun_launch_script_two_cpu_processes(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "launch_torchrun.sh"
    env = launch_env(NPROC="2", RUN_DIR=str(tmp_path / "run"), MASTER_PORT=str(free_port()))
    result = subprocess.run(["bash", str(script), "trainer=ddp_cpu", *TINY], cwd=tmp_path, env=env, timeout=300,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["settings"]["world_size"] == 2


@pytest.mark.distributed
def test_slurm_batch_script_under_srun_trains_on_the_tasks_of_the_allocation(tmp_path):
    # scripts/slurm.sbatch as SLURM would run it in a one-node allocation of two tasks, with a stand-in srun that
    # starts the tasks with SLURM's per-task variables. Lightning must take ranks and world size from SLURM: had it
    # started processes of its own, each task would build a world of its own on the same port and fail or hang.
    # The script must hand it the allocation's shape (Lightning refuses devices != SLURM_NTASKS_PER_NODE).
    script = Path(__file__).parents[1] / "scripts" / "slurm.sbatch"
    env = launch_env(FAKE_SLURM, SLURM_JOB_ID="4242", SLURM_JOB_NAME="gnl-train", SLURM_NNODES="1", SLURM_NTASKS="2",
                     SLURM_NTASKS_PER_NODE="2", SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(free_port()),
                     RUN_DIR=str(tmp_path / "run"))
    result = subprocess.run(["bash", str(script), "trainer.accelerator=cpu", "trainer.precision=32-true", *TINY],
                            cwd=tmp_path, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    settings = json.loads((tmp_path / "run" / "results.json").read_text())["settings"]
    assert (settings["world_size"], settings["total_batch_size"]) == (2, 4)


@pytest.mark.distributed
def test_sweep_as_slurm_array_jobs_each_trains_on_two_tasks(tmp_path):
    # gnl-train -m hydra/launcher=slurm through the real hydra-submitit-launcher and submitit, down to sbatch: a
    # stand-in sbatch runs the array's jobs on this machine with the allocation's variables (no sacct: submitit then
    # waits for each job's result file, as it says in its warning). Every job is one DDP world of two SLURM tasks.
    result = run_cli(["-m", "hydra/launcher=slurm", "norm=bn,gn", "trainer=ddp_cpu",
                      "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=null",
                      "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=null",
                      *TINY, "run_test=false", "hydra.sweep.dir=sweep"],
                     tmp_path, env=launch_env(FAKE_SLURM, MASTER_PORT=str(free_port())))
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    for job, norm in (("0", "bn"), ("1", "gn")):
        settings = json.loads((sweep / job / "results.json").read_text())["settings"]
        assert (settings["norm"], settings["world_size"]) == (norm, 2)
    # submitit ran each job as SLURM tasks 0 and 1 of an array job (its result files are named after them)
    assert sorted(path.name.split("_", 1)[1] for path in sweep.glob(".submitit/*/*_result.pkl")) == [
        "0_0_result.pkl", "0_1_result.pkl", "1_0_result.pkl", "1_1_result.pkl"]


@pytest.mark.distributed
def test_sweep_with_lightning_ddp_runs_each_job_on_two_ranks_in_its_own_directory(tmp_path):
    # Lightning re-launches rank 1 of every job with that job's overrides and output directory (not "-m" again,
    # which would start a sweep per rank); the sweep directory holds exactly the jobs.
    result = run_cli(["-m", "norm=bn,gn", "trainer=ddp_cpu", *TINY, "run_test=false", "hydra.sweep.dir=sweep"],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, norm in (("0", "bn"), ("1", "gn")):
        settings = json.loads((sweep / job / "results.json").read_text())["settings"]
        assert (settings["norm"], settings["world_size"], settings["total_batch_size"]) == (norm, 2, 4)
        assert (sweep / job / "train_ddp_process_1.log").is_file()  # rank 1 ran inside this job's directory


def test_sweep_2x2_produces_summary(tmp_path):
    result = run_cli(["-m", "norm=bn,gn", "data.batch_size=2,4", *TINY[:-4], "trainer.max_epochs=1",
                      "trainer.enable_progress_bar=false", "run_test=false", "hydra.sweep.dir=sweep"], tmp_path,
                     timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    from gnlightning.sweep_summary import summarize

    paths = summarize(tmp_path / "sweep")
    table = paths["md"].read_text()
    assert "| bn |" in table and "| gn |" in table and "2/device" in table and "4/device" in table
    assert len(paths["csv"].read_text().strip().splitlines()) == 5
    assert paths["png"].stat().st_size > 0


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_recipes_compose(experiment, tmp_path):
    cfg = composed([f"experiment={experiment}", "data.root=/nonexistent", "++data.num_classes=3"]
                   if experiment.startswith(("voc", "coco")) else [f"experiment={experiment}"], tmp_path)
    assert cfg.data.batch_size == 2 and cfg.norm.name in ("gn", "gn_ws", "bn")


@pytest.mark.parametrize("layout, model", [("coco", "fasterrcnn_resnet50_fpn"), ("coco", "timm_segmentation"),
                                           ("voc", "timm_segmentation"), ("folder", "timm_segmentation")])
def test_file_data_configs_build_and_fit_from_written_files(layout, model, tmp_path):
    from gnlightning.data import write_coco, write_folder, write_voc

    writer = {"coco": write_coco, "voc": write_voc, "folder": write_folder}[layout]
    root = writer(tmp_path / layout, num_train=4, num_val=2, image_size=32, seed=1)
    overrides = [f"data={layout}", f"data.root={root}", f"model={model}", "data.batch_size=2", "data.num_workers=0",
                 "data.image_size=32", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                 "trainer.log_every_n_steps=1", "run_test=false", "~callbacks.lr_monitor"]
    if layout in ("voc", "folder"):
        overrides.append("data.num_classes=4")
    if "rcnn" in model:  # few proposals: an untrained detector's thousand boxes only cost time here
        overrides += ["+model.options.rpn_pre_nms_top_n_test=50", "+model.options.rpn_post_nms_top_n_test=20",
                      "+model.options.box_detections_per_img=10"]
    cfg = composed(overrides, tmp_path)
    data, task, _ = build(cfg)
    assert data.num_classes == 4 and task.hparams.num_classes == 4
    from gnlightning.train import run

    metrics = run(cfg)
    assert all(value == value for value in metrics.values())  # finite, not NaN


def test_gnl_inspect_reports_conversion_without_training(tmp_path):
    from gnlightning.inspect_norms import report

    text = report(composed(["norm=gn_ws", "model=lraspp_mobilenet_v3_large"], tmp_path))
    assert "model lraspp_mobilenet_v3_large, norm gn_ws" in text
    assert "WSConv2d" in text and "GroupNorm" in text and "BatchNorm" not in text
    assert "parameters:" in text and "before" in text
