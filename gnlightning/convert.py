"""Module surgery: swap the normalization layers of any model for another member of the family.

``convert_norms`` works in two phases. It first *plans* every replacement (building each new layer next to the old
one, resolving group counts, checking patterns) without touching the model, then *applies* them with plain
attribute assignments. So an error (an impossible group count under ``strict=True``, a bad option) leaves the model
exactly as it was, never half converted.

New layers take over the old layers' parameter and buffer tensors wherever the target keeps them (BN <-> SyncBN,
BN -> GN affine, Conv2d -> WSConv2d): state-dict keys stay the same, pretrained values carry over, and round trips
such as bn -> syncbn -> bn are exact to the bit.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from gnlightning.layers.create_norm import entry_groups
from gnlightning.layers.group_norm import (MIN_VALUES_PER_GROUP, GroupSizeCheck, degenerate_message, feature_groups,
                                           resolve_num_groups)
from gnlightning.layers.norm_source import NormSource, finish, has_act
from gnlightning.layers.optional_timm import timm_layers
from gnlightning.layers.registry import REGISTRY, norm_kind
from gnlightning.layers.sync_batchnorm import SyncBatchNorm
from gnlightning.layers.ws_conv import WSConv2d
from gnlightning.norm_spec import NormSpec

__all__ = ["convert_norms", "convert_with_report", "revert_sync_batchnorm", "describe_norms", "NormRow", "NormTable",
           "ConversionReport", "NormConversionWarning"]

log = logging.getLogger("gnlightning")

_SYNC_BN = (nn.SyncBatchNorm, SyncBatchNorm)
# Skips the user asked for; every other skip is a surprise and is reported as a warning (or raised with strict).
_INTENDED_SKIPS = ("not included", "excluded")


class NormConversionWarning(UserWarning):
    """A conversion that did not do all it was asked, or built a layer that cannot normalize well."""


def _ws_types() -> tuple[type, ...]:
    """Convolutions that already standardize their weights."""
    types: tuple[type, ...] = (WSConv2d,)
    layers = timm_layers()
    if layers is not None:
        types += (layers.StdConv2d, layers.ScaledStdConv2d)
    return types


@dataclass
class ConversionReport:
    """What one ``convert_norms`` call did; ``str(report)`` is the one-line summary it logs."""

    norm: str
    converted: Counter = field(default_factory=Counter)  # (source type, target type) -> count
    unchanged: int = 0
    wrapped: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer name, reason)
    warnings: list[str] = field(default_factory=list)  # what the caller must show at WARNING level

    @property
    def changed(self) -> bool:
        return bool(self.converted or self.wrapped)

    def __str__(self) -> str:
        parts = [f"converted {n} {src} -> {dst}" for (src, dst), n in self.converted.items()] or ["converted nothing"]
        if self.unchanged:
            parts.append(f"kept {self.unchanged} already {self.norm}")
        if self.wrapped:
            parts.append(f"wrapped {self.wrapped} Conv2d with WS")
        if self.skipped:
            shown = ", ".join(f"{name or '<root>'} ({reason})" for name, reason in self.skipped[:5])
            more = f", and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            parts.append(f"skipped {len(self.skipped)}: {shown}{more}")
        return ", ".join(parts)


def _matches(name: str, patterns: Sequence[str]) -> list[str]:
    """Patterns matching ``name`` or one of its ancestors (so ``"backbone"`` covers ``"backbone.layer1.0.bn1"``)."""
    parts = name.split(".") if name else [""]
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return [p for p in patterns if any(fnmatch.fnmatchcase(prefix, p) for prefix in prefixes)]


class _Scope:
    """include / exclude filtering by module name, remembering which patterns ever matched."""

    def __init__(self, spec: NormSpec) -> None:
        self.include = list(spec.include or ())
        self.exclude = list(spec.exclude or ())
        self.used: set[str] = set()

    def why_not(self, name: str) -> str | None:
        hits = _matches(name, self.include)
        self.used.update(hits)
        if self.include and not hits:
            return "not included"
        hits = _matches(name, self.exclude)
        self.used.update(hits)
        return "excluded" if hits else None

    def warn_unused(self, layer_names: Sequence[str]) -> None:
        """Warn about each pattern that matched nothing, showing a few real layer names to aim at."""
        shown = ", ".join(repr(name) for name in layer_names[:4]) + (", ..." if len(layer_names) > 4 else "")
        names = f"; this model's norm layers are named {shown}" if layer_names else ""
        for option, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if pattern not in self.used:
                    warnings.warn(
                        f"convert_norms: {option} pattern {pattern!r} matched no norm layer or convolution; "
                        "patterns are globs over module names as printed by describe_norms(model), "
                        f"e.g. 'backbone.*' or 'roi_heads'{names}",
                        stacklevel=3,
                    )


def _is_target(source: NormSource, norm: str, groups: int | None) -> bool:
    module = source.module
    if norm == "bn":
        return source.kind == "bn" and not isinstance(module, _SYNC_BN)
    if norm == "syncbn":
        return isinstance(module, SyncBatchNorm)
    if norm in ("gn", "ln", "in"):
        return source.kind == "gn" and source.groups == groups
    return source.kind == norm and source.groups == groups


def _feeds_features(previous: nn.Module | None, source: NormSource) -> bool:
    """Whether the layer normalizes ``(N, C)`` features, one value per channel: it follows an ``nn.Linear`` of its
    width (the MLP block Linear -> BatchNorm1d), so a GroupNorm there sees ``C / G`` values per group."""
    source_class = source.bn_class or type(source.module)
    return (isinstance(previous, nn.Linear) and previous.out_features == source.channels
            and not issubclass(source_class, (nn.BatchNorm2d, nn.BatchNorm3d)))


def _target_groups(source: NormSource, spec: NormSpec, features: bool) -> int | None:
    return entry_groups(REGISTRY[spec.target], source.channels, spec.num_groups, spec.group_size, spec.strict,
                        source.name, policy=feature_groups if features else resolve_num_groups)


def _why_unfit(source: NormSource, norm: str, features: bool) -> str | None:
    """Why ``norm`` cannot replace this layer without changing what it is, or None. ``features``: the layer
    normalizes ``(N, C)`` features (see :func:`_feeds_features`)."""
    entry = REGISTRY[norm]
    if norm == "frozen_bn" and getattr(source.module, "running_mean", None) is None:
        return "no running statistics to freeze"
    source_class = source.bn_class or type(source.module)
    if entry.spatial_only and (features or source.kind == "bn" and not issubclass(source_class, nn.BatchNorm2d)):
        return f"{norm} takes (N, C, H, W) input only"
    if entry.always_affine and not (source.affine and source.bias):
        return f"{norm} would add a learnt scale and shift"
    if entry.always_affine and has_act(source.module):
        return f"{norm} has no form that keeps a fused activation"
    return None


# Why a skip happened -> what the user can do about it.
_SKIP_FIXES = {
    "no running statistics to freeze": (
        "frozen_bn freezes BatchNorm statistics; for a GroupNorm model use norm='gn' (or set requires_grad=False on "
        "the norm parameters to freeze them), or leave these layers out with exclude="),
    "not a plain Conv2d": (
        "Weight Standardization replaces nn.Conv2d only (a subclass's own forward would be lost); leave these "
        "convolutions out with exclude=, or pass ws=False"),
    "takes (N, C, H, W) input only": (
        "timm's EvoNorm-S0 and FRN layers normalize 2-d feature maps only; use gn or ln for 1-d / 3-d layers, or "
        "leave them out with exclude="),
    "has no form that keeps a fused activation": (
        "timm's norm+act layers (BatchNormAct2d, GroupNormAct) convert to bn, syncbn, frozen_bn and the GN family; "
        "build the model with EvoNorm / FRN as its norm_layer instead (get_norm_layer), or leave them out with "
        "exclude="),
    "would add a learnt scale and shift": (
        "the source layer has no affine scale or shift (affine=False / bias=False), which this norm always learns; "
        "use gn or ln, or leave these layers out with exclude="),
}


def _skip_warnings(norm: str, module: nn.Module, report: ConversionReport, strict: bool) -> None:
    """One warning per kind of unexpected skip, naming the layers and the fix; with ``strict``, an error."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in report.skipped:
        if reason not in _INTENDED_SKIPS:
            by_reason.setdefault(reason, []).append(f"{name!r} ({type(module.get_submodule(name)).__name__})")
    for reason, layers in by_reason.items():
        nothing = "nothing to freeze, the model is unchanged: " if (
            norm == "frozen_bn" and not report.converted and not report.unchanged) else ""
        shown = ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")
        message = (f"convert_norms({norm!r}): {nothing}left {len(layers)} layer(s) as they are ({reason}): {shown}. "
                   f"{next((fix for key, fix in _SKIP_FIXES.items() if reason.endswith(key)), '')}")
        if strict:
            raise ValueError(message + " (raised because strict=True; the model is unchanged)")
        report.warnings.append(message)


