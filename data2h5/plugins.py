"""Resolve reader and prune plugins from a spec string.

A spec is one of:

* a built-in name (readers: ``auto``, ``image``, ``bytes``, ``npy``, ``text``; prunes: ``ext``);
* ``module:function`` for an importable module;
* ``path/to/file.py:function`` for a Python file;
* a name that an installed package registers in the entry-point group ``data2h5.readers``
  or ``data2h5.prunes``.

Specs, not functions, travel to worker processes, and each worker resolves them itself, so
plugins work the same under fork, spawn and forkserver.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Union

from .errors import PluginError

READER_GROUP = "data2h5.readers"
PRUNE_GROUP = "data2h5.prunes"


@dataclass(frozen=True)
class Plugin:
    """A resolved plugin: the function and the spec it came from (for error messages)."""

    role: str  # "reader" or "prune"
    spec: str
    func: Callable

    def __call__(self, *args):
        return self.func(*args)


PluginSpec = Union[str, Callable]


def load(spec: PluginSpec, role: str, builtins: Dict[str, Callable]) -> Plugin:
    """Resolve ``spec`` (a string as above, or a callable used as is) into a :class:`Plugin`."""
    if callable(spec):
        return Plugin(role, _describe(spec), spec)
    spec = str(spec).strip()
    if spec in builtins:
        return Plugin(role, spec, builtins[spec])
    target, sep, func_name = spec.rpartition(":")
    if not sep or not target or not func_name:
        from_ep = _from_entry_point(spec, role)
        if from_ep is not None:
            return Plugin(role, spec, from_ep)
        known = ", ".join(sorted(builtins))
        raise PluginError(
            f"{role} {spec!r} is not a built-in ({known}) nor a registered plugin; "
            f"name a function as module:function or path/to/file.py:function"
        )
    module = _import_file(target, role, spec) if _looks_like_path(target) else _import_module(target, role, spec)
    func = getattr(module, func_name, None)
    if func is None:
        raise PluginError(f"{role} plugin {spec!r}: {target} has no function {func_name!r}")
    if not callable(func):
        raise PluginError(f"{role} plugin {spec!r}: {func_name} is not a function")
    return Plugin(role, spec, func)


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def _import_module(name: str, role: str, spec: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise PluginError(f"cannot import {role} plugin {spec!r}: {type(exc).__name__}: {exc}") from exc


def _import_file(path: str, role: str, spec: str):
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise PluginError(f"{role} plugin {spec!r}: no such file {path}")
    digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    stem = os.path.splitext(os.path.basename(path))[0]
    mod_name = f"data2h5_plugin_{stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    file_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[mod_name] = module
    try:
        file_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise PluginError(f"cannot import {role} plugin {spec!r}: {type(exc).__name__}: {exc}") from exc
    return module


def _from_entry_point(name: str, role: str):
    from importlib.metadata import entry_points

    group = READER_GROUP if role == "reader" else PRUNE_GROUP
    try:
        eps = entry_points(group=group)
    except TypeError:  # Python < 3.10
        eps = entry_points().get(group, [])
    for ep in eps:
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:
                raise PluginError(f"cannot load {role} plugin {name!r} ({ep.value}): {exc}") from exc
    return None


def _describe(func: Callable) -> str:
    module = getattr(func, "__module__", None) or "?"
    return f"{module}:{getattr(func, '__qualname__', repr(func))}"
