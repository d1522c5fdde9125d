"""The import directions of docs/architecture.md, checked on every module's imports (ast, function
bodies included), plus the rule that an import inside a function says why it is there."""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("seer_pipeline", "data_prep", "launch")

# Package -> the project packages it may import (itself always). docs/architecture.md explains them.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "codecs": {"core"},
    "store": {"core"},  # object-store transport: URLs, clients, retrying ranged reads
    "shards": {"core", "codecs", "store"},
    # the torch-free config leaves of data, and the pure RegNet generator (trunk names) only
    "config": {"core", "data.config", "data.crops", "models.regnet"},
    "data": {"core", "config", "codecs", "shards", "store"},
    "models": {"core", "config"},
    "dist": {"core", "config"},
    "weights": {"core", "config", "models", "checkpoint"},  # checkpoint: reading run folders
    "checkpoint": {"core", "config", "models", "dist", "weights"},  # weights: seer-ckpt export/consolidate
    "train": {"core", "config", "codecs", "shards", "store", "data", "models", "dist", "checkpoint",
              "weights"},
    "eval": {"core", "config", "codecs", "shards", "store", "data", "models", "dist", "checkpoint",
             "weights"},
    # train: `seer-plan --simulate` runs the real training step (loss, LARS) on fake tensors
    "plan": {"core", "config", "data.crops", "data.config", "models", "dist", "train"},
    "demo": {"core", "config", "codecs", "shards", "store", "data", "models", "dist", "checkpoint",
             "weights", "train", "eval", "plan"},
    "seer_pipeline": set(),  # the package root stays import-light
    "data_prep": {"core", "codecs", "shards", "store"},
    # torch-free leaves only: the checkpoint `latest` reader (the requeue book is core.requeue)
    "launch": {"core", "config", "dist", "checkpoint.integrity"},
}
# Only inside a function (the code that runs in the SLURM task), never at module level.
FUNCTION_LEVEL_ONLY = {("launch", "dist")}
# Known crossings owned by other work, each with what removes it. The test fails once one is gone,
# so the list only shrinks.
KNOWN: dict[tuple[str, str], str] = {
    ("plan", "eval"): "plan/cli.py imports eval.features.trunk_name_from_config: move that helper "
                      "to config or models",
}
# Entry points that must start without these (seer-shards, seer-submit, the config): checked on
# the transitive closure of module-level imports, package __init__ files included.
LIGHT = {"data_prep.cli": {"torch", "numba", "webdataset", "matplotlib"},
         "launch.submit": {"torch", "numba", "webdataset", "matplotlib", "PIL"},
         "seer_pipeline.config.train": {"torch", "numba", "webdataset", "matplotlib", "PIL"},
         "seer_pipeline.data.crops": {"torch", "numba", "numpy", "PIL"}}
HEAVY = {"torch", "numba", "webdataset", "matplotlib", "PIL", "numpy"}


@dataclass(frozen=True)
class Imp:
    src: str  # module name
    path: str
    line: int
    target: str  # absolute module name imported
    in_function: bool
    explained: bool  # a comment says why (function-level imports only)


