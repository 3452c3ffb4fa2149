"""``tracegen run RECIPE --out WORK_DIR``: every stage a recipe declares, in pipeline order, resumable.

Stages and where they write (inside WORK_DIR)::

    collect        collect/           trajectories.jsonl from the teacher (tracegen collect)
    filter         filter/            kept.jsonl / rejected.jsonl / report.json (tracegen filter)
    format         dataset/           kept (or collected, or imported ``run.data``) -> training rows
    cache_teacher  teacher-cache/     teacher top-k log-probs for KD (tracegen distill cache-teacher)
    distill        adapter/           LoRA adapter, or the full model (tracegen distill)
    merge          merged/            adapter folded into the student; a full model linked (tracegen distill merge)
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
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tracegen.config import (
    HELD_OUT,
    DistillConfig,
    EndpointConfig,
    EvalConfig,
    FormatConfig,
    Recipe,
)
from tracegen.errors import BadInputError, TracegenError
from tracegen.fingerprint import changed_settings, deciding_value, fingerprint
from tracegen.store import write_json_atomic, write_lines_atomic

MARKERS = ".run"


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
class PlannedStage:
    stage: str
    out: Path
    action: str
    """run, skip (done earlier), or refuse: why."""
    settings: Any


@dataclass
class Pipeline:
    recipe: Recipe
    work: Path
    scale: Literal["full", "smoke"] = "full"
    show_progress: bool = True
    say: Callable[[str], None] = print
    on_summary: Callable[[str, Any], None] = lambda stage, summary: None
    """Called with a stage's own summary (collect's, eval's) as it finishes, e.g. to print its table."""
    _fingerprint: str = ""
    _serving: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _served: Any = None  # the local endpoint of run.serve, started on first need

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> list[StageOutcome]:
        stages = self.declared()
        self.work.mkdir(parents=True, exist_ok=True)
        outcomes: list[StageOutcome] = []
        with self._serving:
            for stage in stages:
                outcomes.append(self._stage(stage))
        return outcomes

    def declared(self) -> list[Stage]:
        """The recipe's stages in pipeline order, checked against each other (BadInputError if not)."""
        wanted = set(self.recipe.run.stages)
        stages = [s for s in STAGES if s.name in wanted]
        self._check_declared([s.name for s in stages])
        return stages

    def _check_declared(self, stages: list[str]) -> None:
        r = self.recipe
        if "format" in stages and not {"collect", "filter"} & set(stages) and not (r.run.data or r.data.sources):
            raise BadInputError(
                "the format stage has no input", hint="declare collect (and filter), or set run.data or data.sources"
            )
        if r.run.data and r.data.sources:
            raise BadInputError("run.data and data.sources both name the data", hint="keep one of them")
        for stage in stages:
            for before in STAGE[stage].needs:
                if before not in stages:
                    raise BadInputError(
                        f"the {stage} stage needs the {before} stage", hint=f"add {before} to run.stages"
                    )
        from_logprobs = "cache_teacher" in stages and r.cache_teacher.source == "collect"
        if from_logprobs and ("collect" not in stages or not r.collect.teacher.top_logprobs):
            raise BadInputError(
                "cache_teacher.source collect reads the top log-probs collect stored",
                hint="add collect to run.stages and set collect.teacher.top_logprobs (e.g. 20)",
            )
        if any(s.startswith("stage2") for s in stages) and r.stage2 is None:
            raise BadInputError("stage2 stages declared but the recipe has no stage2: section")
        held_out = r.eval is not None and r.eval.tasks == HELD_OUT
        if held_out and not {"format", "distill"} <= set(stages):
            raise BadInputError("eval.tasks held_out are the rows distill held out", hint="add format and distill")
        if "eval" in stages and not {"merge", "stage2_merge"} & set(stages) and not self._eval_base_url():
            raise BadInputError(
                "the eval stage needs a merged model or eval.endpoint.base_url", hint="add merge to run.stages"
            )

    def plan(self) -> list[PlannedStage]:
        """What ``run`` would do, stage by stage, without doing any of it (``tracegen run --dry-run``)."""
        chained = ""
        planned: list[PlannedStage] = []
        for spec in self.declared():
            settings = spec.fingerprinted(self.recipe)
            chained = fingerprint([chained, spec.name, settings])
            done = self._marker(spec)
            if done is None:
                action = "run"
            elif done.get("fingerprint") == chained:
                action = "skip (done earlier)"
            else:
                action = "refuse: " + self._changed(spec, done, settings)
            planned.append(PlannedStage(spec.name, self.work / spec.folder, action, settings))
        return planned

    def _marker(self, spec: Stage) -> dict[str, Any] | None:
        marker = self.work / MARKERS / f"{spec.name}.json"
        if not marker.is_file():
            return None
        done: dict[str, Any] = json.loads(marker.read_text(encoding="utf-8"))
        return done

    @staticmethod
    def _changed(spec: Stage, done: dict[str, Any], settings: Any) -> str:
        if "settings" not in done:  # a marker from before settings were kept in it
            return f"the {spec.name} stage finished with different settings (or different earlier stages)"
        changes = changed_settings(done["settings"], settings)
        if not changes:
            return f"the {spec.name} stage finished after different earlier stages"
        return f"the {spec.name} stage finished with different settings: " + "; ".join(changes)

    def _stage(self, spec: Stage) -> StageOutcome:
        stage = spec.name
        out = self.work / spec.folder
        marker = self.work / MARKERS / f"{stage}.json"
        settings = spec.fingerprinted(self.recipe)
        self._fingerprint = fingerprint([self._fingerprint, stage, settings])
        done = self._marker(spec)
        if done is not None:
            if done.get("fingerprint") == self._fingerprint:
                self.say(f"run: {stage}: done earlier ({out}), skipped")
                return StageOutcome(stage, "skipped", out, 0.0, done.get("facts", {}))
            raise BadInputError(
                f"{out}: {self._changed(spec, done, settings)}",
                hint=f"use a new --out, or delete {out} and {marker} to redo it",
            )
        if not spec.endpoints:
            self._serving.close()  # frees its memory and CPU for training; restarted if needed later
            self._served = None
        self.say(f"run: {stage} -> {out}")
        started = time.perf_counter()
        facts = spec.run(self, out)
        seconds = time.perf_counter() - started
        write_json_atomic(
            marker,
            {
                "stage": stage,
                "fingerprint": self._fingerprint,
                "settings": settings,
                "seconds": seconds,
                "facts": facts,
            },
        )
        return StageOutcome(stage, "ran", out, seconds, facts)

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
        self.on_summary("collect", summary)
        summary.check_errors(config.fail_on_error, "fail_on_error")
        return {
            "trajectories": summary.already_done + summary.completed,
            "stop_reasons": dict(summary.by_stop_reason),
            "tool_calls": {s: summary.by_observation[s] for s in ("executed", "simulated", "error")},
            "completion_tokens": summary.completion_tokens,
        }

    def _do_filter(self, out: Path) -> dict[str, Any]:
        from tracegen.filter import run_filter

        config = self.recipe.filter.model_copy(deep=True)
        if "judge" in config.verifiers:
            self._fill(config.judge, "filter.judge")
        summary = run_filter(self.work / STAGE["collect"].folder, out, config, show_progress=self.show_progress)
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
            return self.work / STAGE["filter"].folder / "kept.jsonl"
        if "collect" in stages:
            return self.work / STAGE["collect"].folder / "trajectories.jsonl"
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
            self.work / STAGE["format"].folder,
            resolve_model(c.teacher),
            out,
            top_k=d.top_k,
            temperature=d.temperature,
            batch_size=c.batch_size,
            max_length=d.max_length,
            dtype=d.model_dtype,
        )
        return {"tokens": summary.tokens, "top_k": summary.top_k, "mean_topk_mass_t": summary.mean_topk_mass_t}

    def _cache_from_logprobs(self, out: Path) -> dict[str, Any]:
        from tracegen.distill.api_cache import build_cache_from_logprobs

        d = self.recipe.distill
        kept = self._format_input()
        assert kept is not None  # _check_declared: source collect needs the collect stage
        summary = build_cache_from_logprobs(
            self.work / STAGE["format"].folder,
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
        cache = self.work / STAGE["cache_teacher"].folder if "cache_teacher" in self.recipe.run.stages else None
        return self._train(d, self.work / STAGE["format"].folder, out, d.student, cache)

    def _merge(self, adapter: Path, out: Path) -> dict[str, Any]:
        from tracegen.distill.merge import merge_adapter

        best = adapter / "best"
        saved = (best / "adapter_config.json").is_file() or (best / "config.json").is_file()  # LoRA or full
        chosen = best if self.recipe.run.merge_best and saved else adapter
        merge_adapter(chosen, out)
        return {"adapter": str(chosen)}

    def _do_merge(self, out: Path) -> dict[str, Any]:
        return self._merge(self.work / STAGE["distill"].folder, out)

    def _do_stage2_format(self, out: Path) -> dict[str, Any]:
        s2 = self.recipe.stage2
        assert s2 is not None  # _check_declared
        if not s2.data:
            raise BadInputError("stage2.data is not set", hint="name the stage-2 dataset (.jsonl, .parquet or folder)")
        return self._format(Path(s2.data), out, s2.format, str(self.work / STAGE["merge"].folder))

    def _do_stage2_distill(self, out: Path) -> dict[str, Any]:
        s2 = self.recipe.stage2
        assert s2 is not None
        student = str(self.work / STAGE["merge"].folder)
        return self._train(s2.distill, self.work / STAGE["stage2_format"].folder, out, student, None)

    def _do_stage2_merge(self, out: Path) -> dict[str, Any]:
        return self._merge(self.work / STAGE["stage2_distill"].folder, out)

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
        self.on_summary("eval", summary)
        totals = summary.totals()
        keep = ("answers", "accuracy", "converged", "hit_length", "with_markers", "empty_answers", "parse_fail")
        return {k: totals[k] for k in (*keep, "median_completion_tokens", "p90_completion_tokens")}

    def _held_out_tasks(self, out: Path) -> Path:
        """``eval.tasks: held_out``: the rows distill held out of the formatted dataset, as a task file."""
        from tracegen.distill.data import held_out_tasks

        d = self.recipe.distill
        tasks = held_out_tasks(self.work / STAGE["format"].folder, d.eval_fraction, d.split_seed, d.split_method)
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
                return self.work / STAGE[stage].folder
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


@dataclass(frozen=True)
class Stage:
    """One stage of ``tracegen run``: everything the loop needs to know about it, in one place."""

    name: str
    folder: str
    """Where it writes, inside WORK_DIR."""
    run: Callable[[Pipeline, Path], dict[str, Any]]
    """Does the work into the folder; returns the facts shown in the summary."""
    settings: Callable[[Recipe], Any]
    """What its output depends on (fingerprinted; a change to a finished stage is refused)."""
    needs: tuple[str, ...] = ()
    """Stages that must be declared with it."""
    endpoints: bool = False
    """May call an endpoint served from ``run.serve`` (other stages stop that server to free memory)."""

    def fingerprinted(self, recipe: Recipe) -> Any:
        """Its settings as JSON, endpoint URLs excluded: a served port changes every run."""
        return deciding_value(self.settings(recipe))


STAGES: tuple[Stage, ...] = (
    Stage("collect", "collect", Pipeline._do_collect, lambda r: r.collect, endpoints=True),
    Stage("filter", "filter", Pipeline._do_filter, lambda r: r.filter, needs=("collect",), endpoints=True),
    Stage(
        "format",
        "dataset",
        Pipeline._do_format,
        lambda r: [r.format, r.run.data, *([r.data] if r.data.sources else [])],
        endpoints=True,
    ),
    Stage(
        "cache_teacher",
        "teacher-cache",
        Pipeline._do_cache_teacher,
        lambda r: [
            r.cache_teacher,
            r.distill.top_k,
            r.distill.temperature,
            r.distill.max_length,
            r.distill.model_dtype,
        ],
        needs=("format",),
    ),
    Stage("distill", "adapter", Pipeline._do_distill, lambda r: r.distill, needs=("format",)),
    Stage("merge", "merged", Pipeline._do_merge, lambda r: r.run.merge_best, needs=("distill",)),
    Stage(
        "stage2_format",
        "stage2-dataset",
        Pipeline._do_stage2_format,
        lambda r: r.stage2 and [r.stage2.format, r.stage2.data],
        endpoints=True,
    ),
    Stage(
        "stage2_distill",
        "stage2-adapter",
        Pipeline._do_stage2_distill,
        lambda r: r.stage2 and r.stage2.distill,
        needs=("stage2_format", "merge"),
    ),
    Stage(
        "stage2_merge",
        "stage2-merged",
        Pipeline._do_stage2_merge,
        lambda r: r.run.merge_best,
        needs=("stage2_distill",),
    ),
    Stage("eval", "eval", Pipeline._do_eval, lambda r: [r.eval, r.run.probes, r.run.probe_max_new_tokens]),
)
STAGE: dict[str, Stage] = {s.name: s for s in STAGES}


def _format_tokenizer(config: FormatConfig, student: str | None) -> str:
    """The tokenizer format uses (the student's own by default), as a local name or folder."""
    from tracegen.model_aliases import local_tokenizer

    tokenizer = config.tokenizer or student
    if not tokenizer:
        raise BadInputError("format has no tokenizer", hint="set format.tokenizer or distill.student")
    return local_tokenizer(tokenizer)


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
