"""The plugin developer's commands: ``generators`` (what is installed) and ``generate`` (what a
generator writes for a project, stored nowhere; `preview`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..cost.pricing import load_price_table
from ..generation import available_generators, load_generator
from .common import (
    DatabaseUrl,
    GeneratorOpt,
    LogFormat,
    LogLevel,
    app,
    build_settings,
    database,
    run_async,
)
from .preview import Preview, build_preview_request, preview_to_json, render_preview, run_preview


@app.command()
def generators() -> None:
    """List the installed generator plugins (no database needed)."""
    for name, target in sorted(available_generators().items()):
        typer.echo(f"{name:20} {target}")


@app.command()
def generate(
    project_id: Annotated[str, typer.Argument(help="The project to write an episode for.")],
    generator: GeneratorOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    database_url: DatabaseUrl = None,
    log_format: LogFormat = None,
    log_level: LogLevel = None,
) -> None:
    """Print what the generator writes for a project's next episode; store nothing."""
    settings = build_settings(
        generator=generator, database_url=database_url,
        log_format=log_format or "console", log_level=log_level,
    )

    async def main() -> Preview:
        prices = load_price_table(settings.pricing_file)
        plugin = load_generator(settings.generator, settings)
        async with database(settings) as conn:
            request = await build_preview_request(conn, project_id)
        return await run_preview(
            plugin, request, generator_name=settings.generator,
            timeout=settings.generation_timeout,
            max_episode_bytes=settings.max_episode_bytes, price=prices.cost,
        )

    preview = run_async(main)
    typer.echo(json.dumps(preview_to_json(preview), indent=2, ensure_ascii=False) if as_json
               else render_preview(preview))

