#!/usr/bin/env python
"""Write the synthetic shapes set to disk in COCO, VOCdevkit and/or plain-folder layout.

    python scripts/write_shapes_dataset.py --out data/shapes --layout all --num-train 2000 --num-val 200

With ``--layout all`` each layout goes to its own sub-folder (``coco/``, ``voc/``, ``folder/``); otherwise straight
into ``--out``. The files equal what ``ShapesDataModule(seed=...)`` generates (images quantized to 8 bits).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gnlightning.data.export import LAYOUTS, write_coco, write_folder, write_voc

WRITERS = {"coco": write_coco, "voc": write_voc, "folder": write_folder}


def image_size(text: str) -> int | tuple[int, int]:
    """``64`` or ``48x64`` (height x width)."""
    if "x" in text:
        height, width = text.lower().split("x")
        return int(height), int(width)
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--layout", choices=(*LAYOUTS, "all"), default="all")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--image-size", type=image_size, default=64, help="64 or HxW, e.g. 48x64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=4, help="including the background")
    parser.add_argument("--min-shapes", type=int, default=1)
    parser.add_argument("--max-shapes", type=int, default=5)
    args = parser.parse_args(argv)

    layouts = LAYOUTS if args.layout == "all" else (args.layout,)
    for layout in layouts:
        out = args.out / layout if args.layout == "all" else args.out
        start = time.perf_counter()
        WRITERS[layout](
            out, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed,
            num_classes=args.num_classes, min_shapes=args.min_shapes, max_shapes=args.max_shapes,
        )
        print(f"{layout}: wrote {args.num_train} train + {args.num_val} val images to {out} "
              f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
