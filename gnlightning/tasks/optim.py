"""What both tasks share: parameter groups without weight decay on norms, and the poly schedule with warm-up."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from gnlightning.layers.registry import is_norm

__all__ = ["param_groups", "poly_warmup", "build_optimizers"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on conv / linear weights, none on biases and norm scales and shifts.

    Decaying gamma and beta pulls normalised activations towards zero for no regularisation benefit (the
    standard practice of detectron2 and timm); it matters more for GN, whose gamma has no running statistics to
    compensate."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if is_norm(module) or name == "bias" or param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def poly_warmup(step: int, *, total_steps: int, warmup_steps: int, power: float = 0.9,
                warmup_factor: float = 0.001) -> float:
    """Learning-rate factor: linear warm-up from ``warmup_factor`` over ``warmup_steps``, then
    ``(1 - step / total_steps) ** power`` (DeepLab's poly schedule)."""
    if step < warmup_steps:
        alpha = step / max(1, warmup_steps)
        return warmup_factor * (1 - alpha) + alpha
    return max(0.0, 1 - step / max(1, total_steps)) ** power


def build_optimizers(module: nn.Module, optimizer: Callable | None, scheduler: Callable | None,
                     total_steps: int, warmup_steps: int, weight_decay: float) -> dict:
    """``configure_optimizers`` for both tasks. ``optimizer`` / ``scheduler`` are partials (Hydra ``_partial_``)
    taking the parameter groups / the optimizer; the defaults are SGD (lr 0.01, momentum 0.9) and poly with
    warm-up, stepped every iteration."""
    optimizer = (optimizer or functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))(
        param_groups(module, weight_decay))
    if scheduler is None:
        factor = functools.partial(poly_warmup, total_steps=total_steps, warmup_steps=min(warmup_steps, total_steps))
        scheduler = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler(optimizer), "interval": "step"}}