def _build(source: NormSource, norm: str, groups: int | None, eps: float | None, process_group: Any) -> nn.Module:
    """The layer that replaces ``source``, built by its family (the registry's ``convert``): same channels, device,
    dtype, mode, affine values, statistics and fused activation."""
    return finish(source, REGISTRY[norm].convert(source, groups, source.eps if eps is None else eps, process_group))


def _process_group(spec: NormSpec, process_group: Any) -> Any:
    """The group syncbn synchronises within: ``process_group``, or the ``sync_group_size`` consecutive ranks that
    hold this one (None: the whole world)."""
    group_size = spec.sync_group_size
    if group_size is None:
        return process_group
    if process_group is not None:
        raise ValueError("pass either process_group or sync_group_size for syncbn, not both")
    from gnlightning.distributed import is_distributed, new_consecutive_groups

    if not is_distributed():
        raise ValueError(
            f"syncbn with sync_group_size={group_size} needs an initialised torch.distributed process group; "
            "convert inside each training process (SyncBatchNormPlugin(sync_group_size=...) does this under "
            "Lightning DDP)"
        )
    return new_consecutive_groups(group_size)


@dataclass
class _Plan:
    """What phase 1 decided: new modules by dotted name, SyncBN layers to move to the requested group, and what the
    WS pass needs (each convolution right before a converted norm layer)."""

    replacements: dict[str, nn.Module] = field(default_factory=dict)
    resync: list[SyncBatchNorm] = field(default_factory=list)
    ws_candidates: list[tuple[str, nn.Module]] = field(default_factory=list)
    norm_names: list[str] = field(default_factory=list)  # every norm layer of the model, in scope or not
    # (layer name, parameters the new layer adds, parameters it drops): FRN's tau, EvoNorm's v
    parameter_changes: list[tuple[str, list[str], list[str]]] = field(default_factory=list)


