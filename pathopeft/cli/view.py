"""``pathopeft view``: serve heatmap exports to a local browser (127.0.0.1 by default)."""

from __future__ import annotations

import contextlib

import click


@click.command("view")
@click.argument("heatmaps_arg", metavar="[HEATMAPS]", required=False, type=click.Path(file_okay=False))
@click.option(
    "--heatmaps",
    "heatmaps_opt",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Folder written by `pathopeft heatmap` (or a parent of one folder per task).",
)
@click.option(
    "--slides",
    metavar="DIR",
    type=click.Path(),
    help="Folder searched (recursively) for each exported slide by its id (or a slide CSV with path "
    "and slide_id columns, as for `pathopeft tile`); the export's slide_path is the fallback. "
    "Needed once slides have moved since the export.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (keep it local).")
@click.option("--port", default=8765, show_default=True, type=int, help="0 picks a free port.")
@click.option(
    "--cache-mb",
    default=256.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Memory for encoded slide/heatmap tiles (MiB, least recently used evicted first).",
)
def view(
    heatmaps_arg: str | None,
    heatmaps_opt: str | None,
    slides: str | None,
    host: str,
    port: int,
    cache_mb: float,
) -> None:
    """Open heatmap exports in a browser viewer: `pathopeft view --slides DIR --heatmaps DIR`.

    The older form `pathopeft view HEATMAPS` (the folder as an argument) means `--heatmaps HEATMAPS`.
    Slides are looked up in --slides by id, else at the export's slide_path; one found nowhere is
    listed with the reason instead of stopping the server.
    """
    from werkzeug.serving import make_server

    from pathopeft.viewer.server import create_app

    if heatmaps_arg and heatmaps_opt:
        raise click.UsageError("give the heatmap folder once: as HEATMAPS or as --heatmaps, not both")
    heatmaps = heatmaps_opt or heatmaps_arg
    if not heatmaps:
        raise click.UsageError("missing the heatmap folder: pathopeft view --heatmaps DIR [--slides DIR]")
    try:
        app = create_app(heatmaps, slides=slides, cache_mb=cache_mb)
    except (FileNotFoundError, ValueError) as err:  # DiscoveryError (duplicate ids) is a ValueError
        raise click.UsageError(str(err)) from err
    for row in app.config["catalog"].listing():
        if row["error"]:
            click.echo(f"pathopeft view: {row['task']}/{row['slide_id']}: {row['error']}", err=True)
    server = make_server(host, port, app, threaded=True)
    click.echo(f"pathopeft view: http://{host}:{server.server_port}/", err=False)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
