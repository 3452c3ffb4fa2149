"""``tracegen run RECIPE --out WORK_DIR``: every stage a recipe declares, in pipeline order, resumable.

Stages and where they write (inside WORK_DIR)::

    collect        collect/           trajectories.jsonl from the teacher (tracegen collect)
    filter         filter/            kept.jsonl / rejected.jsonl / report.json (tracegen filter)
    format         dataset/           kept (or collected, or imported ``run.data``) -> training rows
    cache_teacher  teacher-cache/     teacher top-k log-probs for KD (tracegen distill cache-teacher)
    distill        adapter/           LoRA adapter (tracegen distill)
    merge          merged/            adapter folded into the student (tracegen distill merge)
    stage2_format  stage2-dataset/    ``stage2.data`` in ``stage2.format``'s template
    stage2_distill stage2-adapter/    second training stage on merged/
    stage2_merge   stage2-merged/
    eval           eval/              the final model served and measured (tracegen eval), plus probes

A stage that finished writes ``.run/<stage>.json`` (its facts and a fingerprint of its settings and
of the stages before it). Re-running skips finished stages, and each stage's own resume (collect's
journal, filter's verdicts, distill's checkpoint) picks up a crashed one where it stopped. Changing a
finished stage's settings is refused rather than silently mixing two setups in one work directory.

``--scale smoke`` applies the recipe's ``smoke:`` block (tiny offline models and data). Endpoints
left without a ``base_url`` are served locally from ``run.serve`` when the recipe names a model there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tracegen.config import (
    HELD_OUT,
    STAGE_ORDER,
    DistillConfig,
    EndpointConfig,
    EvalConfig,
    FormatConfig,
    Recipe,
)
from tracegen.errors import BadInputError, TracegenError
from tracegen.store import write_json_atomic, write_lines_atomic

STAGE_DIRS: dict[str, str] = {
    "collect": "collect",
    "filter": "filter",
    "format": "dataset",
    "cache_teacher": "teacher-cache",
    "distill": "adapter",
    "merge": "merged",
    "stage2_format": "stage2-dataset",
    "stage2_distill": "stage2-adapter",
    "stage2_merge": "stage2-merged",
    "eval": "eval",
}
MARKERS = ".run"
ENDPOINT_STAGES = {"collect", "filter", "format", "stage2_format"}  # may call an endpoint from run.serve


class RunInterrupted(TracegenError):
    """A stage stopped cleanly on Ctrl-C; its completed work is saved."""

    exit_code = 130


@dataclass
class StageOutcome:
    stage: str
    status: Literal["ran", "skipped"]
    out: Path
    seconds: float
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pipeline:
    recipe: Recipe
    work: Path
    scale: Literal["full", "smoke"] = "full"
    show_progress: bool = True
    say: Callable[[str], None] = print
    _fingerprint: str = ""
    _serving: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _served: Any = None  # the local endpoint of run.serve, started on first need

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> list[StageOutcome]:
        declared = set(self.recipe.run.stages)
        stages: list[str] = [s for s in STAGE_ORDER if s in declared]
        self._check_declared(stages)
        self.work.mkdir(parents=True, exist_ok=True)
        outcomes: list[StageOutcome] = []
        with self._serving:
            for stage in stages:
                outcomes.append(self._stage(stage))
        return outcomes

    def _check_declared(self, stages: list[str]) -> None:
        r = self.recipe
        if "format" in stages and not {"collect", "filter"} & set(stages) and not (r.run.data or r.data.sources):
            raise BadInputError(
                "the format stage has no input", hint="declare collect (and filter), or set run.data or data.sources"
            )
        if r.run.data and r.data.sources:
            raise BadInputError("run.data and data.sources both name the data", hint="keep one of them")
        if "filter" in stages and "collect" not in stages:
            raise BadInputError("the filter stage needs the collect stage", hint="add collect to run.stages")
        needs = {
            "cache_teacher": "format",
            "distill": "format",
            "merge": "distill",
            "stage2_distill": "stage2_format",
            "stage2_merge": "stage2_distill",
        }
        for stage, before in needs.items():
            if stage in stages and before not in stages:
                raise BadInputError(f"the {stage} stage needs the {before} stage", hint=f"add {before} to run.stages")
        from_logprobs = "cache_teacher" in stages and r.cache_teacher.source == "collect"
        if from_logprobs and ("collect" not in stages or not r.collect.teacher.top_logprobs):
            raise BadInputError(
                "cache_teacher.source collect reads the top log-probs collect stored",
                hint="add collect to run.stages and set collect.teacher.top_logprobs (e.g. 20)",
            )
        if any(s.startswith("stage2") for s in stages) and r.stage2 is None:
            raise BadInputError("stage2 stages declared but the recipe has no stage2: section")
        if "stage2_distill" in stages and "merge" not in stages:
            raise BadInputError("stage 2 trains the merged stage-1 model", hint="add merge to run.stages")
        held_out = r.eval is not None and r.eval.tasks == HELD_OUT
        if held_out and not {"format", "distill"} <= set(stages):
            raise BadInputError("eval.tasks held_out are the rows distill held out", hint="add format and distill")
        if "eval" in stages and not {"merge", "stage2_merge"} & set(stages) and not self._eval_base_url():
            raise BadInputError(
                "the eval stage needs a merged model or eval.endpoint.base_url", hint="add merge to run.stages"
            )

    def _stage(self, stage: str) -> StageOutcome:
        out = self.work / STAGE_DIRS[stage]
        marker = self.work / MARKERS / f"{stage}.json"
        self._fingerprint = _hash([self._fingerprint, stage, self._settings(stage)])
        if marker.is_file():
            done = json.loads(marker.read_text(encoding="utf-8"))
            if done.get("fingerprint") == self._fingerprint:
                self.say(f"run: {stage}: done earlier ({out}), skipped")
                return StageOutcome(stage, "skipped", out, 0.0, done.get("facts", {}))
            raise BadInputError(
                f"{out}: the {stage} stage finished with different settings (or different earlier stages)",
                hint=f"use a new --out, or delete {out} and {marker} to redo it",
            )
        if stage not in ENDPOINT_STAGES:
            self._serving.close()  # frees its memory and CPU for training; restarted if needed later
            self._served = None
        self.say(f"run: {stage} -> {out}")
        started = time.perf_counter()
        facts = getattr(self, f"_do_{stage}")(out)
        seconds = time.perf_counter() - started
        write_json_atomic(
            marker, {"stage": stage, "fingerprint": self._fingerprint, "seconds": seconds, "facts": facts}
        )
        return StageOutcome(stage, "ran", out, seconds, facts)

    def _settings(self, stage: str) -> Any:
        """What a stage's output depends on (endpoint URLs excluded: a served port changes every run)."""
        r = self.recipe
        section: Any = {
            "collect": r.collect,
            "filter": r.filter,
            "format": [_format_settings(r.format), r.run.data, *([r.data] if r.data.sources else [])],
            "cache_teacher": [r.cache_teacher, r.distill.top_k, r.distill.temperature, r.distill.max_length],
            "distill": r.distill,
            "merge": r.run.merge_best,
            "stage2_format": r.stage2 and [_format_settings(r.stage2.format), r.stage2.data],
            "stage2_distill": r.stage2 and r.stage2.distill,
            "stage2_merge": r.run.merge_best,
            "eval": [r.eval, r.run.probes, r.run.probe_max_new_tokens],
        }[stage]
        return _without_urls(_dump(section))

    # --- endpoints -------------------------------------------------------------------------------

    def _served_endpoint(self, who: str) -> tuple[str, str]:
        """(base_url, model) of ``run.serve``, started on first use and stopped when the run ends."""
        if self._served is None:
            spec = self.recipe.run.serve
            if not spec:
                raise BadInputError(
                    f"no endpoint for the {who}",
                    hint=f"set {who}.base_url and model in the recipe (or the matching flags / environment)",
                )
            from tracegen.model_aliases import resolve_model
            from tracegen.serve import serve

            model_dir = Path(resolve_model(spec))
            self.say(f"run: serving {spec} locally for the endpoints without a base_url")
            self._served = self._serving.enter_context(serve(model_dir))
        return self._served.base_url, self._served.model

    def _fill(self, endpoint: EndpointConfig, who: str) -> None:
        if not endpoint.base_url:  # the served model answers under its own name only
            endpoint.base_url, endpoint.model = self._served_endpoint(who)

    def _eval_base_url(self) -> str | None:
        evaluation = self.recipe.eval
        return evaluation.endpoint.base_url if evaluation is not None else None

    # --- stages ----------------------------------------------------------------------------------

    def _do_collect(self, out: Path) -> dict[str, Any]:
        from tracegen.collect.driver import run_collect

        config = self.recipe.collect.model_copy(deep=True)
        self._fill(config.teacher, "collect.teacher")
        if config.runtime == "simulated" and config.simulator is not None:
            self._fill(config.simulator, "collect.simulator")
        summary = run_collect(config, out, show_progress=self.show_progress)
        if summary.interrupted:
            raise RunInterrupted(f"collect interrupted: {summary.completed} trajectories saved in {out}")
        summary.check_errors(config.fail_on_error, "fail_on_error")
        return {
            "trajectories": summary.already_done + summary.completed,
            "stop_reasons": dict(summary.by_stop_reason),
            "completion_tokens": summary.completion_tokens,
        }

    def _do_filter(self, out: Path) -> dict[str, Any]:
        from tracegen.filter import run_filter

        config = self.recipe.filter.model_copy(deep=True)
        if "judge" in config.verifiers:
            self._fill(config.judge, "filter.judge")
        summary = run_filter(self.work / STAGE_DIRS["collect"], out, config, show_progress=self.show_progress)
        if summary.interrupted:
            raise RunInterrupted(f"filter interrupted: verdicts so far are journaled in {out}")
        report = summary.report
        if not report.get("kept"):
            raise TracegenError(
                f"filter kept 0 of {report.get('trajectories', 0)} trajectories: nothing to train on",
                hint=f"read the reasons in {out / 'rejected.jsonl'} and {out / 'report.json'}",
            )
        return {
            "trajectories": report["trajectories"],
            "kept": report["kept"],
            "acceptance_rate": report["acceptance_rate"],
            "pass_at_1": report["pass_at_1"],
        }

    def _format_input(self) -> Path | None:
        """What format reads; None: the table of ``data.sources``, built by the format stage."""
        stages = self.recipe.run.stages
        if "filter" in stages:
            return self.work / STAGE_DIRS["filter"] / "kept.jsonl"
        if "collect" in stages:
            return self.work / STAGE_DIRS["collect"] / "trajectories.jsonl"
        return Path(self.recipe.run.data) if self.recipe.run.data else None

    def _format(self, source: Path, out: Path, config: FormatConfig, student: str | None) -> dict[str, Any]:
        from tracegen.data.format import format_dataset

        config = config.model_copy(deep=True)
        config.tokenizer = _format_tokenizer(config, student)
        if config.examine == "teacher":
            self._fill(config.teacher, "format.teacher")
        result = format_dataset(source, out, config)
        stats = result.stats
        return {"samples": stats.samples, "tokens": stats.tokens, "trained_tokens": stats.trained}

    def _do_format(self, out: Path) -> dict[str, Any]:
        source, facts = self._format_input(), {}
        if source is None:  # data.sources: the card's table, built first (next to the dataset)
            from tracegen.data.sources import build_table

            report = build_table(self.recipe.data, self.work / "sources")
            self.say(f"data: {report.rows} rows from {len(report.sources)} sources -> {report.table}")
            for line in report.differences:
                self.say(f"data: differs from the card: {line}")
            source, facts = report.table, {"sources": report.summary()}
        return {**facts, **self._format(source, out, self.recipe.format, self.recipe.distill.student)}

    def _do_cache_teacher(self, out: Path) -> dict[str, Any]:
        from tracegen.distill.cache import build_cache
        from tracegen.model_aliases import resolve_model

        c, d = self.recipe.cache_teacher, self.recipe.distill
        if c.source == "collect":
            return self._cache_from_logprobs(out)
        if not c.teacher:
            raise BadInputError(
                "cache_teacher.teacher is not set", hint="name a local teacher with the student's tokenizer"
            )
        summary = build_cache(
            self.work / STAGE_DIRS["format"],
            resolve_model(c.teacher),
            out,
            top_k=d.top_k,
            temperature=d.temperature,
            batch_size=c.batch_size,
            max_length=d.max_length,
        )
        return {"tokens": summary.tokens, "top_k": summary.top_k, "mean_topk_mass_t": summary.mean_topk_mass_t}

    def _cache_from_logprobs(self, out: Path) -> dict[str, Any]:
        from tracegen.distill.api_cache import build_cache_from_logprobs

        d = self.recipe.distill
        kept = self._format_input()
        assert kept is not None  # _check_declared: source collect needs the collect stage
        summary = build_cache_from_logprobs(
            self.work / STAGE_DIRS["format"],
            kept,
            out,
            tokenizer=_format_tokenizer(self.recipe.format, d.student),
            temperature=d.temperature,
            max_length=d.max_length,
        )
        return {"tokens": summary.tokens, "top_k": summary.top_k, "coverage": round(summary.coverage, 4)}

    def _train(
        self, config: DistillConfig, dataset: Path, out: Path, student: str, cache: Path | None
    ) -> dict[str, Any]:
        from tracegen.distill.trainer import train
        from tracegen.model_aliases import resolve_model

        config = config.model_copy(update={"student": resolve_model(student)})
        if cache is not None:
            config.teacher_cache = str(cache)
        summary = train(config, dataset, out, resume=True)
        if summary.interrupted:
            raise RunInterrupted(f"distill interrupted after step {summary.steps}: checkpoint in {out}")
        return {
            "mode": summary.mode,
            "steps": summary.steps,
            "final_loss": round(summary.final_loss, 4),
            "best_eval_loss": None if summary.best_eval_loss is None else round(summary.best_eval_loss, 4),
            "tokens": summary.tokens,
        }

    def _do_distill(self, out: Path) -> dict[str, Any]:
        d = self.recipe.distill
        if not d.student:
            raise BadInputError("distill.student is not set", hint="name the student model in the recipe")
        cache = self.work / STAGE_DIRS["cache_teacher"] if "cache_teacher" in self.recipe.run.stages else None
        return self._train(d, self.work / STAGE_DIRS["format"], out, d.student, cache)

    def _merge(self, adapter: Path, out: Path) -> dict[str, Any]:
        from tracegen.distill.merge import merge_adapter

        best = adapter / "best"
        chosen = best if self.recipe.run.merge_best and (best / "adapter_config.json").is_file() else adapter
        merge_adapter(chosen, out)
        return {"adapter": str(chosen)}

    def _do_merge(self, out: Path) -> dict[str, Any]:
        return self._merge(self.work / STAGE_DIRS["distill"], out)

    def _do_stage2_format(self, out: Path) -> dict[str, Any]:
        s2 = self.recipe.stage2
        assert s2 is not None  # _check_declared
        if not s2.data:
            raise BadInputError("stage2.data is not set", hint="name the stage-2 dataset (.jsonl, .parquet or folder)")
        return self._format(Path(s2.data), out, s2.format, str(self.work / STAGE_DIRS["merge"]))

    def _do_stage2_distill(self, out: Path) -> dict[str, Any]:
        s2 = self.recipe.stage2
        assert s2 is not None
        student = str(self.work / STAGE_DIRS["merge"])
        return self._train(s2.distill, self.work / STAGE_DIRS["stage2_format"], out, student, None)

    def _do_stage2_merge(self, out: Path) -> dict[str, Any]:
        return self._merge(self.work / STAGE_DIRS["stage2_distill"], out)

    def _measure(self, evaluation: EvalConfig, model: Path | None, out: Path) -> dict[str, Any]:
        """``tracegen eval`` on the recipe's tasks: against eval.endpoint.base_url, or the final model served here."""
        from tracegen.evaluate import run_eval
        from tracegen.serve import serve

        config = evaluation.model_copy(deep=True)
        if config.tasks == HELD_OUT:
            config.tasks = str(self._held_out_tasks(out))
        with contextlib.ExitStack() as stack:
            if not config.endpoint.base_url:
                assert model is not None  # _check_declared
                self.say(f"run: serving the trained model {model} for eval")
                served = stack.enter_context(serve(model))
                config.endpoint.base_url, config.endpoint.model = served.base_url, served.model
            summary = run_eval(config, out, show_progress=self.show_progress)
        if summary.interrupted:
            raise RunInterrupted(f"eval interrupted: answers so far are saved in {out}")
        totals = summary.totals()
        keep = ("answers", "accuracy", "converged", "hit_length", "with_markers", "empty_answers", "parse_fail")
        return {k: totals[k] for k in (*keep, "median_completion_tokens", "p90_completion_tokens")}

    def _held_out_tasks(self, out: Path) -> Path:
        """``eval.tasks: held_out``: the rows distill held out of the formatted dataset, as a task file."""
        from tracegen.distill.data import held_out_tasks

        d = self.recipe.distill
        tasks = held_out_tasks(self.work / STAGE_DIRS["format"], d.eval_fraction, d.split_seed, d.split_method)
        if not tasks:
            raise BadInputError(
                "eval.tasks held_out: distill held no rows out", hint="set distill.eval_fraction above 0"
            )
        out.mkdir(parents=True, exist_ok=True)
        path = out / "held-out-tasks.jsonl"
        write_lines_atomic(path, (json.dumps(t, ensure_ascii=False) for t in tasks))
        return path

    def final_model(self) -> Path | None:
        for stage in ("stage2_merge", "merge"):
            if stage in self.recipe.run.stages:
                return self.work / STAGE_DIRS[stage]
        return None

    def _do_eval(self, out: Path) -> dict[str, Any]:
        from tracegen.data.probes import run_probes

        model = self.final_model()
        facts: dict[str, Any] = {}
        evaluation = self.recipe.eval
        if evaluation is not None and evaluation.tasks:
            facts.update(self._measure(evaluation, model, out))
        out.mkdir(parents=True, exist_ok=True)
        if self.recipe.run.probes:
            if model is None:
                raise BadInputError("run.probes need a merged model", hint="add merge to run.stages")
            results = run_probes(model, list(self.recipe.run.probes), self.recipe.run.probe_max_new_tokens)
            write_json_atomic(out / "probes.json", {"probes": [r.as_dict() for r in results]})
            failed = [r.template for r in results if not r.generated]
            if failed:
                raise TracegenError(
                    f"the final model generates nothing from the {', '.join(failed)} prompt format",
                    hint=f"see {out / 'probes.json'}",
                )
            facts["probes"] = {r.template: r.completion[:60] for r in results}
        return facts


