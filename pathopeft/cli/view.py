"""``pathopeft view``: serve heatmap exports to a local browser (127.0.0.1 by default)."""

from __future__ import annotations

import contextlib

import click


@click.command("view")
@click.argument("heatmaps", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (keep it local).")
@click.option("--port", default=8765, show_default=True, type=int, help="0 picks a free port.")
@click.option(
    "--cache-mb",
    default=256.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Memory for encoded slide/heatmap tiles (MiB, least recently used evicted first).",
)
def view(heatmaps: str, host: str, port: int, cache_mb: float) -> None:
    """Open the heatmap export folder HEATMAPS (or a parent of per-task folders) in a browser viewer."""
    from werkzeug.serving import make_server

    from pathopeft.viewer.server import create_app

    try:
        app = create_app(heatmaps, cache_mb=cache_mb)
    except (FileNotFoundError, ValueError) as err:
        raise click.UsageError(str(err)) from err
    server = make_server(host, port, app, threaded=True)
    click.echo(f"pathopeft view: http://{host}:{server.server_port}/", err=False)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
