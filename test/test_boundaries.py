"""The boundaries between the package's parts (../shared/DESIGN.md, "The parts and their boundaries"), read from
its imports: every import statement of a module, at module level or inside a function, and of every
ptp_ros module it reaches that way, counts.  A break names the chain of imports that leads to it."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ptp_ros"
ROS_ROOTS = ("rclpy", "rosidl_runtime_py", "cv_bridge", "ptp_ros_interfaces", "ptp_ros.ros")


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _within(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def is_ros(name: str) -> bool:
    return any(_within(name, root) for root in ROS_ROOTS) or name.split(".")[0].endswith(("_msgs", "_srvs"))


@cache
def direct_imports(module: str) -> frozenset[str]:
    """The absolute names every import statement of ``module`` names (``from a import b`` names ``a`` and,
    where it is a ptp_ros module, ``a.b``)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return frozenset(names)


def _with_packages(name: str) -> list[str]:
    """``name`` and the packages Python runs first to import it (``a.b.c`` → ``a``, ``a.b``, ``a.b.c``)."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_chain(module: str, forbidden: Callable[[str], bool]) -> list[str] | None:
    """The first chain of imports from ``module`` to a name ``forbidden`` holds for, or None."""
    came_from: dict[str, str | None] = dict.fromkeys(_with_packages(module))
    queue = [step for step in came_from if step in MODULES]
    while queue:
        current = queue.pop(0)
        for name in sorted(direct_imports(current)):
            for step in _with_packages(name):
                if step in came_from:
                    continue
                came_from[step] = current
                if forbidden(step):
                    chain = [step]
                    while (back := came_from[chain[-1]]) is not None:
                        chain.append(back)
                    return chain[::-1]
                if step in MODULES:
                    queue.append(step)
    return None


def _under(package: str) -> list[str]:
    return [name for name in MODULES if _within(name, package) and name != package]


def _uses(*roots: str) -> Callable[[str], bool]:
    return lambda name: any(_within(name, root) for root in roots)


# (module, what it must not reach, the test for it): the rows of DESIGN.md's table that imports can show.
RULES = [
    *((m, "transformers", _uses("transformers")) for m in _under("ptp_ros.pruning")),
    *((m, "ROS", is_ros) for m in _under("ptp_ros.pruning")),
    *((m, "cv2", _uses("cv2")) for m in _under("ptp_ros.pruning")),
    *((m, "ROS", is_ros) for m in _under("ptp_ros.vlm")),
    ("ptp_ros.overlay", "transformers", _uses("transformers")),
    ("ptp_ros.overlay", "the adapters (vlm/)", _uses("ptp_ros.vlm")),
    ("ptp_ros.latency_budget", "transformers", _uses("transformers")),
    ("ptp_ros.latency_budget", "ROS", is_ros),
    ("ptp_ros.timing", "transformers", _uses("transformers")),
    ("ptp_ros.ros.requests", "torch", _uses("torch")),
]


def test_the_rules_see_the_parts():
    """A rule over a part that is not there (a module renamed or moved) would pass by checking nothing."""
    for module, _, _ in RULES:
        assert module in MODULES, module
    assert len(_under("ptp_ros.pruning")) >= 5 and len(_under("ptp_ros.vlm")) >= 5


@pytest.mark.parametrize(
    ("module", "forbidden"), [(m, f) for m, _, f in RULES], ids=[f"{m} without {what}" for m, what, _ in RULES]
)
def test_a_part_imports_nothing_its_boundary_excludes(module, forbidden):
    chain = import_chain(module, forbidden)
    assert chain is None, " → ".join(chain)


def test_the_library_never_imports_its_test_fixtures():
    """``ptp_ros.testing`` builds tiny models for tests, demos and benchmarks; it may use the library, never
    the other way round (a user's install runs no fixture code)."""
    offenders = {
        module: sorted(name for name in direct_imports(module) if _within(name, "ptp_ros.testing"))
        for module in MODULES
        if not _within(module, "ptp_ros.testing")
    }
    assert {module: names for module, names in offenders.items() if names} == {}


def test_importing_the_light_parts_loads_no_transformers():
    """What the interpreter really loads, for the parts a ROS planner or a drawing tool imports without a
    model: catches what the package's import statements do not show (a third-party package that imports
    transformers, an ``importlib`` call)."""
    light = ["ptp_ros.pruning", *_under("ptp_ros.pruning"), "ptp_ros.overlay", "ptp_ros.latency_budget"]
    code = f"import sys; import {', '.join([*light, 'ptp_ros.timing'])}; print('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False"]


def test_request_checks_load_no_torch():
    """A planner validating a request before sending it needs the checks, not torch."""
    code = "import sys, ptp_ros.ros.requests; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False"]
