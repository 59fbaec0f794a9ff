"""The layers of the package, by folder, and a scan of a source tree for imports that break them.

Each folder is a layer: the core (spava_plan/*.py: config, Plan, errors, links, ...), the three
stages planner/, codegen/ and runtime/ (side by side: each depends on the core only, never on another
stage, DESIGN.md), the entry points spava_plan/entry/ (the commands, the Session, the plan store:
they wire the stages together) and spava_plan/server/ (spava-serve, over the Session). A module's
layer is its folder's, so a new module is covered the day it is written; a new folder has no layer
until it is named here (the scan reports it).

The one sanctioned edge across stages: the kernel module codegen renders from
codegen/templates/*.jinja runs inside the runtime and imports its helpers
(spava_plan.runtime.backends.triton_kernels).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

# folder (relative to the repo) -> (package, layer); the longest matching folder wins
FOLDERS = {
    "spava_plan": ("spava_plan", "core"),
    "conf": ("spava_plan.conf", "core"),
    "planner": ("spava_plan.planner", "planner"),
    "codegen": ("spava_plan.codegen", "codegen"),
    "runtime": ("spava_plan.runtime", "runtime"),
    "spava_plan/entry": ("spava_plan.entry", "entry"),
    "spava_plan/server": ("spava_plan.server", "server"),
}
MAY_IMPORT = {  # layer -> the layers its modules may import
    "core": {"core"},
    "planner": {"core", "planner"},
    "codegen": {"core", "codegen"},
    "runtime": {"core", "runtime"},
    "entry": {"core", "planner", "codegen", "runtime", "entry"},
    "server": {"core", "planner", "codegen", "runtime", "entry", "server"},
}
SANCTIONED = {("codegen/templates", "spava_plan.runtime.backends.triton_kernels")}
STAGE_FOLDERS = ("planner", "codegen", "runtime")  # importing one as a top-level name breaks installs
# an import statement in a template (a parenthesized one may span lines)
_TEMPLATE_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+[\w.]+[ \t]+import[ \t]+(?:\([^)]*\)|[^\n]*)|import[ \t]+[^\n]*)", re.M)


FLAT = {"spava_plan"}  # the core is the files of spava_plan/ itself: a new subfolder needs a layer


def folder_of(rel: str) -> str | None:
    """The layer folder a repo-relative path lies in (the longest match), or None."""
    best = None
    for folder in FOLDERS:
        if (rel == folder or rel.startswith(folder + "/")) and (best is None or len(folder) > len(best)):
            best = folder
    if best in FLAT and "/" in rel[len(best) + 1:]:
        return None
    return best


def module_name(rel: str) -> str:
    folder = folder_of(rel)
    package = FOLDERS[folder][0]
    parts = rel[len(folder) + 1:].removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def sources(root: Path) -> list[str]:
    """Every python module and kernel template of the package folders, repo-relative."""
    found = []
    for top in {f.split("/")[0] for f in FOLDERS}:
        for p in sorted((root / top).rglob("*")):
            if p.suffix == ".py" or p.name.endswith(".py.jinja"):
                if "__pycache__" not in p.parts:
                    found.append(str(p.relative_to(root)))
    return found


def imported_names(root: Path, rel: str) -> set[str]:
    """Absolute names a module imports anywhere in it (relative imports resolved; a function's
    imports count too: a lazy import is still an edge)."""
    text = (root / rel).read_text()
    if rel.endswith(".jinja"):  # not python as a whole: parse its import statements one by one
        text = "\n".join(re.sub(r"#[^\n]*", "", m.group(0)).strip() for m in _TEMPLATE_IMPORT.finditer(text))
    tree = ast.parse(text, rel)
    module = module_name(rel)
    package = module.split(".") if rel.endswith("__init__.py") else module.split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def module_index(root: Path) -> dict[str, str]:
    """module name -> repo-relative path, for every python module of the package."""
    return {module_name(rel): rel for rel in sources(root) if rel.endswith(".py") and folder_of(rel)}


def _target(name: str, modules: dict[str, str]) -> str | None:
    """The package module ``name`` lies in (the longest known prefix), or None (not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def violations(root: Path) -> list[str]:
    """One line per import that goes against MAY_IMPORT, per module outside every layer folder and
    per sanctioned edge that no longer exists (so the list cannot go stale)."""
    modules = module_index(root)
    bad, used = [], set()
    for rel in sources(root):
        folder = folder_of(rel)
        if folder is None:
            bad.append(f"{rel}: in no layer folder (name its folder in tests/layering.py FOLDERS)")
            continue
        layer = FOLDERS[folder][1]
        for name in sorted(imported_names(root, rel)):
            if name.split(".")[0] in STAGE_FOLDERS:
                bad.append(f"{rel}: imports {name} as a top-level package (use spava_plan.{name})")
                continue
            target = _target(name, modules)
            if target is None:
                continue
            to = FOLDERS[folder_of(modules[target])][1]
            if to in MAY_IMPORT[layer]:
                continue
            # the sanctioned module, or a package on its way (importing it imports them)
            edge = next((e for e in SANCTIONED if rel.startswith(e[0] + "/")
                         and (target == e[1] or e[1].startswith(target + "."))), None)
            if edge:
                used.add(edge)
                continue
            bad.append(f"{rel} ({layer}) imports {target} ({to})")
    bad += [f"sanctioned edge {e} no longer exists: remove it from SANCTIONED" for e in SANCTIONED - used]
    return sorted(set(bad))


def import_cycle(root: Path) -> list[str] | None:
    """A circle of imports between the package's modules (a -> b -> ... -> a), or None."""
    modules = module_index(root)
    graph = {}
    for mod, rel in modules.items():
        deps = {_target(n, modules) for n in imported_names(root, rel)}
        # a package's own __init__ runs before its submodules: importing the package is no edge back
        graph[mod] = {d for d in deps if d and d != mod and not mod.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[mod] = 2
        return None

    for mod in sorted(graph):
        if mod not in state and (found := visit(mod)):
            return found
    return None
