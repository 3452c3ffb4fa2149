"""End-of-run summary tables, printed to stdout."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tracegen.collect.driver import CollectSummary


def print_collect_summary(summary: CollectSummary) -> None:
    table = Table(title=f"collect: {summary.run_dir}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("trajectories planned (tasks x K)", str(summary.planned))
    table.add_row("already done (resumed)", str(summary.already_done))
    table.add_row("completed this run", str(summary.completed))
    if summary.retrying:
        table.add_row("  of which earlier errors sampled again", str(summary.retrying))
    for reason in ("answer", "max_turns", "length", "budget", "error"):
        table.add_row(f"  stop_reason={reason}", str(summary.by_stop_reason.get(reason, 0)))
    table.add_row("turns", str(summary.turns))
    table.add_row("tool calls", str(summary.by_observation.total()))
    for source in ("executed", "simulated", "error"):
        table.add_row(f"  answered: {source}", str(summary.by_observation.get(source, 0)))
    table.add_row(
        "prompt / completion / reasoning tokens",
        f"{summary.prompt_tokens:,} / {summary.completion_tokens:,} / {summary.reasoning_tokens:,}",
    )
    table.add_row("requests (retries)", f"{summary.requests} ({summary.retries})")
    table.add_row("wall time", f"{summary.wall_s:.1f} s")
    table.add_row("run directory", str(summary.run_dir))
    Console().print(table)
