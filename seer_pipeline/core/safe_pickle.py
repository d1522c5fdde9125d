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
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Mapping

# module -> names that module may contribute. Everything else is refused.
Allowed = Mapping[str, Iterable[str]]
# An extra check for families too long to list (e.g. every `torch.<dtype>`).
Predicate = Callable[[str, str, Any], bool]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list (nothing was executed)."""


class PickleBoundsError(UnsafePickleError):
    """A pickle larger, deeper or (counting shared references each time) bigger than allowed."""


@dataclass(frozen=True)
class Bounds:
    """What one pickle may hold. Memo references make a pickle a graph: 382 bytes of nested
    lists, each holding its predecessor twice, unpickle in microseconds but describe 2**60
    nodes, and printing them took 2.4 GB and 45 s before a MemoryError (issue #24). So the
    object is walked as the tree every consumer (str, json, ==) sees, shared parts counted
    each time they are reached, and the walk stops at the first limit."""

    max_bytes: int  # the pickle itself
    max_nodes: int  # containers and scalars, shared ones counted per reference
    max_depth: int  # nesting of containers
    max_chars: int  # characters of str/bytes, shared ones counted per reference


def check_bounds(obj: Any, bounds: Bounds, what: str = "pickle") -> None:
    """Raise PickleBoundsError if `obj`, seen as a tree, exceeds `bounds`; cost <= max_nodes."""
    nodes = chars = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        cur, depth = stack.pop()
        nodes += 1
        if nodes > bounds.max_nodes:
            raise PickleBoundsError(f"{what}: more than {bounds.max_nodes} objects (counting shared "
                                    "references each time); not a record of ours - refused")
        if depth > bounds.max_depth:
            raise PickleBoundsError(f"{what}: nested deeper than {bounds.max_depth}; refused")
        if isinstance(cur, (str, bytes, bytearray)):
            chars += len(cur)
            if chars > bounds.max_chars:
                raise PickleBoundsError(f"{what}: more than {bounds.max_chars} characters of text "
                                        "(counting shared references each time); refused")
        elif isinstance(cur, dict):
            stack.extend((x, depth + 1) for kv in cur.items() for x in kv)
        elif isinstance(cur, (list, tuple, set, frozenset)):
            stack.extend((x, depth + 1) for x in cur)


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
         what: str = "pickle", bounds: Bounds | None = None) -> Any:
    """Unpickle one object from `file`, resolving only allow-listed globals (and, with
    `bounds`, reading at most `max_bytes` and refusing an object over the bounds)."""
    if bounds is None:
        return RestrictedUnpickler(file, allowed, predicate, what).load()
    data = file.read(bounds.max_bytes + 1)
    if len(data) > bounds.max_bytes:
        raise PickleBoundsError(f"{what}: larger than {bounds.max_bytes} bytes; refused")
    obj = RestrictedUnpickler(io.BytesIO(data), allowed, predicate, what).load()
    check_bounds(obj, bounds, what)
    return obj


def restricted_loads(data: bytes, allowed: Allowed, predicate: Predicate | None = None,
          what: str = "pickle", bounds: Bounds | None = None) -> Any:
    """`restricted_load` from bytes."""
    return restricted_load(io.BytesIO(data), allowed, predicate, what, bounds)


# submitit writes ("success", value) or ("error", traceback text); our TrainJob returns a dict
# of str/int/bool, so a result file of ours needs no global at all.
SUBMITIT_RESULT_ALLOWED: dict[str, tuple[str, ...]] = {}
# Ours is a dict of a dozen fields, or a traceback of a few KB: these leave 100x headroom.
SUBMITIT_RESULT_BOUNDS = Bounds(max_bytes=4 << 20, max_nodes=10_000, max_depth=16,
                                max_chars=4 << 20)


def load_submitit_result(file: IO[bytes]) -> Any:
    """A submitit `*_result.pkl` of one of our jobs: plain containers only, bounded."""
    return restricted_load(file, SUBMITIT_RESULT_ALLOWED, what="submitit result",
                           bounds=SUBMITIT_RESULT_BOUNDS)
