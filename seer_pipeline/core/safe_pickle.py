"""Restricted unpickling for the two pickle formats a run folder still holds.

Run folders live on shared filesystems, so whoever can write one could plant a pickle that runs
code in the next reader (`seer-train` resuming, `seer-ckpt`, `seer-eval`, `seer-status`). Our own
state is tensors and JSON; the pickles left are other projects' formats: DCP's `.metadata` and
submitit's result files. Both are read through `RestrictedUnpickler`, which resolves only the
globals on an explicit allow-list and refuses everything else (`os.system`, `builtins.eval`,
`subprocess.Popen`, ...) before it can be called. Torch-free: `seer-status` uses it.
"""
from __future__ import annotations

import io
import pickle
from typing import IO, Any, Callable, Iterable, Mapping

# module -> names that module may contribute. Everything else is refused.
Allowed = Mapping[str, Iterable[str]]
# An extra check for families too long to list (e.g. every `torch.<dtype>`).
Predicate = Callable[[str, str, Any], bool]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list (nothing was executed)."""


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` only returns allow-listed globals."""

    def __init__(self, file: IO[bytes], allowed: Allowed, predicate: Predicate | None = None,
                 what: str = "pickle") -> None:
        super().__init__(file)
        self._allowed = {m: frozenset(n) for m, n in allowed.items()}
        self._predicate = predicate
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        if name in self._allowed.get(module, ()):
            return super().find_class(module, name)
        if self._predicate is not None and module in self._allowed and "." not in name:
            # Only plain attributes of an allow-listed module (importing any other module
            # could run its top-level code); the predicate sees the object and decides (a
            # dtype is data, a function is not).
            try:
                obj = super().find_class(module, name)
            except (AttributeError, ImportError, ModuleNotFoundError):
                obj = None
            if obj is not None and self._predicate(module, name, obj):
                return obj
        raise UnsafePickleError(
            f"{self._what}: refusing to load global {module}.{name} (not on the allow-list; a "
            "crafted or foreign file - nothing was executed)")


def restricted_load(file: IO[bytes], allowed: Allowed, predicate: Predicate | None = None,
         what: str = "pickle") -> Any:
    """Unpickle one object from `file`, resolving only allow-listed globals."""
    return RestrictedUnpickler(file, allowed, predicate, what).load()


def restricted_loads(data: bytes, allowed: Allowed, predicate: Predicate | None = None,
          what: str = "pickle") -> Any:
    """`restricted_load` from bytes."""
    return restricted_load(io.BytesIO(data), allowed, predicate, what)


# submitit writes ("success", value) or ("error", traceback text); our TrainJob returns a dict
# of str/int/bool, so a result file of ours needs no global at all.
SUBMITIT_RESULT_ALLOWED: dict[str, tuple[str, ...]] = {}


def load_submitit_result(file: IO[bytes]) -> Any:
    """A submitit `*_result.pkl` of one of our jobs: plain containers only."""
    return restricted_load(file, SUBMITIT_RESULT_ALLOWED, what="submitit result")