def _parameter_change(old: nn.Module, new: nn.Module) -> tuple[list[str], list[str]]:
    """Parameters of ``new`` that ``old`` has in no form, and those of ``old`` that ``new`` drops. A frozen layer's
    buffers count as its parameters' form, so bn <-> frozen_bn changes nothing here."""
    def names(module: nn.Module, kind: str) -> set[str]:
        return {name for name, _ in getattr(module, kind)(recurse=False)}

    added = names(new, "named_parameters") - names(old, "named_parameters") - names(old, "named_buffers")
    dropped = names(old, "named_parameters") - names(new, "named_parameters") - names(new, "named_buffers")
    return sorted(added), sorted(dropped)


def _parameter_warnings(norm: str, plan: _Plan, report: ConversionReport) -> None:
    """One warning if the new layers add parameters (FRN's learnt threshold, EvoNorm's v) and one if they drop
    some, naming the layers and what to do. Not raised under ``strict``: the parameters belong to the norm asked
    for, and refusing them would refuse the norm."""
    for index, (what, fix) in enumerate((
            ("add parameters the old layers did not have", (
                "they start from their defaults and are trained from scratch: build the optimizer after converting "
                "(NormSwap converts before configure_optimizers) and load checkpoints written before the "
                "conversion with strict=False")),
            ("drop parameters the old layers had", (
                "their learnt values are lost with the old layers; keep the old checkpoint if you need them")))):
        layers = [f"{name!r} ({', '.join(('+', '-')[index] + p for p in change[index])})"
                  for name, *change in plan.parameter_changes if change[index]]
        if layers:
            shown = ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")
            report.warnings.append(f"convert_norms({norm!r}): {len(layers)} new layer(s) {what}: {shown}; {fix}")


