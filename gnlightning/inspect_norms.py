"""``gnl-inspect``: what a configured norm conversion does to a configured model, without training anything."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from gnlightning.convert import convert_norms, describe_norms
from gnlightning.models import build_model
from gnlightning.models.parts import format_parts, norm_parts
from gnlightning.schema import register
from gnlightning.train import built_norm, norm_spec

register()


def report(cfg: DictConfig) -> str:
    """The describe_norms table of ``cfg.model`` after ``cfg.norm``, the norm layers per part (backbone, FPN, heads
    of a detector), and parameter counts."""
    spec = norm_spec(cfg.norm)
    num_classes = cfg.data.get("num_classes") or 2
    model = build_model(cfg.model.name, num_classes, **dict(cfg.model.options))
    total_before = sum(p.numel() for p in model.parameters())
    trainable_before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    after = convert_norms(model, built_norm(spec))
    total_after = sum(p.numel() for p in after.parameters())
    trainable_after = sum(p.numel() for p in after.parameters() if p.requires_grad)
    return "\n".join([
        f"model {cfg.model.name}, norm {spec.norm}" + (" (BatchNorm, synchronised by SyncBatchNormPlugin under DDP)"
                                                            if spec.norm == "syncbn" else ""),
        str(describe_norms(after)),
        format_parts(norm_parts(after)),
        f"parameters: {total_before:,} before, {total_after:,} after; trainable: {trainable_before:,} before, "
        f"{trainable_after:,} after",
    ])


@hydra.main(version_base="1.3", config_path="train_conf", config_name="train")
def main(cfg: DictConfig) -> None:
    print(report(cfg))


if __name__ == "__main__":
    main()
