"""The import directions of docs/architecture.md, checked on every module's imports (ast, function
bodies included), plus the rule that an import inside a function says why it is there."""
from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("seer_pipeline", "data_prep", "launch")

DOC = REPO / "docs" / "architecture.md"


def _rules_from_doc() -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """The import table of docs/architecture.md, the one source of the rules: package -> what
    it may import, and the (package, target) pairs allowed only inside functions."""
    text = DOC.read_text()
    body = text.split("<!-- import-rules:start -->")[1].split("<!-- import-rules:end -->")[0]
    allowed: dict[str, set[str]] = {}
    function_only: set[tuple[str, str]] = set()
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        pkg = cells[0].strip("`")
        allowed[pkg] = set()
        for item in filter(None, (x.strip() for x in cells[1].split(","))):
            if item == "—":
                continue
            name = item.split("`")[1]
            allowed[pkg].add(name)
            if "(in functions only)" in item:
                function_only.add((pkg, name))
    return allowed, function_only


ALLOWED, FUNCTION_LEVEL_ONLY = _rules_from_doc()
# Entry points that must start without these (seer-shards, seer-submit, the config): checked on
# the transitive closure of module-level imports, package __init__ files included.
LIGHT = {"data_prep.cli": {"torch", "numba", "webdataset", "matplotlib"},
         "launch.submit": {"torch", "numba", "webdataset", "matplotlib", "PIL"},
         "seer_pipeline.config.train": {"torch", "numba", "webdataset", "matplotlib", "PIL"},
         "seer_pipeline.config.crops": {"torch", "numba", "numpy", "PIL"}}
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


_DIRECTIVE = re.compile(r"#\s*(noqa|type:|pragma|fmt:)[^#]*")


def _reason(line: str) -> str:
    """The words of a line's comment, tool directives (noqa, type: ignore, ...) removed."""
    if "#" not in line:
        return ""
    comment = line[line.index("#"):]
    return _DIRECTIVE.sub("", comment).lstrip("#").strip() if comment.strip() != "#" else ""


def _explained(lines: list[str], node: ast.AST, func: ast.AST) -> bool:
    """A function-level import needs a reason: a comment of at least three words on its line or
    on the comment lines just above it or on the `def` line, or the function's docstring saying why
    it imports."""
    ok = lambda text: len(text.split()) >= 3  # noqa: E731 - a one-word "# lazy" says nothing
    if ok(_reason(lines[node.lineno - 1])) or ok(_reason(lines[func.lineno - 1])):  # type: ignore[attr-defined]
        return True
    doc = ast.get_docstring(func) or ""  # type: ignore[arg-type]
    if re.search(r"\bimports?\b", doc, re.I):
        return True
    i = node.lineno - 2  # type: ignore[attr-defined]
    while i >= 0 and lines[i].strip() in ("", "try:"):
        i -= 1
    above = []
    while i >= 0 and lines[i].strip().startswith("#"):
        above.append(_reason(lines[i].strip()))
        i -= 1
    return ok(" ".join(above))


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
    leaf = ".".join(target.split(".")[1:3])  # seer_pipeline.models.regnet -> models.regnet
    return target.startswith("seer_pipeline.") and any(leaf == r for r in rules if "." in r)


IMPORTS = scan()
OURS = [i for i in IMPORTS if i.target.split(".")[0] in ROOTS]


def test_every_package_has_a_rule() -> None:
    assert {package_of(i.src) for i in IMPORTS} <= set(ALLOWED)


def test_import_directions() -> None:
    bad = []
    for i in OURS:
        src, dst = package_of(i.src), package_of(i.target)
        if not _allowed(src, i.target):
            bad.append(f"{i.path}:{i.line} {src} -> {i.target}")
        elif (src, dst) in FUNCTION_LEVEL_ONLY and not i.in_function:
            bad.append(f"{i.path}:{i.line} {src} -> {i.target} at module level (only inside the task)")
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_no_cycle_between_packages() -> None:
    # Edges as the code has them (not as the table allows): a cycle means two packages that
    # cannot be read, tested or replaced one without the other.
    edges: dict[str, set[str]] = {}
    for i in OURS:
        src, dst = package_of(i.src), package_of(i.target)
        if src != dst:
            edges.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for pkg in sorted(edges):
        if pkg not in state:
            visit(pkg, [pkg])


def test_the_map_names_every_package_and_only_real_modules() -> None:
    # The "what lives there" table: every package has a row, and every module it names in
    # parentheses exists in that package (a renamed or deleted module fails here).
    text = DOC.read_text().split("## Data flow")[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    packages = {p.name for p in (REPO / "seer_pipeline").iterdir()
                if p.is_dir() and (p / "__init__.py").is_file()}
    assert set(rows) == packages, (set(rows) ^ packages)
    missing = []
    for pkg, what in rows.items():
        for mod in re.findall(r"\(`([a-z_]+)`", what) + re.findall(r", `([a-z_]+)`\)", what):
            if not ((REPO / "seer_pipeline" / pkg / f"{mod}.py").is_file()
                    or (REPO / "seer_pipeline" / pkg / mod).is_dir()):
                missing.append(f"{pkg}/{mod}")
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


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
                or package_of(i.target) in {"train", "data", "distributed", "checkpoint"})]
    assert not bad, bad


def test_function_level_imports_say_why() -> None:
    # An import inside a function is there to keep start-up light (or for a platform); a comment
    # on its line or just above (or the function's docstring) must say so.
    bad = sorted({f"{i.path}:{i.line} {i.target}" for i in IMPORTS if i.in_function and not i.explained})
    assert not bad, "function-level imports without a comment saying why:\n" + "\n".join(bad)


def test_the_scanner_sees_function_level_and_relative_imports() -> None:
    # Guards the guard: a known function-level import and the package-root rule are visible.
    assert any(i.path == "launch/job.py" and i.in_function and i.target.startswith("seer_pipeline.distributed")
               for i in IMPORTS)
    assert package_of("seer_pipeline.data.loader") == "data" and package_of("launch.job") == "launch"
    assert not _allowed("models", "seer_pipeline.train.trainer")
    assert _allowed("config", "seer_pipeline.models.regnet") and not _allowed("config", "seer_pipeline.models.trunk")
    assert ("launch", "distributed") in FUNCTION_LEVEL_ONLY and "core" in ALLOWED and not ALLOWED["core"]


def test_reason_check_rejects_directives_and_one_word_comments() -> None:
    # Guards the guard: `# noqa` and a bare word are not reasons; a sentence is.
    src = ["def f():", "    import json  # noqa: F401", "def g():", "    # lazy", "    import json",
           "def h():", "    import json  # keeps start-up light for seer-shards"]
    tree = ast.parse("\n".join(src))
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    verdicts = [_explained(src, f.body[0], f) for f in funcs]
    assert verdicts == [False, False, True]