def _plan_norm(name: str, child: nn.Module, kind: str, previous: tuple[str, nn.Module] | None, spec: NormSpec,
               process_group: Any, scope: _Scope, plan: _Plan, report: ConversionReport) -> None:
    """Plan the replacement of one norm layer (or record why it stays)."""
    source = NormSource.read(name, child, kind)
    previous_name, previous_module = previous or ("", None)
    features = _feeds_features(previous_module, source)
    reason = scope.why_not(name) or _why_unfit(source, spec.target, features)
    if reason is not None:
        report.skipped.append((name, reason))
        return
    if isinstance(previous_module, nn.Conv2d) and previous_module.out_channels == source.channels:
        plan.ws_candidates.append((previous_name, previous_module))
    groups = _target_groups(source, spec, features)
    if _is_target(source, spec.target, groups):
        report.unchanged += 1
        if spec.target == "syncbn" and process_group is not None:
            plan.resync.append(child)
        return
    new = _build(source, spec.target, groups, spec.eps, process_group)
    if groups is not None and features:  # (N, C) input: the values per group are known now
        values = source.channels // groups
        if values < MIN_VALUES_PER_GROUP:
            message = degenerate_message(name, values, groups, source.channels,
                                         f"(N, {source.channels}) features after {previous_name!r}")
            if spec.strict:
                raise ValueError(message + " (raised because strict=True; the model is unchanged)")
            report.warnings.append(message)
    elif groups is not None or spec.target == "frn":  # depends on the input's spatial size: checked at the
        # first forward (FRN normalizes each channel over H x W: on 1x1 maps it only keeps the sign)
        new.register_forward_pre_hook(GroupSizeCheck(name, spec.strict))
    plan.replacements[name] = new
    added, dropped = _parameter_change(child, new)
    if added or dropped:
        plan.parameter_changes.append((name, added, dropped))
    report.converted[(type(child).__name__, type(new).__name__)] += 1


def _plan_norms(module: nn.Module, spec: NormSpec, process_group: Any, scope: _Scope,
                only: tuple[type, ...] | None, report: ConversionReport) -> _Plan:
    """Walk the model in registration order (each norm layer sees the module registered before it, for WS and for
    ``(N, C)`` features) and plan every norm layer's replacement."""
    plan = _Plan()
    previous: tuple[str, nn.Module] | None = None
    last_norm: str | None = None
    for name, child in module.named_modules():
        if last_norm is not None and (last_norm == "" or name.startswith(last_norm + ".")):
            continue  # the act / drop children of a fused norm layer
        kind = norm_kind(child)
        if kind is not None:
            last_norm = name
            plan.norm_names.append(name)
            if only is None or isinstance(child, only):
                _plan_norm(name, child, kind, previous, spec, process_group, scope, plan, report)
        previous = (name, child)
    return plan


