"""NormSpec: what a model's normalization layers become, as one frozen value.

``convert_norms``, ``NormSwap`` (and the record it writes into checkpoints), ``SyncBatchNormPlugin``, the Hydra
``norm`` node and ``gnl-inspect`` all read their options from this one object, so each option has one name, one
default and one check. ``group_size`` is channels per group (the GN family); the ranks that share SyncBN statistics
are ``sync_group_size``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Iterable

from gnlightning.layers.create_norm import resolve_norm_name
from gnlightning.layers.group_norm import positive_int

__all__ = ["NormSpec"]


def _patterns(value: str | Iterable[str] | None, option: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(f"{option} must be a module-name glob or a list of them, got {value!r}")
    return patterns


@dataclass(frozen=True)
class NormSpec:
    """The target norm and every option of a conversion, checked when built (so a bad value fails before a model
    or a Trainer exists).

    Args:
        norm: one of ``bn, syncbn, gn, gn_ws, frozen_bn, ln, in, evonorm_s0, frn`` (case-insensitive; ``GN+WS``,
            ``SyncBN``, ``FrozenBN`` ... accepted).
        num_groups: groups per layer for ``gn`` / ``gn_ws`` / ``evonorm_s0`` (default 32, as in the GN paper).
        group_size: channels per group instead of ``num_groups``.
        sync_group_size: for ``syncbn``, the number of consecutive ranks that share statistics (``None``: all).
        strict: raise instead of warning: when the group request does not divide a layer (instead of using the
            nearest divisor), when a layer in scope cannot be converted (instead of leaving it), and when a
            GroupNorm would normalize fewer than 8 values per group.
        ws: Weight Standardization on the convolutions: ``"auto"`` wraps each plain Conv2d registered right before
            a converted norm layer with matching channels, ``True`` every Conv2d in scope, ``False`` none; ``None``
            is the norm's default (``"auto"`` for ``gn_ws``, else ``False``).
        ws_eps: eps inside WS's square root.
        eps: eps of the new norm layers (``None``: keep each old layer's eps).
        include, exclude: module-name globs limiting the conversion (a pattern matching a module covers all of its
            descendants).
    """

    norm: str
    num_groups: int | None = 32
    group_size: int | None = None
    sync_group_size: int | None = None
    strict: bool = False
    ws: bool | str | None = None
    ws_eps: float = 1e-6
    eps: float | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        set_("norm", resolve_norm_name(self.norm))
        for option, meaning in (("num_groups", "groups per layer, e.g. num_groups=32 as in the GN paper"),
                                ("group_size", "channels per group, e.g. group_size=16"),
                                ("sync_group_size", "ranks that share statistics, e.g. sync_group_size=8")):
            if getattr(self, option) is not None:
                set_(option, positive_int(getattr(self, option), option, meaning))
        if self.ws not in (None, True, False, "auto"):
            raise ValueError(f"ws must be 'auto', True or False, got {self.ws!r}")
        set_("include", _patterns(self.include, "include"))
        set_("exclude", _patterns(self.exclude, "exclude"))
        if self.norm == "syncbn" and self.group_size is not None:
            raise ValueError(
                f"syncbn with group_size={self.group_size}: group_size is channels per group (the GN family); "
                f"the ranks that share SyncBN statistics are sync_group_size={self.group_size}")
        if self.norm != "syncbn" and self.sync_group_size is not None:
            raise ValueError(f"sync_group_size={self.sync_group_size} applies to syncbn only (ranks that share "
                             f"statistics); {self.norm} has no statistics to share: remove it or use norm='syncbn'")

    @classmethod
    def of(cls, norm: "str | NormSpec", **options: Any) -> "NormSpec":
        """``norm`` with ``options`` (``NormSpec.of("gn", num_groups=16)``, or an existing spec with some options
        replaced); a misspelt option is a TypeError that names the option meant."""
        valid = [spec_field.name for spec_field in dataclasses.fields(cls) if spec_field.name != "norm"]
        unknown = [key for key in options if key not in valid]
        if unknown:
            guesses = "".join(f" (did you mean {match[0]!r}?)" for match in
                              (difflib.get_close_matches(key, valid, n=1) for key in unknown) if match)
            raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))}{guesses}; the options of "
                            f"gnlightning.convert_norms / NormSpec are {', '.join(valid)}")
        if isinstance(norm, NormSpec):
            return dataclasses.replace(norm, **options)
        return cls(norm, **options)

    @property
    def target(self) -> str:
        """The norm layers' kind: gn_ws's is gn (its WS half lives in the convolutions)."""
        return "gn" if self.norm == "gn_ws" else self.norm

    @property
    def ws_mode(self) -> bool | str:
        """``ws`` with the norm's default filled in."""
        if self.ws is None:
            return "auto" if self.norm == "gn_ws" else False
        return self.ws

    def options(self) -> dict[str, Any]:
        """Every option but ``norm``, as plain values (lists, not tuples): keyword arguments for
        :meth:`of`, and what NormSwap records in checkpoints (readable with ``torch.load(weights_only=True)``)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items() if key != "norm"}

    def __repr__(self) -> str:
        changed = "".join(f", {spec_field.name}={getattr(self, spec_field.name)!r}"
                          for spec_field in dataclasses.fields(self)[1:]
                          if getattr(self, spec_field.name) != spec_field.default)
        return f"NormSpec({self.norm!r}{changed})"
