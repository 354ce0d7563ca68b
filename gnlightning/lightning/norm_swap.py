"""NormSwap: convert a LightningModule's normalization layers at the right moment of Lightning's lifecycle."""

from __future__ import annotations

import difflib
import inspect
import logging
from typing import Any

from torch import nn

from gnlightning.convert import _convert, convert_norms
from gnlightning.layers.create_norm import resolve_norm_name
from gnlightning.lightning.compat import bases

__all__ = ["NormSwap", "load_converted", "CHECKPOINT_KEY"]

log = logging.getLogger("gnlightning")

#: Where NormSwap records its settings in a Lightning checkpoint (a list: several NormSwaps may act on one model).
CHECKPOINT_KEY = "gnlightning_norm_swaps"


class NormSwap(*bases("callbacks.Callback")):
    """Swap the normalization layers of the LightningModule (or of one submodule) for ``norm``.

    ``Trainer(callbacks=[NormSwap("gn_ws")])`` is all it takes; options are those of :func:`gnlightning.convert_norms`
    (``num_groups``, ``group_size``, ``ws``, ``include``, ``exclude`` ...). ``module="model.backbone"`` limits the swap
    to that submodule, so several NormSwaps compose (e.g. ``frozen_bn`` on the backbone, ``gn`` on the heads).

    When: Lightning has no callback hook between ``configure_model`` and checkpoint restore, yet the conversion must
    come after every place users build layers (``__init__``, ``setup``, ``configure_model``) and before the
    checkpoint is restored, DDP wraps the model and ``configure_optimizers`` runs. So ``setup`` converts what already
    exists and wraps this LightningModule instance's ``configure_model`` (which Lightning calls right after
    ``setup``) to convert once more after it; ``teardown`` removes the wrapper. Converting is idempotent: fit then
    test, or a second fit, changes nothing the second time.

    The settings are written into every checkpoint; :func:`load_converted` rebuilds the converted model from one.
    For ``norm="syncbn"`` under DDP prefer :class:`SyncBatchNormPlugin` (it also reverts after fit); NormSwap with
    ``syncbn`` converts for good, which suits a model that should stay SyncBN-shaped in its checkpoints.
    """

    def __init__(self, norm: str, module: str | None = None, **convert_options: Any) -> None:
        self.norm = resolve_norm_name(norm)
        self.module = module
        self.convert_options = convert_options
        try:  # a misspelt option fails here, not in the middle of fit
            inspect.signature(convert_norms).bind(nn.Identity(), self.norm, **convert_options)
        except TypeError as error:
            valid = [name for name in inspect.signature(convert_norms).parameters if name not in ("module", "norm")]
            close = [difflib.get_close_matches(key, valid, n=1) for key in convert_options if key not in valid]
            guess = "".join(f" (did you mean {match[0]!r}?)" for match in close if match)
            raise TypeError(f"NormSwap: {error}{guess}; options are those of gnlightning.convert_norms: "
                            f"{', '.join(valid)}") from None

    def spec(self) -> dict[str, Any]:
        return {"norm": self.norm, "module": self.module, "options": dict(self.convert_options)}

    def apply(self, pl_module: nn.Module, *, announce: bool = False) -> nn.Module:
        """Convert ``pl_module`` (or its submodule ``self.module``) in place; returns ``pl_module``."""
        return apply_spec(pl_module, self.spec(), announce=announce)

    def setup(self, trainer, pl_module, stage: str) -> None:
        announce = trainer.is_global_zero
        self.apply(pl_module, announce=announce)
        original = pl_module.configure_model

        def configure_model() -> None:
            original()
            self.apply(pl_module, announce=announce)

        pl_module.configure_model = configure_model

    def teardown(self, trainer, pl_module, stage: str) -> None:
        pl_module.__dict__.pop("configure_model", None)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        specs = checkpoint.setdefault(CHECKPOINT_KEY, [])
        if self.spec() not in specs:
            specs.append(self.spec())

    def __repr__(self) -> str:
        options = "".join(f", {key}={value!r}" for key, value in self.convert_options.items())
        module = f", module={self.module!r}" if self.module else ""
        return f"NormSwap({self.norm!r}{module}{options})"


def apply_spec(root: nn.Module, spec: dict[str, Any], *, announce: bool = False) -> nn.Module:
    """Apply one recorded NormSwap setting to ``root``; log the summary when something changed and ``announce``."""
    path = spec.get("module")
    try:
        target = root.get_submodule(path) if path else root
    except AttributeError as error:
        raise ValueError(
            f"NormSwap(module={path!r}): {type(root).__name__} has no submodule {path!r} (at the time of the swap); "
            "give a dotted path as in model.named_modules(), e.g. 'model.backbone'"
        ) from error
    converted, report = _convert(target, spec["norm"], spec.get("options", {}))
    if converted is not target:  # the submodule itself was a norm layer
        parent, _, name = path.rpartition(".")
        setattr(root.get_submodule(parent), name, converted)
    if announce and (report.converted or report.wrapped):
        where = f" on {path}" if path else ""
        log.info("NormSwap(%s)%s: %s", spec["norm"], where, report)
    return root


def load_converted(module_class: type, checkpoint_path: str, **kwargs: Any):
    """Rebuild a LightningModule trained with NormSwap and load its checkpoint, in one line::

        model = load_converted(MyModule, "last.ckpt")

    It is Lightning's own ``MyModule.load_from_checkpoint`` (same hyper-parameters, ``map_location``, ``strict``
    ...), with the recorded conversions applied right before the weights are loaded (Lightning calls
    ``on_load_checkpoint`` after building the module and running ``configure_model``)."""
    from lightning.fabric.utilities.cloud_io import _load as pl_load

    checkpoint = pl_load(checkpoint_path, map_location="cpu", weights_only=False)
    specs = checkpoint.get(CHECKPOINT_KEY)
    if not specs:
        raise ValueError(
            f"{checkpoint_path} holds no NormSwap settings (key {CHECKPOINT_KEY!r}): it was not written by a Trainer "
            f"with a NormSwap callback; use {module_class.__name__}.load_from_checkpoint instead"
        )
    original = module_class.on_load_checkpoint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for spec in specs:
            apply_spec(self, spec)
        original(self, checkpoint)

    module_class.on_load_checkpoint = on_load_checkpoint
    try:
        return module_class.load_from_checkpoint(checkpoint_path, **kwargs)
    finally:
        module_class.on_load_checkpoint = original
