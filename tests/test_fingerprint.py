"""One fingerprint convention: every setting decides, unless marked HOW where it is declared."""

from __future__ import annotations

from pydantic import BaseModel

from tracegen.checks.judge import JudgeCheck
from tracegen.checks.sandbox import SharedSandbox
from tracegen.checks.task_tests import TestsCheck
from tracegen.config import CollectConfig, JudgeConfig, Recipe
from tracegen.fingerprint import deciding, fingerprint, how_fields
from tracegen.runtime.docker.settings import DockerRuntimeConfig

# Settings that are about how work runs wherever they appear (a subclass redefining one must keep the mark).
# (A ``timeout_s`` may decide a verdict: the sandbox's deadline, math-verify's; it is not in this list.)
ALWAYS_HOW = {"base_url", "api_key_env", "concurrency", "max_attempts", "workers", "prices", "preflight"}


def settings_models() -> set[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    todo: list[type[BaseModel]] = [Recipe]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for field in model.model_fields.values():
            for arg in _types(field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    todo.append(arg)
    return seen


def _types(annotation: object) -> list[object]:
    args = getattr(annotation, "__args__", None)
    return [annotation] if not args else [t for a in args for t in _types(a)]


def test_names_that_are_always_how_are_marked_in_every_settings_model() -> None:
    unmarked = [
        f"{model.__name__}.{name}"
        for model in settings_models()
        for name in model.model_fields
        if name in ALWAYS_HOW and name not in how_fields(model)
    ]
    assert not unmarked, f"mark these json_schema_extra=HOW: {unmarked}"


def test_collect_fingerprint_fails_safe_and_ignores_how_settings() -> None:
    base = CollectConfig(runtime="docker")
    fp = base.fingerprint()
    # how the work runs: same ids
    for update in ({"concurrency": 3}, {"limit": 2}, {"samples_per_task": 4}):
        assert base.model_copy(update=update).fingerprint() == fp
    faster = base.model_copy(update={"docker": base.docker.model_copy(update={"pool_size": 9, "recycle": False})})
    assert faster.fingerprint() == fp
    moved = base.model_copy(update={"teacher": base.teacher.model_copy(update={"base_url": "http://other/v1"})})
    assert moved.fingerprint() == fp
    # what is produced: new ids, including sandbox limits nobody listed by hand
    tighter = base.model_copy(update={"docker": base.docker.model_copy(update={"mem_limit": "512m"})})
    assert tighter.fingerprint() != fp
    assert base.model_copy(update={"max_turns": 3}).fingerprint() != fp
    # the simulator's sampling decides simulated observations
    simulated = CollectConfig(runtime="simulated")
    hotter = simulated.model_copy(
        update={"simulator": simulated.simulator_endpoint().model_copy(update={"temperature": 1.3})}
    )
    assert hotter.fingerprint() != simulated.fingerprint()


def test_check_keys_follow_the_same_rule() -> None:
    sandbox = SharedSandbox(DockerRuntimeConfig())
    key = TestsCheck(sandbox, "skip").key
    assert TestsCheck(SharedSandbox(DockerRuntimeConfig(pool_size=7)), "skip").key == key
    assert TestsCheck(SharedSandbox(DockerRuntimeConfig(pids_limit=64)), "skip").key != key
    judge = JudgeCheck(JudgeConfig(model="m", rubric="r")).key
    assert JudgeCheck(JudgeConfig(model="m", rubric="r", concurrency=1, base_url="http://x/v1")).key == judge
    assert JudgeCheck(JudgeConfig(model="m", rubric="other")).key != judge
    assert "concurrency" not in deciding(JudgeConfig())


# The default collect fingerprint since fingerprint_version 2 (the ids runs have been written under).
# A change here orphans every earlier collect run: mark a new setting ADDED (when its default changes
# nothing) or, when ids must change, bump fingerprint_version on purpose and say so in the README.
PINNED_DEFAULT_COLLECT = "de8f7f154356bc49"


def test_the_default_collect_fingerprint_is_pinned() -> None:
    assert fingerprint(CollectConfig().generation_settings()) == PINNED_DEFAULT_COLLECT


def test_a_setting_added_later_counts_only_away_from_its_default() -> None:
    """task_columns.language came after version 2: at its default, earlier runs keep their ids; set, it decides."""
    base = CollectConfig()
    assert "language" not in base.generation_settings()["task_columns"]
    moved = CollectConfig.model_validate({"task_columns": {"language": "lang"}})
    assert moved.generation_settings()["task_columns"]["language"] == "lang"
    assert moved.fingerprint() != base.fingerprint()
