"""Flask app: slide list, viewer page, DeepZoom slide/heatmap tiles, regions. Ids only, never paths."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import NoReturn

import openslide
from flask import Flask, Response, abort, jsonify, make_response, request, send_from_directory

from pathopeft.viewer.catalog import Catalog, NoTileScores
from pathopeft.viewer.tiles import SlideTiler, TileCache

STATIC = Path(__file__).parent / "static"


def create_app(root: str | Path, *, slides: str | Path | None = None, cache_mb: float = 256) -> Flask:
    """Build the viewer app over the export folder(s) under ``root``; tiles cached up to ``cache_mb`` MiB.

    ``slides``: a folder where each exported slide is looked up by id (see :class:`Catalog`).
    """
    catalog = Catalog(root, slides)
    cache = TileCache(int(cache_mb * 2**20))
    tilers: dict[str, SlideTiler] = {}
    tilers_lock = threading.Lock()
    app = Flask(__name__, static_folder=None)
    app.config["catalog"] = catalog
    app.config["cache"] = cache

    def fail(status: int, message: str) -> NoReturn:
        """Stop with a JSON ``{"error": message}`` the page can show (not an HTML error page)."""
        abort(make_response(jsonify({"error": message}), status))

    def tiler(task: str, slide_id: str) -> SlideTiler:
        entry = catalog.get(task, slide_id)
        if entry is None:
            abort(404)
        if entry.error:  # listed (its export is there) but its slide file was found nowhere
            fail(404, entry.error)
        with tilers_lock:
            if entry.key not in tilers:
                try:
                    tilers[entry.key] = SlideTiler(entry)
                except (OSError, openslide.OpenSlideError, ValueError) as err:
                    fail(500, f"{entry.key}: cannot open {entry.slide_path}: {err}")
            return tilers[entry.key]

    def checked_level(t: SlideTiler, level: int, col: int, row: int) -> None:
        if not 0 <= level < t.dz.level_count:
            abort(404)
        cols, rows = t.dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            abort(404)

    @app.get("/")
    def index() -> Response:
        return send_from_directory(STATIC, "index.html")

    @app.get("/static/<path:name>")
    def static_file(name: str) -> Response:
        return send_from_directory(STATIC, name)  # werkzeug's safe_join: traversal -> 404

    @app.get("/api/slides")
    def slides() -> Response:
        return jsonify(catalog.listing())

    @app.get("/api/<task>/<slide_id>/info")
    def info(task: str, slide_id: str) -> Response:
        return jsonify(tiler(task, slide_id).info())

    @app.get("/api/<task>/<slide_id>/slide.dzi")
    def dzi(task: str, slide_id: str) -> Response:
        return Response(tiler(task, slide_id).dzi(), mimetype="application/xml")

    def cached_tile(task: str, slide_id: str, level: int, col: int, row: int, layer: str) -> bytes:
        """A slide ("s") or heatmap ("h") tile, through the byte-bounded cache."""
        t = tiler(task, slide_id)
        checked_level(t, level, col, row)
        make = t.slide_tile if layer == "s" else t.heatmap_tile
        return cache.get_or_make((layer, t.entry.key, level, col, row), lambda: make(level, col, row))

    @app.get("/api/<task>/<slide_id>/slide_files/<int:level>/<int:col>_<int:row>.jpeg")
    def slide_tile(task: str, slide_id: str, level: int, col: int, row: int) -> Response:
        return Response(cached_tile(task, slide_id, level, col, row, "s"), mimetype="image/jpeg")

    @app.get("/api/<task>/<slide_id>/heatmap_files/<int:level>/<int:col>_<int:row>.png")
    def heat_tile(task: str, slide_id: str, level: int, col: int, row: int) -> Response:
        return Response(cached_tile(task, slide_id, level, col, row, "h"), mimetype="image/png")

    @app.get("/api/<task>/<slide_id>/regions")
    def regions(task: str, slide_id: str) -> Response | tuple[Response, int]:
        """The exported GeoJSON's region annotations, as written (cut at the export threshold)."""
        entry = tiler(task, slide_id).entry
        try:
            return jsonify(entry.exported_regions())
        except ValueError as err:  # a broken export file: say which, do not draw nothing silently
            return jsonify({"error": str(err)}), 500

    @app.get("/api/<task>/<slide_id>/above")
    def above(task: str, slide_id: str) -> Response:
        """Outline of the scored tiles at or above ``?threshold=`` (the slider's overlay)."""
        t = tiler(task, slide_id)
        try:
            thr = float(request.args.get("threshold", t.info()["threshold"]))
        except ValueError:
            abort(400)
        try:
            return jsonify(t.above(thr))
        except NoTileScores as err:
            fail(409, str(err))

    @app.get("/api/<task>/<slide_id>/score")
    def score(task: str, slide_id: str) -> Response:
        t = tiler(task, slide_id)
        try:
            x, y = float(request.args["x"]), float(request.args["y"])
        except (KeyError, ValueError):
            abort(400)
        return jsonify({"score": t.score_at(x, y)})

    return app