def _plan_ws(module: nn.Module, spec: NormSpec, scope: _Scope, plan: _Plan, report: ConversionReport) -> None:
    """Plan Weight Standardization: ``"auto"`` wraps the convolutions right before converted norm layers, ``True``
    every plain Conv2d in scope; a request with nothing to wrap warns (or raises, for an explicit ``True``)."""
    in_scope = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Conv2d) and scope.why_not(n) is None]
    pool = plan.ws_candidates if spec.ws_mode == "auto" else in_scope
    already, ws_types = 0, _ws_types()
    for name, conv in pool:
        if isinstance(conv, ws_types) or scope.why_not(name) is not None:
            already += isinstance(conv, ws_types)
            continue
        if type(conv) is not nn.Conv2d:  # e.g. timm's Conv2dSame: its forward would be lost
            report.skipped.append((name, f"{type(conv).__name__} is not a plain Conv2d"))
            continue
        plan.replacements[name] = WSConv2d.from_conv(conv, eps=spec.ws_eps)
        report.wrapped += 1
    if report.wrapped or already:
        return
    norm, ws = spec.norm, spec.ws_mode
    no_ws = "ws=False" + (" (or norm='gn', GroupNorm without WS)" if norm == "gn_ws" else "")
    if ws is True or not in_scope:
        # WS standardizes convolution filters: asked for explicitly with no convolution to act on, the request
        # cannot be what the user meant (e.g. an MLP, or include/exclude leaving out every conv).
        message = (f"convert_norms({norm!r}, ws={ws!r}): Weight Standardization needs an nn.Conv2d to wrap, "
                   f"but {type(module).__name__} has no Conv2d in scope of the conversion; pass {no_ws}, "
                   "or widen include / exclude if the convolutions were left out")
        if ws is True:
            raise ValueError(message)
    else:
        message = (f"convert_norms({norm!r}, ws='auto'): no plain nn.Conv2d right before a converted norm "
                   f"layer (with matching channels) to wrap with Weight Standardization, though "
                   f"{len(in_scope)} Conv2d are in scope; pass ws=True to wrap every Conv2d in scope, or "
                   f"{no_ws} for no WS")
    if plan.norm_names:  # a model without any norm layer gets the one warning of convert_with_report
        report.warnings.append(message)


def _apply(module: nn.Module, plan: _Plan, process_group: Any) -> nn.Module:
    """Phase 2: plain attribute assignments, which cannot fail half way. Returns the (possibly new) root."""
    for layer in plan.resync:
        layer.process_group = process_group
    for name, new in plan.replacements.items():
        if name == "":
            module = new
            continue
        module.set_submodule(name, new)
    return module


