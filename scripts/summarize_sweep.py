"""Summarise a `gnl-train -m` sweep: python scripts/summarize_sweep.py multirun/2026-11-23_12-00-00 [--metric val/mIoU]"""

import argparse

from gnlightning.sweep_summary import summarize

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dir")
    parser.add_argument("--metric", default=None)
    parser.add_argument("--out", default=None, help="directory for summary.csv/.md/.png (default: the sweep dir)")
    args = parser.parse_args()
    for kind, path in summarize(args.sweep_dir, args.metric, args.out).items():
        print(f"{kind}: {path}")
