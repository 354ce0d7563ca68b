"""Turn a sweep directory (``gnl-train -m ...``) into a CSV, a markdown table and the GN paper's headline plot:
the metric against the per-device batch size, one line per norm."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev

__all__ = ["collect", "summarize"]


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per run: its settings and final metrics, read from every ``results.json`` below ``sweep_dir``."""
    rows = []
    for path in sorted(Path(sweep_dir).rglob("results.json")):
        result = json.loads(path.read_text())
        rows.append({"run": str(path.parent.relative_to(sweep_dir)), **result["settings"], **result["metrics"]})
    if not rows:
        raise FileNotFoundError(f"no results.json below {sweep_dir}: is it the directory of a `gnl-train -m` sweep?")
    return rows


def _cell(values: list[float]) -> str:
    """Mean, and the spread over seeds when there are several (sample standard deviation, n)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{mean(values):.3f} ± {stdev(values):.3f} (n={len(values)})"


def summarize(sweep_dir: str | Path, metric: str | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` (if matplotlib is installed) into ``out_dir``
    (default: the sweep directory). ``metric`` defaults to ``val/mIoU`` or ``val/mAP``, whichever the runs have.
    Runs that differ only in seed are averaged in the table and the plot."""
    rows = collect(sweep_dir)
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = metric or next(m for m in ("val/mIoU", "val/mAP", "test/mIoU", "test/mAP") if m in rows[0])
    columns = list(dict.fromkeys(key for row in rows for key in row))
    paths = {"csv": out / "summary.csv", "md": out / "summary.md"}
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    grouped: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get(metric) is not None:
            grouped[row.get("variant", row["norm"])][row["batch_size_per_device"]].append(row[metric])
    sizes = sorted({size for per_norm in grouped.values() for size in per_norm})
    lines = ["| norm | " + " | ".join(f"{size}/device" for size in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for norm, per_size in grouped.items():
        cells = [_cell(per_size[s]) if s in per_size else "-" for s in sizes]
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    paths["md"].write_text(f"{metric} by norm and images per device\n\n" + "\n".join(lines) + "\n")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    for norm, per_size in grouped.items():
        xs = sorted(per_size)
        spread = [stdev(per_size[x]) if len(per_size[x]) > 1 else 0.0 for x in xs]
        axis.errorbar(xs, [mean(per_size[x]) for x in xs], yerr=spread, marker="o", capsize=3, label=norm)
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.set_xlabel("images per device")
    axis.set_ylabel(metric)
    axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)  # outside: lines cross a lot
    axis.grid(alpha=0.3)
    figure.tight_layout()
    paths["png"] = out / "summary.png"
    figure.savefig(paths["png"], dpi=120)
    plt.close(figure)
    return paths
