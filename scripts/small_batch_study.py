#!/usr/bin/env python
"""The small-batch study: validation mIoU (segmentation) or box mAP@50 (detection) against images per device, one
line per norm (the GN paper's Figure 1, and its detection table at 1-8 images per device).

Why a script and not a `gnl-train -m` sweep: the runs must see the same number of images whatever the batch, with
a learning rate scaled to the total batch, and syncbn needs a 2-process DDP trainer while everything else runs on
one process -- per-run arithmetic that a sweep grid cannot express. Every run is still a plain `gnl-train` command
(printed, and saved with its Hydra config), so any point of the plot can be rerun or extended by hand.

Protocol (defaults; all flags below):
* data: the built-in shapes (1024 training images of 64x64, 128 validation images), model: the default timm
  ResNet-18 segmentation model, optimiser: AdamW with the poly schedule.
* every run sees ``--images`` training images: ``max_epochs = images / num_train`` (1024; detection: 512) for every
  batch size and world size.
* learning rate ``--base-lr`` at a total batch of ``--base-batch``, scaled by ``sqrt(total / base)`` for AdamW
  (square-root scaling is the rule for adaptive optimisers; linear scaling, as for SGD, with
  ``--lr-scaling linear``); warm-up covers the same number of images (``--warmup-images``) in every run.
* variants: bn, bn + PreciseBN (callbacks=precise_bn), syncbn over 2 DDP processes (per-device batch b, total 2b),
  gn, gn_ws, ln, in; per-device batch 1, 2, 4, 8, 16; seeds 0 and 1.
* single-process runs go ``--jobs`` at a time with one thread each; a syncbn run takes all the slots.
* the metric is val/mIoU after the last epoch (no checkpoint selection).

``--task detection`` runs the same protocol on the detection recipe (``experiment=shapes_det_gn_ws``: the light
FCOS detector, timm ResNet-18 + FPN + FCOS head, on 128 px shapes): variants frozen_bn, bn, syncbn (2 processes),
gn, gn_ws at 1, 2, 4 and 8 images per device, the norm set for backbone, FPN and heads alike; 1536 training images
per run (3 epochs of 512, to fit 90 minutes on 2 cores); the metric is val/mAP_50 after the last epoch (64 images);
results in docs/detection_study.

``--quick`` is a smoke test of the whole pipeline (every variant, 1 and 2 images per device, one seed, 32 training
images of 64 px, written under outputs/ unless ``--out`` says otherwise): minutes, not a result.

Finished runs are skipped, so an interrupted study resumes where it stopped. Results: ``<out>/summary.csv``,
``summary.md`` and ``summary.png``, and ``<out>/study.md`` with the command, the wall time and the table.

Usage:  python scripts/small_batch_study.py [--task detection] [--out DIR --seeds 0 1 --jobs 2] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from threading import Lock, Semaphore

from gnlightning.sweep_summary import summarize

VARIANTS = ("frozen_bn", "bn", "bn+precise_bn", "syncbn", "gn", "gn_ws", "ln", "in", "evonorm_s0", "frn")


@dataclass(frozen=True)
class Protocol:
    """What differs between the segmentation and the detection study; everything else is shared."""

    variants: tuple[str, ...]
    batches: tuple[int, ...]
    metric: str
    out: str
    title: str
    recipe: tuple[str, ...] = ()  # gnl-train overrides every run starts from
    num_train: int = 1024  # training images per epoch
    images: int = 2048  # training images seen per run


PROTOCOLS = {
    "segmentation": Protocol(("bn", "bn+precise_bn", "syncbn", "gn", "gn_ws", "ln", "in"), (1, 2, 4, 8, 16),
                             "val/mIoU", "docs/small_batch_study", "Small-batch study"),
    "detection": Protocol(("frozen_bn", "bn", "syncbn", "gn", "gn_ws"), (1, 2, 4, 8), "val/mAP_50",
                          "docs/detection_study", "Detection small-batch study",
                          # 3 epochs of 512: 40 runs (8 of them on 2 processes), 74 min on 2 cores
                          # (docs/detection_study/study.md), inside the 90 minutes the study may take
                          recipe=("experiment=shapes_det_gn_ws",), num_train=512, images=1536),
}
# --quick: every variant at 1 and 2 images per device on a handful of small images, to test the pipeline.
QUICK = ("data.num_val=8", "data.image_size=64")  # and data.num_train=QUICK_NUM_TRAIN
QUICK_NUM_TRAIN, QUICK_IMAGES = 16, 32


@dataclass(frozen=True)
class Run:
    variant: str
    batch: int
    seed: int

    @property
    def world_size(self) -> int:
        return 2 if self.variant == "syncbn" else 1

    @property
    def name(self) -> str:
        return f"{self.variant}_b{self.batch}_s{self.seed}"


def overrides(run: Run, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The gnl-train arguments of one run."""
    total = run.batch * run.world_size
    ratio = total / args.base_batch
    lr = args.base_lr * (math.sqrt(ratio) if args.lr_scaling == "sqrt" else ratio)
    norm, _, extra = run.variant.partition("+")
    return [
        *args.protocol.recipe,
        *(QUICK if args.quick else ()),
        f"norm={norm}",
        *(["callbacks=precise_bn"] if extra == "precise_bn" else []),
        *(["trainer=ddp_cpu"] if run.world_size > 1 else []),
        f"data.batch_size={run.batch}",
        f"data.num_train={args.num_train}",
        f"trainer.max_epochs={args.images // args.num_train}",
        f"optim.optimizer.lr={lr:.6g}",
        f"optim.warmup_steps={max(1, round(args.warmup_images / total))}",
        f"seed={run.seed}",
        "run_test=false",
        "~callbacks.checkpoint",
        "~callbacks.last_checkpoint",
        "+trainer.enable_checkpointing=false",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]


