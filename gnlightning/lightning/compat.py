"""Being usable from both Lightning namespaces.

``lightning.pytorch`` and the standalone ``pytorch_lightning`` ship the same classes twice, and a Trainer checks
plugins with ``isinstance`` against its own namespace's classes. A class deriving from *both* base classes passes
either check, so users write the same line whichever package their project imports.
"""

from __future__ import annotations

import importlib


def bases(path: str) -> tuple[type, ...]:
    """The class at ``path`` (a dotted path below ``lightning.pytorch``) in every installed namespace."""
    module_path, _, name = path.rpartition(".")
    found = []
    for package in ("lightning.pytorch", "pytorch_lightning"):
        try:
            module = importlib.import_module(f"{package}.{module_path}")
        except ImportError:
            continue
        found.append(getattr(module, name))
    return tuple(found)
