"""Recipes: loading a YAML file into the settings, merging flags over it, and errors that name the line.

Precedence, lowest first: the defaults of :mod:`tracegen.config` < the recipe file (its ``smoke:``
block merged over it with ``--scale smoke``) < environment variables and flags. A bad value is one
:class:`~tracegen.errors.RecipeError` naming the key, its line in the file and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import ValidationError

from tracegen.config import (
    HELD_OUT,
    CollectConfig,
    DistillConfig,
    EvalConfig,
    FilterConfig,
    FormatConfig,
    Recipe,
    Strict,
)
from tracegen.errors import RecipeError

# Error messages name a flag's key as it would appear in a recipe (collect.teacher.model, ...).
SECTION_NAMES: dict[type, str] = {
    CollectConfig: "collect",
    FilterConfig: "filter",
    FormatConfig: "format",
    DistillConfig: "distill",
    EvalConfig: "eval",
}


def load_recipe(path: Path, scale: Literal["full", "smoke"] = "full") -> Recipe:
    """Parse and validate a recipe; relative paths inside it resolve against the recipe's folder.

    ``scale="smoke"`` deep-merges the recipe's ``smoke:`` block over it first. The smoke block is
    validated at either scale, so a broken one is caught when the recipe is loaded, not in CI.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe must be a mapping of stage names to settings")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _recipe_error(exc, str(path), root) from exc
    if recipe.smoke is not None:
        try:
            smoke = Recipe.model_validate(merge(data, recipe.smoke))
        except ValidationError as exc:
            raise _recipe_error(exc, str(path), root, smoke=True) from exc
        if scale == "smoke":
            recipe = smoke
    elif scale == "smoke":
        raise RecipeError(f"{path}: no smoke: block", hint="add one, or run at --scale full")
    _resolve_paths(recipe, path.parent)
    return recipe


def _resolve_paths(recipe: Recipe, base: Path) -> None:
    """File settings resolve against the recipe's folder; a model that is not a local folder stays as written."""

    def file(value: str | None) -> str | None:
        return str((base / value).resolve()) if value and not Path(value).is_absolute() else value

    def model(value: str | None) -> str | None:
        local = value and not Path(value).is_absolute() and (base / value).exists()
        return str((base / value).resolve()) if local and value else value

    def data(value: str | None) -> str | None:  # a file (resolved even when missing, for the error) or a Hub id
        is_file = value and Path(value).suffix in (".jsonl", ".json", ".parquet")
        return file(value) if is_file else model(value)

    recipe.collect.tasks = file(recipe.collect.tasks)
    recipe.run.data = data(recipe.run.data)
    for source in recipe.data.sources:
        source.path = data(source.path) or source.path
    recipe.run.serve = model(recipe.run.serve)
    recipe.cache_teacher.teacher = model(recipe.cache_teacher.teacher)
    stage2 = recipe.stage2
    for distill, fmt in [(recipe.distill, recipe.format), *([(stage2.distill, stage2.format)] if stage2 else [])]:
        distill.student = model(distill.student)
        distill.teacher_cache = model(distill.teacher_cache)
        fmt.tokenizer = model(fmt.tokenizer)
    if stage2 is not None:
        stage2.data = data(stage2.data)
    evaluation = recipe.eval
    if evaluation is not None and evaluation.tasks and evaluation.tasks != HELD_OUT:
        evaluation.tasks = file(evaluation.tasks)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into ``base``; ``None`` in overrides means "not given", ``{}`` means empty.

    ``{}`` replaces: a smoke block can clear a mapping (e.g. a provider-only ``extra_body``).
    """
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and value:
            out[key] = merge(out.get(key) or {}, value)
        else:
            out[key] = value
    return out


SectionT = TypeVar("SectionT", bound=Strict)


def apply_overrides(config: SectionT, overrides: dict[str, Any], source: str = "flags") -> SectionT:
    """Layer flag/environment values over a validated recipe section, re-validating the result."""
    merged = merge(config.model_dump(exclude_unset=True), overrides)
    try:
        return type(config).model_validate(merged)
    except ValidationError as exc:
        raise _recipe_error(exc, source, None, prefix=SECTION_NAMES.get(type(config), "")) from exc


def _recipe_error(
    exc: ValidationError, source: str, root: yaml.Node | None, prefix: str = "", smoke: bool = False
) -> RecipeError:
    """One line naming the key (and its line in the file) and the fix."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    if smoke:  # the error came from the smoke overlay, or from the recipe underneath it
        loc = ["smoke", *loc] if _line_of(root, ["smoke", *loc], exact=True) else loc
    dotted = ".".join(([prefix] if prefix else []) + loc)
    line = _line_of(root, loc) if root is not None else None
    where = f"{source}:{line}" if line else source
    if err["type"] == "extra_forbidden":
        return RecipeError(
            f"{where}: unknown key '{dotted}'", hint="check the spelling; `tracegen collect --help` lists the settings"
        )
    return RecipeError(f"{where}: {dotted}: {err['msg']}")


def _line_of(node: yaml.Node | None, loc: list[str], exact: bool = False) -> int | None:
    """1-based line of the deepest YAML node along ``loc`` (pydantic's error location).

    ``exact``: None unless the whole of ``loc`` is in the file.
    """
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            key = next((k for k, _ in node.value if k.value == part), None)
            if match is None:
                return None if exact else line
            line = (key.start_mark.line if key is not None else match.start_mark.line) + 1
            node = match
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line