def execute(run: Run, args: argparse.Namespace, runs_dir: Path, slots: Semaphore, taking: Lock) -> str:
    run_dir = runs_dir / run.name
    if (run_dir / "results.json").exists():
        return f"{run.name}: done before, skipped"
    command = ["gnl-train", *overrides(run, args, run_dir)]
    needed = min(run.world_size, args.jobs)
    with taking:  # all slots of a run at once: two 2-slot runs holding one slot each would wait for ever
        for _ in range(needed):
            slots.acquire()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with (run_dir / "run.log").open("w") as log:
            log.write(shlex.join(command) + "\n")
            log.flush()
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        seconds = time.perf_counter() - start
    finally:
        for _ in range(needed):
            slots.release()
    status = "ok" if code == 0 else f"FAILED (exit {code}, see {run_dir / 'run.log'})"
    return f"{run.name}: {status} in {seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(PROTOCOLS), default="segmentation")
    parser.add_argument("--quick", action="store_true", help="a smoke test of the pipeline in minutes, no result")
    parser.add_argument("--out", type=Path, default=None, help="default: docs/small_batch_study or "
                        "docs/detection_study (--quick: outputs/small_batch_study_quick/<task>)")
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS, help="default: the task's")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: the task's")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 (--quick: 0)")
    parser.add_argument("--images", type=int, default=None,
                        help="training images seen per run, whole epochs (default: the task's, 2048 / 1536)")
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--base-batch", type=int, default=8)
    parser.add_argument("--lr-scaling", choices=("sqrt", "linear"), default="sqrt")
    parser.add_argument("--warmup-images", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=2, help="single-process runs at a time (one per core)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    args = parser.parse_args()
    args.protocol = protocol = PROTOCOLS[args.task]
    args.num_train = QUICK_NUM_TRAIN if args.quick else protocol.num_train
    args.out = args.out or Path(f"outputs/small_batch_study_quick/{args.task}" if args.quick else protocol.out)
    args.variants = args.variants or list(protocol.variants)
    args.batches = args.batches or ([1, 2] if args.quick else list(protocol.batches))
    args.seeds = args.seeds or ([0] if args.quick else [0, 1])
    args.images = args.images or (QUICK_IMAGES if args.quick else protocol.images)
    if args.images % args.num_train:
        parser.error(f"--images {args.images} must be a multiple of the {args.num_train} training images "
                     "(whole epochs)")

    runs = [Run(v, b, s) for s in args.seeds for b in args.batches for v in args.variants]
    # Largest runs first keeps the slots busy at the end; the 2-process runs are queued last for the same reason.
    runs.sort(key=lambda run: (run.world_size, run.batch))
    runs_dir = args.out / "runs"
    slots, taking = Semaphore(args.jobs), Lock()
    start = time.perf_counter()
    failures = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for line in pool.map(lambda run: execute(run, args, runs_dir, slots, taking), runs):
            print(line, flush=True)
            failures += "FAILED" in line
    wall = time.perf_counter() - start

    paths = summarize(runs_dir, protocol.metric, args.out)
    command = shlex.join(["python", "scripts/small_batch_study.py", *sys.argv[1:]])
    table = paths["md"].read_text()
    (args.out / "study.md").write_text(
        f"# {protocol.title}{' (--quick smoke test, not a result)' if args.quick else ''}\n\n"
        f"Command: `{command}`\n\nWall time: {wall / 60:.1f} min for {len(runs)} runs "
        f"(finished runs are skipped on a rerun, so this is the time of the last invocation), "
        f"{os.cpu_count()} CPU cores, {args.threads} thread(s) per process, {args.jobs} job(s) at a time.\n\n"
        f"Each run: `gnl-train {' '.join(protocol.recipe + (QUICK if args.quick else ()))}` with the overrides "
        f"in its run.log, {args.images} training images seen, lr {args.base_lr:g} at total batch {args.base_batch} "
        f"scaled by {args.lr_scaling}(total / {args.base_batch}), warm-up over {args.warmup_images} images; "
        f"syncbn runs on 2 DDP processes (total batch = 2 x per-device batch).\n\n{table}"
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    print(f"study: {args.out / 'study.md'} ({wall / 60:.1f} min)")
    if failures:
        sys.exit(f"{failures} run(s) failed; rerun the same command to retry them")


if __name__ == "__main__":
    main()
