"""The import rule of the package layout: arrows only point down.

Each home has a rank (records, errors and store at the bottom, the CLI at the top); a module may
import modules of a lower rank, or of its own package. Nothing outside tests and bench imports
``tracegen.testing``. Read from the source with ``ast`` (lazy imports inside functions count too),
so a new import that points up fails here, not in a reviewer's head.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tracegen"

# Longest matching prefix wins. Same rank is allowed only inside one package (e.g. distill.*).
RANKS: dict[str, int] = {
    "tracegen.errors": 0,
    "tracegen.fingerprint": 0,
    "tracegen.records": 0,
    "tracegen.truncate": 0,
    "tracegen.signals": 0,
    "tracegen.store": 1,
    "tracegen.serve": 1,
    "tracegen.progress_bar": 1,
    "tracegen.runtime.docker.settings": 1,  # plain settings: read by config without the runtime
    "tracegen.config": 2,
    "tracegen.recipe": 3,  # loads recipes into the settings of config
    "tracegen.client": 3,
    "tracegen.runtime": 4,
    "tracegen.data": 5,
    "tracegen.collect": 5,
    "tracegen.checks": 5,
    "tracegen.distill": 6,
    "tracegen.model_aliases": 6,
    "tracegen.filter": 6,
    "tracegen.evaluate": 6,
    "tracegen.pipeline": 7,
    "tracegen.cli": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def home(module: str) -> str | None:
    matches = [prefix for prefix in RANKS if module == prefix or module.startswith(prefix + ".")]
    return max(matches, key=len) if matches else None


def package_of(module: str) -> str:
    """The folder a module lives in (``tracegen.data`` for ``tracegen.data.audit``), or itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else module


def imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tracegen."):
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if _is_module(node.module, a.name)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("tracegen.")]
    return found


def _is_module(package: str, name: str) -> bool:
    base = PACKAGE.parent.joinpath(*package.split("."), name)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_home() -> None:
    homeless = [module_name(p) for p in SOURCES if "testing" not in p.parts and home(module_name(p)) is None]
    assert homeless in ([], ["tracegen"]), f"give these a rank in RANKS: {homeless}"


def violations(me: str, targets: list[tuple[int, str]]) -> list[str]:
    """The imports of module ``me`` that break the rule, one line each."""
    my_home = home(me)
    if my_home is None:
        return []
    wrong = []
    for line, target in targets:
        if target.startswith("tracegen.testing"):
            wrong.append(f"line {line}: {target} is test support (tests and bench only)")
            continue
        target_home = home(target)
        if target_home is None or package_of(target) == package_of(me):
            continue
        if RANKS[target_home] >= RANKS[my_home]:
            wrong.append(f"line {line}: {target} (rank {RANKS[target_home]}) from rank {RANKS[my_home]}")
    return wrong


@pytest.mark.parametrize("path", SOURCES, ids=[module_name(p) for p in SOURCES])
def test_imports_point_down(path: Path) -> None:
    if "testing" in path.parts:
        return  # test support may import anything below the CLI; nothing may import it
    wrong = violations(module_name(path), imports(path))
    assert not wrong, f"{module_name(path)} imports upward or sideways:\n" + "\n".join(wrong)


def test_the_rule_catches_what_it_should() -> None:
    assert violations("tracegen.records", [(3, "tracegen.cli.app")]) == [
        "line 3: tracegen.cli.app (rank 8) from rank 0"
    ]
    assert violations("tracegen.data.tokenize", [(9, "tracegen.testing.fake_server")])  # test support
    assert violations("tracegen.collect.agent", [(1, "tracegen.checks.answers")])  # sideways, same rank
    assert not violations("tracegen.distill.trainer", [(1, "tracegen.distill.cache"), (2, "tracegen.config")])