def _format_tokenizer(config: FormatConfig, student: str | None) -> str:
    """The tokenizer format uses (the student's own by default), as a local name or folder."""
    from tracegen.model_aliases import local_tokenizer

    tokenizer = config.tokenizer or student
    if not tokenizer:
        raise BadInputError("format has no tokenizer", hint="set format.tokenizer or distill.student")
    return local_tokenizer(tokenizer)


def _format_settings(config: FormatConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude=FormatConfig.HOW_NOT_WHAT)


def _dump(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def _without_urls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_urls(v) for k, v in value.items() if k != "base_url"}
    if isinstance(value, list):
        return [_without_urls(v) for v in value]
    return value


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def summary_rows(outcomes: list[StageOutcome]) -> list[tuple[str, str, str, str]]:
    """(stage, status, seconds, facts) per stage, for the end-of-run table."""
    rows: list[tuple[str, str, str, str]] = []
    for o in outcomes:
        facts = ", ".join(f"{k}={_short(v)}" for k, v in o.facts.items())
        rows.append((o.stage, o.status, f"{o.seconds:.1f}", f"{o.out}  {facts}"))
    return rows


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def write_summary(work: Path, outcomes: list[StageOutcome]) -> Path:
    path = work / "run.json"
    write_json_atomic(path, {"stages": [dict(asdict(o), out=str(o.out)) for o in outcomes]})
    return path
