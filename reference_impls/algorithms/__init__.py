"""One file per method. Every module here defining a ``Method`` subclass with a ``name`` is registered.

``METHODS`` maps CLI names (``ddpo``, ``flow-grpo``, ...) to their classes.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil

from reference_impls.training.method import Method

_SHARED_MODULES = {"estimators", "preferences", "score_distillation"}


def _discover() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in _SHARED_MODULES:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Method) and obj is not Method and obj.name and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return dict(sorted(found.items()))


METHODS: dict[str, type[Method]] = _discover()


class UnknownMethodError(ValueError):
    """An unknown method name; the message lists the valid ones."""


def get_method(name: str) -> type[Method]:
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name, METHODS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownMethodError(f"unknown method {name!r}.{hint} Valid methods: {', '.join(METHODS)}")
