"""Plugin discovery: modules listed under the entry-point group ``overparam.plugins``.

A plugin is a module; importing it makes its Task, DataModule and Callback subclasses
visible to LightningCLI, which then accepts them by short name (``--model TeacherStudent``)
as well as by class path. The first-party plugins are registered through the same entry
points (see ``pyproject.toml``). ``OVERPARAM_PLUGINS=mod1,mod2`` adds local modules and
``OVERPARAM_DISABLE_PLUGIN_AUTOLOAD=1`` skips third-party entry points (hermetic runs).
A plugin that fails to import is reported by name with its error; the others still work.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Optional

import lightning.pytorch as pl

ENTRY_POINT_GROUP = "overparam.plugins"
FIRST_PARTY = "overparam"


@dataclass
class Plugin:
    """One plugin module and what it provides."""

    name: str
    module: str
    distribution: str
    tasks: list[str] = field(default_factory=list)
    datamodules: list[str] = field(default_factory=list)
    callbacks: list[str] = field(default_factory=list)
    error: Optional[str] = None


_plugins: dict[str, Plugin] = {}


def _classes_of(module: ModuleType, base: type) -> list[str]:
    return sorted(
        name
        for name, obj in vars(module).items()
        if inspect.isclass(obj)
        and issubclass(obj, base)
        and (obj.__module__ == module.__name__ or obj.__module__.startswith(module.__name__ + "."))
        and not name.startswith("_")
    )


def _register(name: str, module_name: str, distribution: str) -> Plugin:
    from overparam.task import Task  # late: registry is imported by the lightweight CLI path

    plugin = Plugin(name=name, module=module_name, distribution=distribution)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure must be reported, not raised
        plugin.error = f"{type(exc).__name__}: {exc}"
        print(
            f"overparam: plugin {name!r} ({module_name}, distribution {distribution}) failed to import: "
            f"{plugin.error}; the other plugins still work",
            file=sys.stderr,
        )
    else:
        plugin.tasks = _classes_of(module, Task)
        plugin.datamodules = _classes_of(module, pl.LightningDataModule)
        plugin.callbacks = _classes_of(module, pl.Callback)
    _plugins[name] = plugin
    return plugin


def load_plugins(reload: bool = False) -> dict[str, Plugin]:
    """Import every plugin once (entry points, then ``$OVERPARAM_PLUGINS``); return them by name."""
    if _plugins and not reload:
        return _plugins
    _plugins.clear()
    hermetic = os.environ.get("OVERPARAM_DISABLE_PLUGIN_AUTOLOAD", "") not in ("", "0")
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        distribution = ep.dist.name if ep.dist is not None else "unknown"
        if hermetic and distribution != FIRST_PARTY:
            continue
        _register(ep.name, ep.value, distribution)
    for module_name in filter(None, (m.strip() for m in os.environ.get("OVERPARAM_PLUGINS", "").split(","))):
        _register(module_name, module_name, "$OVERPARAM_PLUGINS")
    return _plugins


def all_classes(kind: str) -> list[str]:
    """Short names of every loaded ``tasks``, ``datamodules`` or ``callbacks``."""
    return sorted({name for plugin in load_plugins().values() for name in getattr(plugin, kind)})


def suggest(name: str, kind: str) -> str:
    """``did you mean X?`` for a misspelt class name, or the list of what is installed."""
    known = all_classes(kind)
    if kind == "callbacks":
        import lightning.pytorch.callbacks as builtin

        known += [n for n in dir(builtin) if n[0].isupper() and n != "Callback"]
    close = difflib.get_close_matches(name, known, n=3)
    if close:
        return f"did you mean {' or '.join(close)}?"
    return f"installed: {', '.join(known) or 'none'}"


def format_plugins(plugins: dict[str, Plugin]) -> str:
    """The table printed by ``overparam plugins``."""
    lines = []
    for plugin in plugins.values():
        lines.append(f"{plugin.name}  ({plugin.module}, from {plugin.distribution})")
        if plugin.error:
            lines.append(f"    FAILED TO IMPORT: {plugin.error}")
            continue
        for label, names in (("tasks", plugin.tasks), ("datamodules", plugin.datamodules), ("callbacks", plugin.callbacks)):
            if names:
                lines.append(f"    {label + ':':13s}{', '.join(names)}")
    return "\n".join(lines) if lines else "no plugins installed"
