from __future__ import annotations

from pathlib import Path

import pytest

from tracegen.config import CollectConfig, Recipe
from tracegen.errors import RecipeError
from tracegen.recipe import apply_overrides, load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_opens_with_its_command(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "tracegen" in first, "every recipe opens with the command that runs it"
    offline = load_recipe(path, "smoke") if recipe.smoke is not None else recipe  # full scale: the user's data
    for data in (offline.collect.tasks, offline.run.data, offline.stage2 and offline.stage2.data):
        if data:
            assert Path(data).exists(), f"{data}: relative paths resolve against the recipe"


def test_unknown_key_names_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("collect:\n  teacher:\n    model: m\n    temprature: 0.7\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:4" in info.value.message
    assert "collect.teacher.temprature" in info.value.message
    assert info.value.exit_code == 2


def test_bad_value_names_field_and_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("collect:\n  concurrency: 0\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:2: collect\.concurrency"):
        load_recipe(path)


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("collect:\n  teacher: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(path)


def test_precedence_defaults_then_recipe_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("collect:\n  concurrency: 7\n  teacher:\n    model: from-recipe\n    temperature: 0.2\n")
    recipe = load_recipe(path).collect
    assert CollectConfig().concurrency == 32  # default
    assert recipe.concurrency == 7 and recipe.teacher.temperature == 0.2  # recipe beats default
    final = apply_overrides(recipe, {"teacher": {"model": "from-flag", "temperature": None}, "concurrency": None})
    assert final.teacher.model == "from-flag"  # flag beats recipe
    assert final.teacher.temperature == 0.2  # an unset flag leaves the recipe's value
    assert final.concurrency == 7
    assert final.teacher.top_p == 0.95  # untouched default


def test_flag_validation_error_is_bad_input() -> None:
    with pytest.raises(RecipeError, match=r"collect\.concurrency"):
        apply_overrides(CollectConfig(), {"concurrency": -1})


def test_fingerprint_tracks_generation_settings_only() -> None:
    base = CollectConfig.model_validate({"teacher": {"model": "m", "base_url": "http://a/v1"}})
    moved = apply_overrides(base, {"teacher": {"base_url": "http://b/v1"}, "concurrency": 3, "samples_per_task": 4})
    hotter = apply_overrides(base, {"teacher": {"temperature": 1.0}})
    assert moved.fingerprint() == base.fingerprint()
    assert hotter.fingerprint() != base.fingerprint()


def test_simulator_falls_back_to_teacher() -> None:
    cfg = CollectConfig.model_validate(
        {"teacher": {"model": "t", "base_url": "http://t/v1"}, "simulator": {"model": "s"}}
    )
    sim = cfg.simulator_endpoint()
    assert (sim.model, sim.base_url) == ("s", "http://t/v1")
