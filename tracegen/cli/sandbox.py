"""``tracegen sandbox build|check|cleanup``: the Docker sandbox's image, self-test and garbage.

Results go to stdout as tables, progress to stderr; failures are raised as tracegen errors (the
main CLI maps them to exit codes). docker-py is imported inside the commands, so ``tracegen
--help`` never loads it. ``python -m tracegen.cli.sandbox build`` works without the main CLI.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from tracegen.errors import TracegenError

if TYPE_CHECKING:
    from tracegen.runtime.docker.settings import DockerRuntimeConfig

sandbox_app = typer.Typer(
    help="The Docker sandbox: build its image, run the hostile-code self-test, remove leftover containers.",
    no_args_is_help=True,
)

RecipeOpt = Annotated[
    Path | None, typer.Option("--recipe", "-r", help="Take image and engines from this recipe's collect.docker.")
]
ImageOpt = Annotated[
    str | None,
    typer.Option("--image", help="Sandbox image name (default: the recipe's, else tracegen-sandbox:latest)."),
]
EngineOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--engine",
        metavar="URL",
        help="Docker engine URL (unix://, tcp://, ssh://); repeat for several. Default: DOCKER_HOST.",
    ),
]

out = Console()
err = Console(stderr=True)


def _config(recipe: Path | None, image: str | None, engines: list[str] | None) -> DockerRuntimeConfig:
    from tracegen.runtime.docker.settings import DockerRuntimeConfig  # not at start-up: --help stays fast

    config = DockerRuntimeConfig()
    if recipe is not None:
        from tracegen.recipe import load_recipe

        config = load_recipe(recipe).collect.docker
    update: dict[str, object] = {}
    if image:
        update["image"] = image
    if engines:
        update["engines"] = list(engines)
    return config.model_copy(update=update)


def _engine_name(url: str | None) -> str:
    return url or "default (DOCKER_HOST)"


@sandbox_app.command()
def build(
    recipe: RecipeOpt = None,
    image: ImageOpt = None,
    engine: EngineOpt = None,
    base: Annotated[str, typer.Option(help="Base image when a registry answers.")] = "python:3.12-slim",
    rebuild_base: Annotated[
        bool, typer.Option("--rebuild-base", help="Bootstrap the offline Debian base again even if one exists.")
    ] = False,
) -> None:
    """Build the sandbox image (python:3.12-slim, or a locally bootstrapped Debian base when no registry answers)."""
    from tracegen.runtime.docker.sweep import connect
    from tracegen.runtime.image import build_image, copy_image

    config = _config(recipe, image, engine)
    urls: list[str | None] = list(config.engines) or [None]
    clients = [connect(url) for url in urls]
    result = build_image(clients[0], config.image, base, rebuild_base, say=lambda line: err.print(line))
    for url, client in zip(urls[1:], clients[1:], strict=True):
        err.print(f"copying {config.image} to {url}")
        copy_image(clients[0], client, config.image)
    table = Table(title="sandbox image")
    for column in ("engine", "image", "base", "path"):
        table.add_column(column)
    how = "registry" if result.path == "registry" else "offline: debootstrap + import"
    if result.path == "local" and not result.bootstrapped:
        how = "offline: reused local base"
    for url in urls:
        table.add_row(_engine_name(url), result.image, result.base, how)
    out.print(table)


@sandbox_app.command()
def check(recipe: RecipeOpt = None, image: ImageOpt = None, engine: EngineOpt = None) -> None:
    """Run hostile code through the sandbox and print what held (exit 1 when any case fails)."""
    from tracegen.runtime.selfcheck import run_selfcheck

    config = _config(recipe, image, engine)
    err.print(f"running the sandbox self-test against {config.image} (about 20 s)")
    rows = asyncio.run(run_selfcheck(config))
    table = Table(title=f"sandbox self-test: {config.image}")
    for column in ("case", "expected", "observed", "pass"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.case, row.expected, row.observed, "[green]yes[/]" if row.passed else "[red]NO[/]")
    out.print(table)
    failed = [row.case for row in rows if not row.passed]
    if failed:
        raise TracegenError(
            f"sandbox self-test failed: {', '.join(failed)}",
            hint="the sandbox does not hold on this engine; see the table above",
        )


@sandbox_app.command()
def cleanup(
    recipe: RecipeOpt = None,
    engine: EngineOpt = None,
    stale_only: Annotated[
        bool, typer.Option("--stale-only", help="Only containers whose owner process is dead or whose ttl passed.")
    ] = False,
) -> None:
    """Remove every container tracegen created (by label), including those of crashed runs."""
    from tracegen.runtime.docker.sweep import connect, sweep_engine

    config = _config(recipe, None, engine)
    table = Table(title="tracegen containers")
    for column in ("engine", "removed", "kept"):
        table.add_column(column)
    urls: list[str | None] = list(config.engines) or [None]
    for url in urls:
        report = sweep_engine(connect(url), only_stale=stale_only)
        table.add_row(_engine_name(url), str(report.removed), str(report.kept))
    out.print(table)
