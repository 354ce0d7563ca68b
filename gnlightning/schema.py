"""Typed schemas for the Hydra configs: a misspelt key or a wrong type fails at composition, naming the key and the
allowed values, before anything is built.

The norm, model and optim groups are dataclasses (Hydra's ConfigStore). The trainer group's dataclass is generated
from Lightning's ``Trainer`` signature (:func:`trainer_config_class`), so every Trainer argument is a key. Groups whose
nodes are ``_target_`` specs of other libraries' classes (data, trainer, callbacks, logger) are also checked against
the target's signature by :func:`check_target`, which Hydra cannot do by itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Dict, List, Literal, Optional, Union

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from gnlightning.models.builders import task_of
from gnlightning.norm_spec import NormSpec

__all__ = ["NormConfig", "ModelConfig", "OptimConfig", "TrainerConfig", "TrainConfig", "check_target",
           "explicit_arguments", "register", "trainer_config_class"]

_PRIMITIVES = (int, float, bool, str)
_UNION_TYPES = (Union, types.UnionType)


def _config_type(annotation: Any, default: Any) -> Any:
    """What OmegaConf checks a parameter against: its annotation where that is a primitive, or an Optional/Union of
    primitives this OmegaConf can hold (a ``Union[int, float]`` keeps ``1`` an int: one batch, not 100%), else Any."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in _UNION_TYPES else (annotation,)
    primitives = tuple(member for member in members if member is not type(None))
    if not primitives or not all(member in _PRIMITIVES for member in primitives):
        return Any  # objects, lists, Literals, timedelta ...: check_target judges what it can of them
    candidate = Union[primitives] if len(primitives) > 1 else primitives[0]
    if type(None) in members or default is None:
        candidate = Optional[candidate]
    try:  # unions of primitives need OmegaConf >= 2.3's support for them
        OmegaConf.structured(make_dataclass("_Probe", [("value", candidate, field(default=default))]))
    except Exception:
        return Any
    return candidate


def trainer_config_class(target: str = "lightning.pytorch.Trainer") -> type:
    """A dataclass with one field per argument of ``target`` (Lightning's Trainer), typed by :func:`_config_type`
    and defaulting to the Trainer's own default, so that ``trainer.<arg>=`` works for every argument without ``+``.

    Generated from the installed Lightning's signature rather than listed by hand, so that a Lightning upgrade that
    adds or retypes an argument needs no change here. A default OmegaConf cannot hold becomes ``None``;
    :func:`explicit_arguments` leaves every argument at its field default out of the Trainer call."""
    trainer = get_object(target)
    hints = typing.get_type_hints(trainer.__init__)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=target))]
    for name, parameter in inspect.signature(trainer).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        if default is inspect.Parameter.empty:
            default = MISSING
        elif not isinstance(default, (*_PRIMITIVES, type(None))):
            default = None
        fields.append((name, _config_type(hints.get(name, Any), default), field(default=default)))
    return make_dataclass("TrainerConfig", fields)


TrainerConfig = trainer_config_class()

def norm_config_class() -> type:
    """The ``norm`` node: ``name`` and :class:`~gnlightning.NormSpec`'s options, with its types and defaults
    (generated, so that the config cannot drift from what convert_norms takes). NormSpec checks the values."""
    hints = typing.get_type_hints(NormSpec)
    fields: list[tuple[str, Any, Any]] = [("name", str, field(default=MISSING))]
    for spec_field in dataclasses.fields(NormSpec)[1:]:
        if spec_field.name in ("include", "exclude"):
            kind = Optional[List[str]]
        elif spec_field.name == "ws":
            kind = Any  # "auto", true or false: a Union node of bool and str fails OmegaConf 2.3's merges
        else:
            kind = _config_type(hints[spec_field.name], spec_field.default)
        fields.append((spec_field.name, kind, field(default=spec_field.default)))
    return make_dataclass("NormConfig", fields)


NormConfig = norm_config_class()


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
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    logger: Any = None
    seed: int = 0
    run_test: bool = True
    ckpt_path: Optional[str] = None


def _monitor(model_name: str) -> str:
    return "val/mIoU" if task_of(model_name) == "segmentation" else "val/mAP"


def register() -> None:
    """Put the schemas in Hydra's ConfigStore and the ``gnl.*`` resolvers in OmegaConf (idempotent)."""
    schema = OmegaConf.structured(TrainConfig)
    # An open trainer node: a misspelt argument then reaches check_target, which names the argument meant, where
    # Hydra's struct error would only suggest adding the misspelling with '+'. The keys it knows stay typed.
    OmegaConf.set_struct(schema.trainer, False)
    ConfigStore.instance().store(name="gnl_train_schema", node=schema)
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
        hint = hints.get(key)
        if value is None or isinstance(value, (DictConfig, ListConfig)) or _primitive_fit(hint, value) is not False:
            continue
        default = params[key].default
        example = (f", e.g. {where}.{key}={str(default).lower() if isinstance(default, bool) else default}"
                   if default is not inspect.Parameter.empty and default is not None and _primitive_fit(hint, default)
                   else "")
        raise ValueError(f"{where}.{key}={value!r}: {node['_target_']} expects {_describe(hint, value)}{example}")


def _primitive_fit(hint: Any, value: Any) -> bool | None:
    """Whether a primitive config value can be an argument annotated ``hint``: True, False, or None where the hint
    holds more than primitives, Literals and None (a class, a list type ...), which a config value cannot be judged
    against."""
    if typing.get_origin(hint) in _UNION_TYPES:
        verdicts = [_primitive_fit(member, value) for member in typing.get_args(hint)]
        return True if True in verdicts else None if None in verdicts else False
    if typing.get_origin(hint) is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in _SIMPLE:
        return isinstance(value, _SIMPLE[hint]) and (hint is bool or not isinstance(value, bool))
    return None


def _describe(hint: Any, value: Any) -> str:
    """``hint`` in config words, the Literal choices merged into one list, with the choice closest to ``value``."""
    members = typing.get_args(hint) if typing.get_origin(hint) in _UNION_TYPES else (hint,)
    choices = list(dict.fromkeys(str(choice) for member in members if typing.get_origin(member) is Literal
                                 for choice in typing.get_args(member)))
    kinds = ["null" if member is type(None) else getattr(member, "__name__", str(member))
             for member in members if typing.get_origin(member) is not Literal]
    if not choices:
        return " or ".join(kinds)
    close = difflib.get_close_matches(str(value), choices, n=1)
    text = "one of " + ", ".join(choices) + "".join(f", or {kind}" for kind in kinds)
    return text + (f" (did you mean {close[0]}?)" if close else "")


def explicit_arguments(node: DictConfig, schema: type = TrainerConfig) -> DictConfig:
    """``node`` (resolved) without the keys it leaves at ``schema``'s default (for the trainer: the Trainer's own).

    Why: Lightning takes ``PL_TRAINER_<ARG>`` environment variables as the defaults of arguments that are not passed;
    a Trainer built from a node holding every argument would ignore them all. Left out, such an argument behaves as
    in a Trainer built in code. ``_``-keys (``_target_``) and keys ``schema`` does not know are kept."""
    defaults = {f.name: f.default for f in schema.__dataclass_fields__.values() if not f.name.startswith("_")}
    resolved = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create({key: value for key, value in resolved.items()
                             if not (key in defaults and value == defaults[key] and type(value) is type(defaults[key]))})
