"""Which norm layers sit in which part of a detector: backbone, FPN, heads.

Why: detection recipes differ exactly there (detectron2's default: frozen BN in the backbone and no norm in FPN and
heads; its GN recipe: GN everywhere), and a conversion that silently skipped the heads would look fine in a flat
list of a hundred layers. Counting per part makes that visible, in ``gnl-inspect`` and in tests.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from gnlightning.convert import describe_norms

__all__ = ["DETECTOR_PARTS", "norm_parts", "format_parts", "part_of"]

#: Module-name prefixes of torchvision's detectors (and of gnlightning's timm detectors, which use the same names).
DETECTOR_PARTS = (
    ("backbone", ("backbone.body",)),
    ("fpn", ("backbone.fpn",)),
    ("heads", ("head", "rpn", "roi_heads")),
)


def part_of(name: str) -> str:
    """The part a module name belongs to: ``backbone``, ``fpn``, ``heads``, or else its top-level module name
    (``backbone`` / ``classifier`` ... for segmentation models)."""
    for part, prefixes in DETECTOR_PARTS:
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            return part
    return name.split(".", 1)[0] or "<root>"


def norm_parts(module: nn.Module) -> dict[str, Counter]:
    """Per part, how many layers of each norm type (and ``WSConv2d``) it holds, in module order of the parts.

    A part without any norm layer is listed with an empty counter when the model has it (torchvision's v1 heads,
    or the FPN of a model built without norms there), so that "no norm here" is shown, not omitted."""
    parts: dict[str, Counter] = {}
    names = [name for name, _ in module.named_modules()]
    for part, prefixes in DETECTOR_PARTS:
        if any(name == prefix for name in names for prefix in prefixes):
            parts[part] = Counter()
    for row in describe_norms(module):
        parts.setdefault(part_of(row.name), Counter())[row.type] += 1
    return parts


def format_parts(parts: dict[str, Counter]) -> str:
    """``norm_parts`` as aligned text, one line per part."""
    width = max((len(part) for part in parts), default=4)
    lines = [f"{'part'.ljust(width)}  norm layers"]
    for part, counts in parts.items():
        text = ", ".join(f"{count} {kind}" for kind, count in counts.items()) or "none"
        lines.append(f"{part.ljust(width)}  {text}")
    return "\n".join(lines)
