"""The package as users get it: one import root, `agentmesh`, in a wheel named agentmesh-streams.

- The wheel holds `agentmesh/` (and its dist-info) and nothing else: no bare `agents`, `bus`,
  `outbox`, `schemas`, no `examples` or `tests`; the symlinked folders arrive as real files.
- Installed in a fresh virtualenv beside `openai-agents` (whose import name is `agents`), both
  import, and `mesh --version` prints the version from pyproject.toml.
- The import graph of our own modules, read from the source, has no cycles, and the layers hold:
  agents/bus/outbox/schemas never reach the CLI or the local stack; schemas reach nothing else.
- mypy resolves our modules instead of ignoring the ones it cannot find.

The wheel and virtualenv tests are slow-ish (a build, two pip installs: about a minute with a
warm pip cache) but stay in the default run: they are what "the package works" means.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import itertools
import os
import pkgutil
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = "agentmesh"
# The repository's own folders that agentmesh/agents, agentmesh/bus, ... point to.
LINKED = ("agents", "bus", "outbox", "schemas")
CORE = tuple(f"{ROOT}.{name}" for name in LINKED)
# What the core packages must never import, directly or transitively.
OUTER = (f"{ROOT}.cli", f"{ROOT}.devstack")

# Generous: the first test that asks for the virtualenv pays for creating it.
SLOW = pytest.mark.timeout(900)


def _pyproject() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _project_version() -> str:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    version = project["version"]
    assert isinstance(version, str)
    return version


def _run(
    cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _tail(proc: subprocess.CompletedProcess[str], lines: int = 40) -> str:
    out = (proc.stdout + proc.stderr).strip().splitlines()
    return "\n".join(out[-lines:])


# ---------------------------------------------------------------------------------------------
# 1a. The wheel
# ---------------------------------------------------------------------------------------------

_NOT_SOURCE = {
    ".git", ".venv", "venv", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache",
    ".pytest_cache", ".mesh", ".local", "node_modules",
}  # fmt: skip


def _ignore(folder: str, names: list[str]) -> set[str]:
    here = Path(folder)
    return {
        n
        for n in names
        if n in _NOT_SOURCE
        or n.endswith(".egg-info")
        or (here / n / "pyvenv.cfg").exists()  # any other virtualenv
    }


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository (symlinks kept as symlinks) to build from.

    Not /work/main itself: setuptools builds in the source tree, writes build/ and *.egg-info
    there and reuses build/lib from one build to the next, so a module removed from the tree
    (cli.py becoming cli/) would linger in the next wheel and the test would vouch for a
    layout the tree no longer has; it would also litter a tree other people work in.
    """
    dest = tmp_path_factory.mktemp("src") / "agentmesh-streams"
    shutil.copytree(REPO, dest, symlinks=True, ignore=_ignore)
    return dest


@pytest.fixture(scope="module")
def wheel(source_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(source_copy)],
        cwd=out,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{_tail(proc)}"
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


@SLOW
def test_wheel_holds_one_import_root(wheel: Path, source_copy: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
        contents = {name: zf.read(name) for name in infos}

    tops = {name.split("/", 1)[0] for name in infos}
    dist_infos = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_infos) == 1 and next(iter(dist_infos)).startswith("agentmesh_streams-"), tops
    for stray in (*LINKED, "examples", "tests", "refund_desk", "planner_writer"):
        assert stray not in tops, f"the wheel installs a top-level {stray!r}: {sorted(tops)}"
    assert tops == {ROOT, *dist_infos}, f"unexpected top-level entries: {sorted(tops)}"

    links = sorted(name for name, info in infos.items() if _is_symlink(info))
    assert not links, f"symlinks in the wheel: {links}"

    agent = f"{ROOT}/agents/agent.py"
    assert agent in infos, "agentmesh/agents/agent.py is missing"
    assert contents[agent] == (source_copy / "agents" / "agent.py").read_bytes()
    assert f"{ROOT}/py.typed" in infos, "agentmesh/py.typed is missing"

    for folder, pattern in (("outbox/migrations", "*.sql"), ("bus/lua", "*.lua")):
        expected = {f"{ROOT}/{folder}/{p.name}" for p in (source_copy / folder).glob(pattern)}
        assert expected, f"no {folder}/{pattern} in the source tree"
        got = {n for n in infos if n.startswith(f"{ROOT}/{folder}/") and Path(n).match(pattern)}
        assert got == expected, f"{folder}/{pattern}: wheel has {sorted(got)}"
        for name in got:
            assert contents[name] == (source_copy / name.removeprefix(f"{ROOT}/")).read_bytes()


