"""prepare_for_export: the inference form of a trained model, with the training-only machinery folded away."""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from gnlightning.convert import revert_sync_batchnorm
from gnlightning.layers.norm_source import has_act
from gnlightning.layers.registry import norm_kind
from gnlightning.layers.ws_conv import WSConv2d

__all__ = ["prepare_for_export"]

log = logging.getLogger("gnlightning")


def _fold_ws(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, WSConv2d):
            folded = module.to_conv2d()
            if name:
                model.set_submodule(name, folded)
            else:
                model = folded
    return model


def _statistics(norm: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """(running_mean, running_var, eps, weight, bias) of an eval-mode BN or a frozen BN, else None. timm's fused
    norm+act layers are BatchNorm subclasses whose activation would be lost with the layer: never folded."""
    kind = norm_kind(norm)
    if kind is None or has_act(norm):
        return None
    if kind == "bn" and norm.running_mean is not None and not norm.training:
        weight = norm.weight if norm.affine else torch.ones_like(norm.running_mean)
        bias = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
        return norm.running_mean, norm.running_var, norm.eps, weight, bias
    if kind == "frozen_bn":
        return norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
    return None


class _NormLeafTracer(torch.fx.Tracer):
    """fx keeps only torch.nn's own modules as call_module nodes; frozen BN layers (torchvision's, ours) must stay
    whole too, or their arithmetic is inlined and cannot be matched."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return _statistics(module) is not None or super().is_leaf_module(module, qualified_name)


@torch.no_grad()
def _fold_bn(model: nn.Module) -> tuple[nn.Module, int]:
    """Fold each eval BN / FrozenBN into the Conv2d that feeds it and nothing else, found on the fx graph.

    The graph is what makes the fold exact: a conv whose output also goes elsewhere, or a BN fed by something other
    than a conv, is left alone. Models fx cannot trace (detection models with data-dependent control flow) keep
    their norm layers, which in eval mode compute the same function anyway."""
    try:
        graph = torch.fx.GraphModule(model, _NormLeafTracer().trace(model))
    except Exception as error:  # noqa: BLE001 - fx raises many kinds of errors on untraceable code
        log.info("prepare_for_export: %s cannot be traced by torch.fx (%s); BatchNorm layers kept, not folded",
                 type(model).__name__, type(error).__name__)
        return model, 0
    modules = dict(graph.named_modules())
    folded = 0
    for node in graph.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1:
            continue
        producer = node.args[0]
        if not (isinstance(producer, torch.fx.Node) and producer.op == "call_module" and len(producer.users) == 1):
            continue
        conv, norm = modules.get(producer.target), modules.get(node.target)
        stats = _statistics(norm) if norm is not None else None
        if type(conv) is not nn.Conv2d or stats is None or conv.out_channels != stats[0].numel():
            continue
        mean, var, eps, weight, bias = stats
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, mean, var, eps, weight, bias)
        model.set_submodule(node.target, nn.Identity())
        folded += 1
    return model, folded


def prepare_for_export(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` ready for torch.export / TorchScript / ONNX.

    SyncBatchNorm becomes BatchNorm (no collectives), WSConv2d becomes a plain Conv2d with the standardized weight,
    and BatchNorm / FrozenBatchNorm2d fold into the convolution that feeds them where that is exact. GroupNorm
    stays: its statistics depend on each input. The output equals the original model's in eval mode up to float
    rounding; the original is not modified."""
    exported = copy.deepcopy(model).eval()
    exported = revert_sync_batchnorm(exported)
    exported = _fold_ws(exported)
    exported, folded = _fold_bn(exported)
    for parameter in exported.parameters():
        parameter.requires_grad_(False)
    log.info("prepare_for_export: folded %d norm layers into convolutions", folded)
    return exported
