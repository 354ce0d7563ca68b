"""NormSwap: convert a LightningModule's normalization layers at the right moment of Lightning's lifecycle."""

from __future__ import annotations

import logging
import os
import pickle
from typing import TYPE_CHECKING, Any

import fsspec
import torch
from torch import nn
from typing_extensions import override

from gnlightning.convert import ConversionReport, convert_with_report
from gnlightning.lightning.compat import bases
from gnlightning.norm_spec import NormSpec

if TYPE_CHECKING:  # either Lightning namespace's classes at run time (see compat)
    import lightning.pytorch as pl

__all__ = ["NormSwap", "load_converted", "read_specs", "CHECKPOINT_KEY"]

log = logging.getLogger("gnlightning")

#: Where NormSwap records its settings in a Lightning checkpoint (a list: several NormSwaps may act on one model).
CHECKPOINT_KEY = "gnlightning_norm_swaps"


class NormSwap(*bases("callbacks.Callback")):
    """Swap the normalization layers of the LightningModule (or of one submodule) for ``norm``.

    ``Trainer(callbacks=[NormSwap("gn_ws")])`` is all it takes; options are those of :class:`gnlightning.NormSpec`
    (``num_groups``, ``group_size``, ``ws``, ``include``, ``exclude`` ...), or pass a NormSpec. ``module="model.backbone"`` limits the swap
    to that submodule, so several NormSwaps compose (e.g. ``frozen_bn`` on the backbone, ``gn`` on the heads).

    When: the conversion must come after every place users build layers (``__init__``, ``setup``,
    ``configure_model``) and before the checkpoint is restored, DDP wraps the model and ``configure_optimizers`` runs.
    Lightning (up to 2.6) has no callback hook there, so ``setup`` wraps this LightningModule instance's
    ``configure_model`` (which Lightning calls right after every ``setup``) to convert after it; ``teardown`` removes
    the wrapper. Calling ``configure_model`` from ``setup`` instead would rely on every user's hook being idempotent
    and would run it outside the strategy's init contexts. Lightning PR #21272 proposes the missing hook
    (``Callback.on_before_optimizer_setup``); once a release has it, the conversion belongs there.
    Converting is idempotent: fit then test, or a second fit, changes nothing the second time.

    What it did is logged once, on rank 0: the summary, every layer left unconverted or normalizing too few values
    (as :func:`convert_norms` warns), and a warning when nothing at all was converted.

    The settings are written into every checkpoint: ``NormSwap.from_checkpoint(path)`` re-applies them in an eval
    run, :func:`load_converted` rebuilds the converted model in one line. For ``norm="syncbn"`` under DDP prefer
    :class:`SyncBatchNormPlugin` (it also reverts after fit); NormSwap with ``syncbn`` converts for good, which suits
    a model that should stay SyncBN-shaped in its checkpoints.
    """

    def __init__(self, norm: str | NormSpec, module: str | None = None, **options: Any) -> None:
        try:  # a misspelt option fails when the callback is built, not in the middle of fit
            self.spec = NormSpec.of(norm, **options)
        except TypeError as error:
            raise TypeError(f"NormSwap: {error}") from None
        self.module = module
        #: every conversion this callback applies and records, as (submodule path or None, spec)
        self.targets: list[tuple[str | None, NormSpec]] = [(module, self.spec)]
        self._source: str | None = None  # the checkpoint the targets came from, for repr
        self._announced: set[str] = set()

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | os.PathLike, weights_only: bool | None = None) -> "NormSwap":
        """A NormSwap that re-applies exactly the conversions recorded in a checkpoint written with NormSwap.

        For an eval script that builds the LightningModule from its config and calls
        ``trainer.test(model, ckpt_path=...)``: ``Trainer(callbacks=[NormSwap.from_checkpoint(ckpt_path)])``, or in a
        Hydra callbacks node ``_target_: gnlightning.NormSwap.from_checkpoint`` with ``ckpt_path: ...``. Without it,
        the checkpoint's converted weights meet the unconverted model and Lightning's strict load fails.
        ``weights_only`` is passed to ``torch.load`` as Lightning passes it (``None``: torch's default); a trusted
        checkpoint holding pickled hyper-parameters needs ``weights_only=False``.
        """
        targets = read_specs(ckpt_path, weights_only)
        swap = cls(targets[0][1], targets[0][0])
        swap.targets, swap._source = targets, os.fspath(ckpt_path)
        return swap

    def apply(self, pl_module: nn.Module) -> nn.Module:
        """Convert ``pl_module`` (or its submodules) in place, as fit would; returns ``pl_module``.

        Call it on the model before ``trainer.fit`` where the calling process must hold the converted model
        (``strategy="ddp_spawn"``, see :meth:`setup`)."""
        for _, report in self._apply(pl_module):
            _warn(report.warnings)
        return pl_module

    def _apply(self, pl_module: nn.Module) -> list[tuple[str, ConversionReport]]:
        return [(f" on {module}" if module else "", apply_spec(pl_module, spec, module))
                for module, spec in self.targets]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        original = pl_module.configure_model

        def configure_model() -> None:
            original()
            reports = self._apply(pl_module)
            if trainer.is_global_zero:
                self._announce(trainer, pl_module, reports)

        pl_module.configure_model = configure_model

    def _announce(self, trainer, pl_module: nn.Module, reports: list[tuple[str, ConversionReport]]) -> None:
        """Log, once per message, what the conversion did and what the user must know about it."""
        messages: list[tuple[int, str]] = []
        for where, report in reports:
            if report.changed:
                messages.append((logging.INFO, f"NormSwap({report.norm}){where}: {report}"))
            messages += [(logging.WARNING, f"NormSwap({report.norm}){where}: {text}") for text in report.warnings]
        if not any(report.changed or report.unchanged for _, report in reports):
            messages.append((logging.WARNING, (
                f"NormSwap({', '.join(report.norm for _, report in reports)}): nothing was converted in "
                f"{type(pl_module).__name__}: " + "; ".join(str(report) for _, report in reports)
                + ". Check that the model holds the layers this norm replaces (describe_norms(model) lists them) "
                "and the include / exclude / module options")))
        if _spawns(trainer) and any(report.changed for _, report in reports):
            messages.append((logging.WARNING, (
                f"NormSwap under {type(trainer.strategy).__name__} (a launcher that starts its own processes): "
                "Lightning trains a copy of the model in each new process, so the model object you passed to fit() "
                "is not converted, and after fit Lightning loads the trained weights into it with strict=False, "
                "leaving its norm layers wrong. Fix: convert it before fit (swap.apply(model), or "
                "gnlightning.convert_norms), use strategy='ddp', or rebuild it from the checkpoint with "
                "NormSwap.from_checkpoint / load_converted")))
        for level, message in messages:
            if message not in self._announced:
                self._announced.add(message)
                log.log(level, message)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.__dict__.pop("configure_model", None)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        records = checkpoint.setdefault(CHECKPOINT_KEY, [])
        records.extend(record for record in map(_record, self.targets) if record not in records)

    def __repr__(self) -> str:
        if self._source is not None:
            return f"NormSwap.from_checkpoint({self._source!r})"
        module = f", module={self.module!r}" if self.module else ""
        return f"NormSwap({self.spec!r}{module})"