def _modname(p: Path) -> str:
    parts = list(p.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, mod: str, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    # `from pkg import mod` imports a submodule when one exists
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        out.append(sub if _file_of(sub) is not None else base)
    return out


def _file_of(mod: str) -> Path | None:
    p = REPO.joinpath(*mod.split("."))
    for cand in (p.with_suffix(".py"), p / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _explained(lines: list[str], node: ast.AST, func: ast.AST) -> bool:
    if "#" in lines[node.lineno - 1] or "#" in lines[func.lineno - 1]:  # type: ignore[attr-defined]
        return True
    doc = ast.get_docstring(func) or ""  # type: ignore[arg-type]
    if "import" in doc.lower():
        return True
    i = node.lineno - 2
    while i >= 0 and lines[i].strip() in ("", "try:"):
        i -= 1
    return i >= 0 and lines[i].strip().startswith("#")


def scan() -> list[Imp]:
    out: list[Imp] = []
    for root in ROOTS:
        for p in sorted((REPO / root).rglob("*.py")):
            mod, is_pkg = _modname(p), p.name == "__init__.py"
            lines = p.read_text().splitlines()
            tree = ast.parse("\n".join(lines), str(p))

            explained: set[ast.AST] = set()  # functions whose lazy imports a comment covers

            def visit(node: ast.AST, func: ast.AST | None) -> None:
                for child in ast.iter_child_nodes(node):
                    f = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
                    if isinstance(child, (ast.Import, ast.ImportFrom)):
                        # one comment covers the function's later lazy imports too
                        why = func is not None and (func in explained or _explained(lines, child, func))
                        if why:
                            explained.add(func)
                        for t in _targets(child, mod, is_pkg):
                            out.append(Imp(mod, str(p.relative_to(REPO)), child.lineno, t, func is not None, why))
                    else:
                        visit(child, f)

            visit(tree, None)
    return out


def package_of(mod: str) -> str:
    parts = mod.split(".")
    if parts[0] != "seer_pipeline":
        return parts[0]
    return parts[1] if len(parts) > 1 else "seer_pipeline"


def _allowed(src_pkg: str, target: str) -> bool:
    """Whether package `src_pkg` may import module `target` (a whole package, or a listed leaf)."""
    dst, rules = package_of(target), ALLOWED[src_pkg]
    if dst == src_pkg or dst in rules:
        return True
    leaf = ".".join(target.split(".")[1:3])  # seer_pipeline.data.config -> data.config
    return target.startswith("seer_pipeline.") and any(leaf == r for r in rules if "." in r)


IMPORTS = scan()
OURS = [i for i in IMPORTS if i.target.split(".")[0] in ROOTS]


def test_every_package_has_a_rule() -> None:
    assert {package_of(i.src) for i in IMPORTS} <= set(ALLOWED)


def test_import_directions() -> None:
    bad, seen_known = [], set()
    for i in OURS:
        src, dst = package_of(i.src), package_of(i.target)
        if (src, dst) in KNOWN:
            seen_known.add((src, dst))
            continue
        if not _allowed(src, i.target):
            bad.append(f"{i.path}:{i.line} {src} -> {i.target}")
        elif (src, dst) in FUNCTION_LEVEL_ONLY and not i.in_function:
            bad.append(f"{i.path}:{i.line} {src} -> {i.target} at module level (only inside the task)")
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)
    assert seen_known == set(KNOWN), f"fixed, drop from KNOWN: {set(KNOWN) - seen_known}"


def _closure(start: str) -> tuple[set[str], dict[str, str]]:
    """Module-level imports reachable from `start`: (third-party roots, how each was reached)."""
    by_src: dict[str, list[Imp]] = {}
    for i in IMPORTS:
        if not i.in_function:
            by_src.setdefault(i.src, []).append(i)
    seen, todo, third, via = set(), [start], set(), {}
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")  # importing a.b.c runs a/__init__ and a/b/__init__ first
        todo += [".".join(parts[:k]) for k in range(1, len(parts))]
        for i in by_src.get(m, []):
            root = i.target.split(".")[0]
            if root in ROOTS:
                todo.append(i.target)
            elif root not in sys.stdlib_module_names:
                third.add(root)
                via.setdefault(root, f"{i.path}:{i.line}")
    return third, via


@pytest.mark.parametrize("entry", sorted(LIGHT))
def test_light_entry_points_stay_light(entry: str) -> None:
    third, via = _closure(entry)
    heavy = third & LIGHT[entry]
    assert not heavy, {h: via[h] for h in heavy}


def test_models_have_no_parallelism_and_no_loop() -> None:
    # torchtitan's shape: model files know nothing of FSDP, DCP or the loop.
    bad = [f"{i.path}:{i.line} {i.target}" for i in IMPORTS if package_of(i.src) == "models"
           and (i.target.startswith(("torch.distributed.fsdp", "torch.distributed.checkpoint"))
                or package_of(i.target) in {"train", "data", "dist", "checkpoint"})]
    assert not bad, bad


def test_function_level_imports_say_why() -> None:
    # An import inside a function is there to keep start-up light (or for a platform); a comment
    # on its line or just above (or the function's docstring) must say so.
    bad = sorted({f"{i.path}:{i.line} {i.target}" for i in IMPORTS if i.in_function and not i.explained})
    assert not bad, "function-level imports without a comment saying why:\n" + "\n".join(bad)


def test_the_scanner_sees_function_level_and_relative_imports() -> None:
    # Guards the guard: a known function-level import and the package-root rule are visible.
    assert any(i.path == "launch/job.py" and i.in_function and i.target.startswith("seer_pipeline.dist")
               for i in IMPORTS)
    assert package_of("seer_pipeline.data.loader") == "data" and package_of("launch.job") == "launch"
    assert not _allowed("models", "seer_pipeline.train.trainer")
    assert _allowed("config", "seer_pipeline.data.config") and not _allowed("config", "seer_pipeline.data.loader")
