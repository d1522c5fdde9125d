"""Patch a seam when its module is first imported rather than at start-up, so a process that
never imports it (the local launcher, which only spawns ranks) starts as fast as without the
fault: importing the training loop takes tens of seconds on a loaded 2-core machine."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Callable


def when_imported(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Call `patch(module)` right after module `name` is executed (now, if already imported)."""
    if name in sys.modules:
        patch(sys.modules[name])
    else:
        sys.meta_path.insert(0, _Finder(name, patch))


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # the real finders locate it; we only wrap its execution
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run, patch = spec.loader.exec_module, self.patch

        def exec_module(module: ModuleType) -> None:
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec
