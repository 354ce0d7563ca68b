"""Typed schemas for the Hydra configs: a misspelt key or a wrong type fails at composition, naming the key and the
allowed values, before anything is built.

The norm, model and optim groups are dataclasses (Hydra's ConfigStore). Groups whose nodes are ``_target_`` specs of
other libraries' classes (data, trainer, callbacks, logger) are checked against the target's signature by
:func:`check_target`, which Hydra cannot do by itself.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf

from gnlightning.models.builders import task_of

__all__ = ["NormConfig", "ModelConfig", "OptimConfig", "TrainConfig", "check_target",
           "register"]

@dataclass
class NormConfig:
    name: str = MISSING  # validated by resolve_norm_name, which lists the valid names
    num_groups: int = 32
    group_size: Optional[int] = None
    strict: bool = False
    ws: Any = None  # "auto", true or false; null = the norm's default
    eps: Optional[float] = None
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    sync_group_size: Optional[int] = None


@dataclass
class ModelConfig:
    name: str = MISSING  # validated by task_of, which lists the valid names
    weights: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    optimizer: Any = None
    scheduler: Any = None
    warmup_steps: int = 50
    weight_decay: float = 1e-4


@dataclass
class TrainConfig:
    norm: NormConfig = MISSING
    model: ModelConfig = MISSING
    optim: OptimConfig = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    callbacks: Dict[str, Any] = field(default_factory=dict)
    logger: Any = None
    seed: int = 0
    run_test: bool = True
    ckpt_path: Optional[str] = None


def _monitor(model_name: str) -> str:
    return "val/mIoU" if task_of(model_name) == "segmentation" else "val/mAP"


def register() -> None:
    """Put the schemas in Hydra's ConfigStore and the ``gnl.*`` resolvers in OmegaConf (idempotent)."""
    ConfigStore.instance().store(name="gnl_train_schema", node=TrainConfig)
    for name, resolver in (("gnl.task_of", task_of), ("gnl.monitor", _monitor)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


_SIMPLE = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def check_target(node: DictConfig, where: str) -> None:
    """Check a ``_target_`` node's keys and simple types against the target's signature.

    Raises ValueError naming the key, the expected type and the accepted keys."""
    try:
        target = get_object(node["_target_"])
    except Exception as error:  # Hydra's message is about import machinery; say which config key and what to do
        name = str(node["_target_"])
        module_name, _, attr = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
            close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=1)
            guess = f"; did you mean {module_name}.{close[0]}?" if close else ""
        except (ImportError, ValueError):  # ValueError: a name without a module part
            guess = f"; module {module_name!r} cannot be imported"
        raise ValueError(f"{where}._target_={name!r}: no such class or function{guess} (the config group's "
                         f"option files in gnlightning/train_conf/{where.split('.')[0]}/ show working targets)") from error
    signature = inspect.signature(target)
    params = signature.parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations: skip type checks, keep key checks
        hints = {}
    accepted = [name for name, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for key in node:
        if key.startswith("_"):
            continue
        if key not in params and not takes_kwargs:
            close = difflib.get_close_matches(key, accepted, n=1)
            guess = f" (did you mean {where}.{close[0]}?)" if close else ""
            raise ValueError(f"{where}.{key}: {node['_target_']} has no parameter {key!r}{guess}; accepted keys: "
                             f"{', '.join(accepted)}")
        value = OmegaConf.select(node, key, throw_on_missing=False)
        expected = _SIMPLE.get(hints.get(key))
        if expected and value is not None and not isinstance(value, (DictConfig,)) and (
                not isinstance(value, expected) or (bool not in expected and isinstance(value, bool))):
            default = params[key].default
            example = (f", e.g. {where}.{key}={str(default).lower() if isinstance(default, bool) else default}"
                       if default is not inspect.Parameter.empty and isinstance(default, expected) else "")
            raise ValueError(f"{where}.{key}={value!r}: {node['_target_']} expects {hints[key].__name__}{example}")
