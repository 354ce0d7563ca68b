"""Plain helpers the tests share: what a fixture cannot be.

Fixtures live in ``tests/conftest.py``. What is here is needed where no fixture reaches: in parametrize tables built
at import time, in module-scoped fixtures, in spawned workers, or by the fixtures themselves. One definition per
concept: the tests import these instead of writing their own.

Imports stay light (torch, no Lightning, Hydra or torchvision at import time): spawned ranks import their test module
and, with it, this one. The callbacks that real runs load by name are in tests/callbacks.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator, Sequence

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

# gnl-train overrides for a run of seconds: 8 training images of 32 px in batches of 2, one epoch.
TINY = ["data.num_train=8", "data.num_val=4", "data.num_test=4", "data.image_size=32", "data.batch_size=2",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]

# Where a launcher tells a process its rank: a child of the test process must not inherit them.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


# ------------------------------------------------------------------------------------------------ gnl-train configs
def compose_train(overrides: Sequence[str], output_dir: Path):
    """gnl-train's config for ``overrides`` as ``gnl-train`` composes it, with Hydra's runtime set (output directory
    ``output_dir``) the way a real run has it, so that ``build`` and ``run`` work in process."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import gnlightning.train  # noqa: F401  (registers the config schema and resolvers with Hydra)

    with initialize_config_module("gnlightning.train_conf", version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def error_text(error: BaseException) -> str:
    """An exception with its chain of causes, each as ``Type: message``: what a user reads (Hydra and Python print
    the chain)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------- child processes
def subprocess_env(*path_dirs: Path | str, **variables: str) -> dict[str, str]:
    """The environment for a child process of a test: this checkout first on PYTHONPATH (whatever is installed), one
    intra-op thread (2-core CI machines run several processes at once), no rank inherited from the test process,
    ``path_dirs`` then this interpreter's scripts (gnl-train, torchrun) first on PATH, and ``variables``."""
    env = {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}
    path = os.pathsep.join([*map(str, path_dirs), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath, **variables, "PATH": path}


def run_process(command: Sequence[str | Path], *, cwd: Path | str | None = None, env: dict[str, str] | None = None,
                timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``command`` to its end with ``env`` (default ``subprocess_env()``), output captured as text. ``check``:
    fail the test unless it exits 0, showing the end of its output."""
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env or subprocess_env(), timeout=timeout,
                            capture_output=True, text=True, check=False)
    if check:
        assert result.returncode == 0, (f"{' '.join(map(str, command))[:300]} exited with {result.returncode}:\n"
                                        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def run_python(*args: str | Path, **options) -> subprocess.CompletedProcess:
    """``python *args`` (a script and its arguments, ``-c CODE`` or ``-m MODULE``) with this interpreter; the options
    of ``run_process``."""
    return run_process([sys.executable, *args], **options)


def run_gnl_train(*overrides: str, cwd: Path, **options) -> subprocess.CompletedProcess:
    """``gnl-train *overrides`` in ``cwd`` (as ``python -m gnlightning.train``); exit status not checked, the tests
    look at it (and at what a failed run printed)."""
    return run_python("-m", "gnlightning.train", *overrides, cwd=cwd, **{"check": False, **options})


@contextlib.contextmanager
def script_module(name: str) -> Iterator[ModuleType]:
    """``scripts/<name>.py`` imported as the module ``name``, registered in ``sys.modules`` while in use (its
    dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


# ---------------------------------------------------------------------------------------------------- small models
def bn_mlp(width: int = 64) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Linear on (N, 16) features: a model without convolutions, its norm layer
    named '1'."""
    return nn.Sequential(nn.Linear(16, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 2))


def randomized_statistics(model: nn.Module, seed: int = 0, num_batches_tracked: int | None = None) -> nn.Module:
    """``model`` with every BatchNorm's (frozen ones too) running statistics and affine values moved off their
    identity defaults (mean and bias in [-0.5, 0.5), variance in [0.5, 2), weight in [0.5, 1.5)), so that frozen and
    eval-mode BN do something and a copying or folding mistake shows. Draws from its own generator: the global RNG is
    left alone. ``num_batches_tracked``: set that counter too, where a layer has one."""
    from torchvision.ops import FrozenBatchNorm2d  # gnlightning's is a subclass

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
                count = module.running_mean.numel()
                module.running_mean.copy_(torch.rand(count, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(count, generator=generator) * 1.5 + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(count, generator=generator) + 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.rand(count, generator=generator) - 0.5)
                if num_batches_tracked is not None and getattr(module, "num_batches_tracked", None) is not None:
                    module.num_batches_tracked.fill_(num_batches_tracked)
    return model


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """The same state dict keys in the same order, and bit-identical values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert sa, "no state to compare"
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------- SyncBatchNorm against its reference
def batch_and_upstream_grad(seed: int, shape: Sequence[int], offset: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch (float64, mean ``offset``, std 2) and an upstream gradient of its shape, from ``seed``.

    A random upstream gradient, not out.sum(): the input gradient of BN under a constant upstream gradient is ~0,
    which would let a wrong backward pass."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * 2.0 + offset
    grad = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
    return x, grad


def affine_values(channels: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight (in [0.5, 1.5)) and bias (standard normal) every layer under test and its reference start from."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=generator, dtype=torch.float64)
    return weight, bias


def batchnorm_reference(steps: Sequence[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype = torch.float32,
                        affine: bool = True, momentum: float | None = 0.1) -> dict:
    """PyTorch's nn.BatchNorm1d/2d/3d (by the input's rank) in float64, trained on the concatenated global batch:
    one training step per ``(x, upstream grad)`` of ``steps``, from the weight and bias of ``affine_values``, on the
    values the ranks actually see (``x`` rounded to ``dtype``). Per step the output, the input gradient and the
    weight and bias gradients; the running statistics at the end."""
    x, _ = steps[0]
    reference_class = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]
    reference = reference_class(x.shape[1], momentum=momentum, affine=affine).double()
    if affine:
        weight, bias = affine_values(x.shape[1])
        with torch.no_grad():
            reference.weight.copy_(weight)
            reference.bias.copy_(bias)
    expected: dict = {"out": [], "grad_input": [], "grad_weight": [], "grad_bias": []}
    for x, grad in steps:
        x = x.to(dtype).double().requires_grad_()
        reference.zero_grad(set_to_none=True)
        out = reference(x)
        (out * grad.to(dtype).double()).sum().backward()
        expected["out"].append(out.detach())
        expected["grad_input"].append(x.grad)
        if affine:
            expected["grad_weight"].append(reference.weight.grad.clone())
            expected["grad_bias"].append(reference.bias.grad.clone())
    expected.update(running_mean=reference.running_mean, running_var=reference.running_var,
                    num_batches_tracked=int(reference.num_batches_tracked))
    return expected