def convert_with_report(module: nn.Module, spec: NormSpec, process_group: Any = None,
                        only: tuple[type, ...] | None = None) -> tuple[nn.Module, ConversionReport]:
    """:func:`convert_norms` for callers that show its outcome themselves (NormSwap logs it once per run, on rank 0):
    the converted root and the :class:`ConversionReport`, with nothing logged or warned. ``only`` restricts the
    source layers to these classes (SyncBatchNormPlugin converts BatchNorm only).

    Phase 1 plans every replacement without touching ``module`` (errors leave it as it was); phase 2 applies them.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_norms expects an nn.Module, got {type(module).__name__}")
    if spec.norm == "syncbn":
        process_group = _process_group(spec, process_group)
    report = ConversionReport(spec.norm)
    scope = _Scope(spec)
    plan = _plan_norms(module, spec, process_group, scope, only, report)
    if spec.ws_mode:
        _plan_ws(module, spec, scope, plan, report)
    if not plan.norm_names:
        report.warnings.append(
            f"convert_norms({spec.norm!r}): {type(module).__name__} has no BatchNorm, SyncBatchNorm, "
            "FrozenBatchNorm2d, GroupNorm, EvoNorm or FRN layer; returning it unchanged")
    _skip_warnings(spec.norm, module, report, spec.strict)
    _parameter_warnings(spec.norm, plan, report)
    scope.warn_unused(plan.norm_names)
    return _apply(module, plan, process_group), report


def convert_norms(module: nn.Module, norm: str | NormSpec, *,
                  process_group: torch.distributed.ProcessGroup | None = None, **options: Any) -> nn.Module:
    """Replace every normalization layer of ``module`` by ``norm`` and return the (possibly new) root.

    ``convert_norms(model, "gn_ws", num_groups=16)`` or ``convert_norms(model, NormSpec("gn_ws", num_groups=16))``.

    Args:
        module: any nn.Module; it is modified in place, except when the root itself is a norm layer, so always use
            the returned module.
        norm: a norm name (``bn, syncbn, gn, gn_ws, frozen_bn, ln, in, evonorm_s0, frn``, case-insensitive;
            ``GN+WS``, ``SyncBN`` ... accepted) or a :class:`~gnlightning.NormSpec`.
        options: :class:`~gnlightning.NormSpec`'s options (``num_groups``, ``group_size``, ``sync_group_size``,
            ``strict``, ``ws``, ``ws_eps``, ``eps``, ``include``, ``exclude``), documented there.
        process_group: for ``syncbn``, the group to synchronise within (default: the whole world, or
            ``sync_group_size`` consecutive ranks).

    Recognised source layers: BatchNorm1d/2d/3d, torch and gnlightning SyncBatchNorm, torchvision and timm
    FrozenBatchNorm2d, GroupNorm, and timm's fused norm+act layers (whose activation and dropout are kept).
    Affine values, running statistics, device, dtype, requires_grad, train/eval mode and module names are kept;
    no parameter is added or dropped (a BatchNorm without affine or bias gives a GroupNorm / SyncBatchNorm without
    them, and a frozen layer remembers them for the way back), except the parameters a norm has and BatchNorm has
    not (EvoNorm-S0's ``v``, FRN's ``tau``), which come and go with a warning naming the layers.

    Loud, never silently wrong: layers left unconverted for a reason the user did not ask for (e.g. ``frozen_bn``
    on a layer without running statistics), include / exclude patterns that match nothing, and GroupNorms over too
    few values per group (``in`` or 32 groups on the ``(N, C)`` features of an MLP) give a
    :class:`NormConversionWarning` naming the layer and the fix, or a ValueError with ``strict=True``. For ``(N, C)``
    features (a norm right after an ``nn.Linear``) ``gn`` uses at least 16 channels per group unless
    ``group_size`` says otherwise; every other converted GroupNorm checks its values per group at its first forward.
    """
    spec = NormSpec.of(norm, **options)
    converted, report = convert_with_report(module, spec, process_group)
    log.info("convert_norms(%s): %s", report.norm, report)
    for message in report.warnings:
        warnings.warn(message, NormConversionWarning, stacklevel=2)
    return converted


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every SyncBatchNorm (gnlightning's or torch's) back into a plain BatchNorm and return the root.

    The original class (BatchNorm1d/2d/3d) is restored when the layer came from ``convert_norms``; otherwise a
    rank-agnostic ``BatchNormXd`` is used. Values, training mode and names are kept exactly."""
    if not any(isinstance(m, _SYNC_BN) for m in module.modules()):
        return module
    converted, report = convert_with_report(module, NormSpec("bn"), only=_SYNC_BN)
    log.debug("revert_sync_batchnorm: %s", report)
    return converted


@dataclass(frozen=True)
class NormRow:
    """One normalization layer or weight-standardized convolution of a model."""

    name: str
    type: str
    channels: int
    groups: int | None
    eps: float
    frozen: bool
    ws: bool = False


class NormTable(list):
    """``describe_norms`` rows; ``str(table)`` is an aligned text table with a one-line count underneath."""

    _columns = ("name", "type", "channels", "groups", "eps", "frozen")

    def __str__(self) -> str:
        cells = [self._columns] + [
            (row.name or "<root>", row.type, str(row.channels), "-" if row.groups is None else str(row.groups),
             f"{row.eps:g}", "yes" if row.frozen else "no")
            for row in self
        ]
        widths = [max(len(line[i]) for line in cells) for i in range(len(self._columns))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
        counts = Counter(row.type for row in self)
        lines.append(", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no normalization layers")
        return "\n".join(lines)


def describe_norms(module: nn.Module) -> NormTable:
    """One row per normalization layer and weight-standardized convolution, in module order."""
    rows = NormTable()
    ws_types = _ws_types()
    for name, child in module.named_modules():
        if isinstance(child, ws_types):
            rows.append(NormRow(name, type(child).__name__, child.out_channels, None, child.eps,
                                frozen=not child.weight.requires_grad, ws=True))
            continue
        kind = norm_kind(child)
        if kind is None:
            continue
        source = NormSource.read(name, child, kind)
        rows.append(NormRow(name, type(child).__name__, source.channels, source.groups, source.eps,
                            frozen=kind == "frozen_bn"))
    return rows