def _package_sources(source_copy: Path) -> Iterator[str]:
    """Every .py under agentmesh/ (through the symlinks), as a path inside the wheel."""
    pkg = source_copy / ROOT
    for dirpath, dirnames, filenames in os.walk(pkg, followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith(".py"):
                yield (Path(dirpath) / name).relative_to(source_copy).as_posix()


@SLOW
def test_wheel_ships_every_module(wheel: Path, source_copy: Path) -> None:
    """A new subpackage (say agentmesh/cli/) must also be listed in [tool.setuptools] packages."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = sorted(set(_package_sources(source_copy)) - names)
    assert not missing, (
        "source files under agentmesh/ that the wheel leaves out (a folder without __init__.py, "
        f"or a package missing from [tool.setuptools] packages): {missing}"
    )


# ---------------------------------------------------------------------------------------------
# 1b. Installed beside openai-agents
# ---------------------------------------------------------------------------------------------


@dataclass
class Venv:
    root: Path
    workdir: Path  # an empty folder to run in, so nothing from the repository is on sys.path
    openai_agents_error: str | None = None

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
        }
        env["VIRTUAL_ENV"] = str(self.root)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        return env

    def run(self, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return _run(list(cmd), cwd=self.workdir, env=self.env, timeout=timeout)

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.bin / "python"), "-c", code, timeout=120)


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    base = tmp_path_factory.mktemp("venv")
    v = Venv(root=base / "venv", workdir=base / "cwd")
    v.workdir.mkdir()
    made = _run([sys.executable, "-m", "venv", str(v.root)], cwd=base, timeout=300)
    assert made.returncode == 0, f"python -m venv failed:\n{_tail(made)}"
    pip = [str(v.bin / "python"), "-m", "pip", "install"]  # pip's cache stays on

    ours = v.run(*pip, str(wheel), timeout=900)
    assert ours.returncode == 0, f"the agentmesh-streams wheel does not install:\n{_tail(ours)}"

    theirs = v.run(*pip, "openai-agents", timeout=900)
    if theirs.returncode != 0:
        v.openai_agents_error = _tail(theirs, 15)
    return v


@SLOW
def test_installs_beside_openai_agents(venv: Venv) -> None:
    if venv.openai_agents_error is not None:
        pytest.skip(f"openai-agents could not be installed:\n{venv.openai_agents_error}")
    proc = venv.python(
        "import agents, agentmesh.agents; assert agents.__file__ != agentmesh.agents.__file__, "
        "agents.__file__; print(agents.__file__); print(agentmesh.agents.__file__)"
    )
    assert proc.returncode == 0, _tail(proc)
    theirs, ours = proc.stdout.splitlines()
    site = venv.root / "lib"
    assert Path(theirs).is_relative_to(site) and Path(ours).is_relative_to(site), proc.stdout
    assert Path(ours).parent.parent.name == ROOT, proc.stdout  # .../agentmesh/agents/__init__.py

    check = venv.run(str(venv.bin / "python"), "-m", "pip", "check", timeout=120)
    assert check.returncode == 0, f"conflicting requirements side by side:\n{_tail(check)}"


@SLOW
def test_installed_package_imports(venv: Venv) -> None:
    proc = venv.python(
        "from agentmesh.agents import Agent; import agentmesh._version as v; print(v.__version__)"
    )
    assert proc.returncode == 0, _tail(proc)
    assert proc.stdout.strip() == _project_version()


@SLOW
def test_installed_package_finds_its_data_files(venv: Venv) -> None:
    """Lua scripts and migrations load from the installed package, by its own name (a lookup
    of the bare folder name worked from a checkout and failed everywhere else)."""
    proc = venv.python(
        "from agentmesh.bus.scripts import _source; assert 'redis.call' in _source('publish')\n"
        "from agentmesh.outbox.migrate import available; print(len(available()))\n"
        "import sys; assert not {m.split('.')[0] for m in sys.modules} & "
        "{'bus', 'outbox', 'schemas'}, 'a bare name was imported'"
    )
    assert proc.returncode == 0, _tail(proc)
    assert int(proc.stdout.strip()) >= 2, proc.stdout


@SLOW
def test_mesh_version(venv: Venv) -> None:
    mesh = venv.bin / "mesh"
    assert mesh.exists(), "the wheel installs no `mesh` console script"
    proc = venv.run(str(mesh), "--version", timeout=120)
    assert proc.returncode == 0, f"mesh --version failed:\n{_tail(proc)}"
    assert _project_version() in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------
# 1c. The import graph, read from the source
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    target: str
    line: int
    # Inside `if TYPE_CHECKING:`: never executed, so it cannot make an import cycle at run time,
    # but it still says which layer depends on which, so the layering rules count it.
    type_checking: bool


@dataclass
class Graph:
    files: dict[str, Path] = field(default_factory=dict)
    packages: set[str] = field(default_factory=set)
    edges: dict[str, list[Edge]] = field(default_factory=dict)
    import_errors: dict[str, str] = field(default_factory=dict)

    def known(self, name: str) -> str | None:
        """The longest prefix of `name` that is one of our modules."""
        parts = name.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in self.files:
                return candidate
            parts.pop()
        return None

    def runtime(self, module: str) -> set[str]:
        return {e.target for e in self.edges.get(module, ()) if not e.type_checking}

    def targets(self, module: str, *, runtime_only: bool = False) -> set[str]:
        if runtime_only:
            return self.runtime(module)
        return {e.target for e in self.edges.get(module, ())}

    def reach(self, module: str) -> set[str]:
        """Every module of ours that `module` imports, directly or through others (imports under
        TYPE_CHECKING too; implicit parent-package imports not: see test_core_...)."""
        seen: set[str] = set()
        todo = [module]
        while todo:
            for n in self.targets(todo.pop()) - seen:
                seen.add(n)
                todo.append(n)
        seen.discard(module)
        return seen

    def path(self, start: str, goal: str, *, runtime_only: bool = False) -> list[str]:
        """A shortest chain of imports from start to goal (for messages)."""
        prev: dict[str, str] = {}
        frontier = [start]
        seen = {start}
        while frontier:
            nxt: list[str] = []
            for cur in frontier:
                for t in sorted(self.targets(cur, runtime_only=runtime_only)):
                    if t == goal:
                        chain = [t, cur]
                        while chain[-1] != start:
                            chain.append(prev[chain[-1]])
                        return chain[::-1]
                    if t not in seen:
                        seen.add(t)
                        prev[t] = cur
                        nxt.append(t)
            frontier = nxt
        return []

    def describe(self, chain: list[str]) -> str:
        hops = []
        for a, b in itertools.pairwise(chain):
            lines = sorted({e.line for e in self.edges.get(a, ()) if e.target == b})
            hops.append(f"{a}:{','.join(map(str, lines))} -> {b}")
        return "\n    ".join(hops)


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return False


class _Imports(ast.NodeVisitor):
    """Every import statement at any depth (functions, classes, try/if blocks)."""

    def __init__(self, graph: Graph, module: str) -> None:
        self.graph = graph
        self.module = module
        self.type_checking = 0
        self.found: list[Edge] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _add(self, name: str, line: int) -> None:
        if name != ROOT and not name.startswith(ROOT + "."):
            return
        target = self.graph.known(name)
        edge = Edge(target, line, self.type_checking > 0) if target else None
        if edge and target != self.module and edge not in self.found:
            self.found.append(edge)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            # `import agentmesh.outbox.relay` runs agentmesh and agentmesh.outbox first: that is
            # the implicit parent-package import, left out; the edge is to the module named.
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            # `from . import x` in a package's __init__ means the package itself; in a plain
            # module, the package it is in. Each further dot goes one package up.
            parts = self.module.split(".")
            if self.module not in self.graph.packages:
                parts.pop()
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*parts, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            # `from agentmesh.schemas import registry` imports agentmesh.schemas.registry,
            # `from agentmesh.schemas import PoisonMessage` the package's __init__.
            self._add(sub if sub in self.graph.files else base, node.lineno)


def _walk_errors(errors: dict[str, str]) -> Callable[[str], None]:
    def onerror(name: str) -> None:
        errors[name] = repr(sys.exc_info()[1])

    return onerror


@pytest.fixture(scope="module")
def graph() -> Graph:
    pkg = importlib.import_module(ROOT)
    g = Graph()
    g.files[ROOT] = Path(pkg.__file__ or "")
    g.packages.add(ROOT)
    walk = pkgutil.walk_packages(pkg.__path__, ROOT + ".", onerror=_walk_errors(g.import_errors))
    for info in walk:
        origin = None
        if info.name.rpartition(".")[2] != "__main__":  # importing it would run `mesh`
            try:
                origin = importlib.import_module(info.name).__file__
            except Exception as exc:  # every module must import: test_every_module_imports
                g.import_errors[info.name] = repr(exc)
        if origin is None:
            spec = importlib.util.find_spec(info.name)
            origin = spec.origin if spec else None
        if origin and origin.endswith(".py"):
            g.files[info.name] = Path(origin)
            if info.ispkg:
                g.packages.add(info.name)
    for name, path in g.files.items():
        visitor = _Imports(g, name)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        g.edges[name] = visitor.found
    return g


def test_every_module_imports(graph: Graph) -> None:
    assert {f"{ROOT}.{n}" for n in LINKED} <= set(graph.files), sorted(graph.files)
    assert not graph.import_errors, "modules that fail to import:\n" + "\n".join(
        f"  {name}: {err}" for name, err in sorted(graph.import_errors.items())
    )


def _cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), run-time edges only."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.runtime(v)):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph.files):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles(graph: Graph) -> None:
    """Imports inside functions count (they still run, and a cycle between two modules is one
    layer that should be one module, or two that should not know each other). Imports under
    `if TYPE_CHECKING:` do not: they never run, so they cannot make a cycle at run time."""
    problems = []
    for component in _cycles(graph):
        members = set(component)
        inside = [
            f"{m}:{e.line} -> {e.target}"
            for m in component
            for e in sorted(graph.edges[m], key=lambda e: e.line)
            if e.target in members and not e.type_checking
        ]
        chain = graph.path(component[0], component[0], runtime_only=True)
        problems.append(
            f"- {', '.join(component)}\n  e.g. {' -> '.join(chain)}\n  imports inside it:\n    "
            + "\n    ".join(inside)
        )
    assert not problems, "import cycles among agentmesh modules:\n" + "\n".join(problems)


def test_core_never_reaches_cli_or_devstack(graph: Graph) -> None:
    """Modules under agentmesh.agents/.bus/.outbox/.schemas never import agentmesh.cli or
    agentmesh.devstack, directly or through other modules.

    Python runs a module's parent packages first, but those implicit imports are not edges here
    (agentmesh/__init__.py re-exports the user surface, so following them would make every
    module reach everything). The root package is checked itself instead: it runs before any
    agentmesh.* module, so it must not reach the CLI or the local stack either."""
    problems = []
    for module in sorted(graph.files):
        if module != ROOT and not _under(module, *CORE):
            continue
        for bad in sorted(graph.reach(module)):
            if _under(bad, *OUTER):
                problems.append(
                    f"- {module} reaches {bad}:\n    {graph.describe(graph.path(module, bad))}"
                )
    assert not problems, (
        "agentmesh and agents/bus/outbox/schemas must not import the CLI or the local stack:\n"
        + ("\n".join(problems))
    )


def test_schemas_import_only_schemas(graph: Graph) -> None:
    """The leaf layer: every import of ours in agentmesh.schemas is of agentmesh.schemas.*
    (checking each module's own imports is enough: none of them can lead outside then)."""
    schemas = f"{ROOT}.schemas"
    problems = [
        f"- {module}:{edge.line} imports {edge.target}"
        for module in sorted(graph.files)
        if _under(module, schemas)
        for edge in graph.edges[module]
        if not _under(edge.target, schemas)
    ]
    assert not problems, "agentmesh.schemas must import nothing of ours but itself:\n" + "\n".join(
        problems
    )


# ---------------------------------------------------------------------------------------------
# 1d. mypy checks our code under its real names
# ---------------------------------------------------------------------------------------------


def test_mypy_does_not_ignore_our_modules() -> None:
    tool = _pyproject()["tool"]
    assert isinstance(tool, dict)
    mypy = tool["mypy"]
    assert "ignore_missing_imports" not in mypy, (
        "a global ignore_missing_imports turns a wrong import path into Any; "
        "list the untyped third-party modules in [[tool.mypy.overrides]] instead"
    )
    assert ROOT in mypy.get("packages", []), mypy.get("packages")
    for override in mypy.get("overrides", []):
        if not override.get("ignore_missing_imports"):
            continue
        modules = override["module"]
        for name in [modules] if isinstance(modules, str) else modules:
            assert not (name == ROOT or name.startswith((ROOT + ".", ROOT + "*"))), (
                f"mypy ignores missing imports of our own {name!r}"
            )