def _record(target: tuple[str | None, NormSpec]) -> dict[str, Any]:
    """One conversion as NormSwap writes it into checkpoints: plain values only (``weights_only`` loads)."""
    module, spec = target
    return {"norm": spec.norm, "module": module, "options": spec.options()}


def _from_record(record: dict[str, Any]) -> tuple[str | None, NormSpec]:
    options = dict(record.get("options", {}))
    if record["norm"] == "syncbn" and options.get("group_size") is not None:  # written before sync_group_size
        options["sync_group_size"] = options.pop("group_size")
    return record.get("module"), NormSpec.of(record["norm"], **options)


def _warn(messages: list[str]) -> None:
    for message in messages:
        log.warning(message)


def _spawns(trainer) -> bool:
    """Whether the strategy trains in processes it starts itself (ddp_spawn, ddp_notebook): the caller's model
    object then never sees the conversion."""
    launcher = getattr(trainer.strategy, "launcher", None)
    return type(launcher).__name__ == "_MultiProcessingLauncher"


def apply_spec(root: nn.Module, spec: NormSpec, path: str | None = None) -> ConversionReport:
    """Convert ``root`` (or its submodule at dotted ``path``) in place; returns what the conversion did."""
    try:
        target = root.get_submodule(path) if path else root
    except AttributeError as error:
        raise ValueError(
            f"NormSwap(module={path!r}): {type(root).__name__} has no submodule {path!r} (at the time of the swap); "
            "give a dotted path as in model.named_modules(), e.g. 'model.backbone'"
        ) from error
    converted, report = convert_with_report(target, spec)
    if converted is not target:  # the submodule itself was a norm layer
        root.set_submodule(path, converted)
    return report


def read_specs(checkpoint_path: str | os.PathLike,
               weights_only: bool | None = None) -> list[tuple[str | None, NormSpec]]:
    """The conversions a NormSwap recorded in a checkpoint, as (submodule path or None, spec), or a ValueError
    saying the checkpoint has none."""
    path = os.fspath(checkpoint_path)
    try:
        with fsspec.open(path, "rb") as handle:
            checkpoint = torch.load(handle, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint file; pass the path of a .ckpt written by a Trainer "
                                "with NormSwap (e.g. <run dir>/checkpoints/last.ckpt)") from None
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds objects that torch.load(weights_only=True) refuses ({error}); if you trust "
                         "this checkpoint, pass weights_only=False") from error
    specs = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not specs:
        raise ValueError(
            f"{path} holds no NormSwap settings (key {CHECKPOINT_KEY!r}): it was not written by a Trainer with a "
            "NormSwap callback; load it without NormSwap, or pass the norm yourself: NormSwap('gn_ws', ...)")
    return [_from_record(record) for record in specs]


def load_converted(module_class: type, checkpoint_path: str | os.PathLike, **kwargs: Any):
    """Rebuild a LightningModule trained with NormSwap and load its checkpoint, in one line::

        model = load_converted(MyModule, "last.ckpt")

    It is Lightning's own ``MyModule.load_from_checkpoint`` with every keyword passed on (``map_location``,
    ``strict``, ``weights_only`` ...; a trusted checkpoint with pickled hyper-parameters needs
    ``weights_only=False``), with the recorded conversions applied right before the weights are loaded: Lightning
    calls ``on_load_checkpoint`` after building the module and running ``configure_model``. The hook goes on a
    throw-away subclass, and the loaded model gets ``module_class`` back, so the user's class is never modified.
    """
    targets = read_specs(checkpoint_path, kwargs.get("weights_only"))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for path, spec in targets:
            apply_spec(self, spec, path)
        module_class.on_load_checkpoint(self, checkpoint)

    names = {"__module__": module_class.__module__, "__qualname__": module_class.__qualname__}
    converting = type(module_class.__name__, (module_class,), {**names, "on_load_checkpoint": on_load_checkpoint})
    model = converting.load_from_checkpoint(checkpoint_path, **kwargs)
    model.__class__ = module_class  # the subclass added a hook, no state
    return model
