"""``run_tile``: the whole ``pathopeft tile`` stage — discover, shard across ranks, process, manifest.

One process per device (plain torch for one, Lightning Fabric for several); rank ``r`` of ``W``
processes slides ``r::W`` and writes their outputs itself (atomically); rank 0 merges every rank's
rows (from their journals on disk, not a collective) into ``manifest.csv``, with the rows of
earlier runs — and of other runs writing into the same folder at the same time — for slides this
run did not touch. The outputs are the same whatever the number of devices.

Several runs into one folder (:mod:`pathopeft.features.runstate`): a slide is worked on by one
process at a time (a run skips slides another holds and comes back to them at the end, when they
are usually complete and reused); partial files are removed only when their writer is gone.

Interruptions: ``manifest.csv`` is kept up to date while slides finish
(:class:`~pathopeft.features.manifest.LiveManifest`), so a run stopped by Ctrl-C, SIGTERM (a
cancelled or pre-empted job; turned into ``KeyboardInterrupt`` here so that clean-up runs) or
even SIGKILL leaves rows for the slides it finished (SIGKILL: in its journal, which the next run
merges) and no temporary files (SIGKILL can leave some; the next run removes them). The rerun
skips those slides (complete, fingerprinted outputs) and redoes the one that was cut off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from pathopeft.config import ConfigError
from pathopeft.config.tile import TileConfig
from pathopeft.features.manifest import LiveManifest, SlideRecord
from pathopeft.features.processor import OutputLayout, SlideProcessor, safe_slide_id
from pathopeft.features.runstate import RunState
from pathopeft.features.runtime import Runtime, auto_workers, make_runtime

if TYPE_CHECKING:  # torch, timm and the encoder are imported only when features are computed
    from pathopeft.features.backbones import Backbone

__all__ = ["TileSummary", "run_tile"]

log = logging.getLogger(__name__)

_LISTED = 20  # failed/empty slides listed in the summary (all are in the manifest)


@dataclass
class TileSummary:
    """What a run did (all ranks' slides), for the end-of-run report and the exit status."""

    records: list[SlideRecord]
    seconds: float
    out_dir: Path
    world_size: int = 1
    rank: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.counts = Counter(r.status for r in self.records)

    @property
    def n_tiles(self) -> int:
        return sum(r.n_tiles for r in self.records if r.status == "ok")

    @property
    def n_reused(self) -> int:
        return sum(r.reused for r in self.records)

    def exit_code(self, strict: bool = False) -> int:
        """0 success (some failed slides are fine), 1 when every slide failed or --strict and any did."""
        errors = self.counts["error"]
        if self.records and errors == len(self.records):
            return 1
        return 1 if strict and errors else 0

    def describe(self) -> str:
        c = self.counts
        lines = [
            f"{len(self.records)} slide(s) in {self.seconds:.1f} s: {c['ok']} ok ({self.n_reused} reused), "
            f"{c['empty']} empty, {c['error']} error; {self.n_tiles} tiles -> {self.out_dir}",
        ]
        failed = [r for r in self.records if r.status != "ok"]
        for rec in failed[:_LISTED]:
            lines.append(f"  {rec.status:5s} {rec.slide_id}: {rec.error}")
        if len(failed) > _LISTED:
            lines.append(f"  ... and {len(failed) - _LISTED} more (see {self.out_dir / 'manifest.csv'})")
        return "\n".join(lines)


def run_tile(inputs: Sequence[str | Path], config: TileConfig) -> TileSummary:
    """Tile (and encode) every slide found in ``inputs`` (folders, files, CSVs) per ``config``."""
    with _sigterm_as_interrupt():
        return _run_tile(inputs, config)


def _run_tile(inputs: Sequence[str | Path], config: TileConfig) -> TileSummary:
    start = time.perf_counter()
    run = config.run
    # usage problems (devices, inputs) and the encoder fail fast, before any process is spawned
    runtime = make_runtime(
        run.accelerator, run.devices, run.num_nodes, run.strategy, run.precision,
        device_needed=config.features.enabled,
    )  # fmt: skip
    sources = discover(inputs)
    backbone = _build_backbone(config) if config.features.enabled else None
    runtime.launch()
    if runtime.world_size > 1 and runtime.device.type == "cpu":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // run.devices))

    name = None
    if backbone is not None:
        from pathopeft.features.backbones import backbone_dirname

        name = config.features.name or backbone_dirname(config.features.backbone)
    layout = OutputLayout(Path(config.output.dir), name)
    with RunState(layout.root) as state:
        # one collective, at the start (every rank arrives within seconds): the run's identity
        run_id, leader = runtime.broadcast((uuid.uuid4().hex[:12], state.tag))
        manifest = LiveManifest(
            layout.manifest, rank=runtime.rank, world_size=runtime.world_size, run_id=run_id,
            leader=leader, state=state,
        )  # fmt: skip
        manifest.open()
        if runtime.is_zero:
            removed = state.remove_stale_partials()
            if removed:
                log.info("removed %d partial file(s) left by a stopped run in %s", removed, layout.root)
            manifest.start()
        runtime.barrier("tile-setup")
        mine = runtime.shard(sources)
        records = _run_shard(config, layout, backbone, runtime, state, manifest, mine)
        # no collective at the end: rank 0 waits for the ranks' journals on disk, however long
        gathered = manifest.finish()
    order = {s.slide_id: i for i, s in enumerate(sources)}
    gathered = gathered if runtime.is_zero else records
    gathered.sort(key=lambda r: order.get(r.slide_id, len(order)))
    return TileSummary(gathered, time.perf_counter() - start, layout.root, runtime.world_size, runtime.rank)


def _run_shard(
    config: TileConfig,
    layout: OutputLayout,
    backbone: Backbone | None,
    runtime: Runtime,
    state: RunState,
    manifest: LiveManifest,
    mine: list[Any],
) -> list[SlideRecord]:
    """This rank's slides, each under its claim; stopped early, the finished rows are kept."""
    extractor = None
    if backbone is not None:
        from pathopeft.features.extract import FeatureExtractor

        workers = config.features.num_workers
        if workers is None:
            workers = auto_workers(config.run.devices)
            log.info("reading tiles with %d worker process(es) per device (features.num_workers)", workers)
        extractor = FeatureExtractor(
            backbone,
            device=runtime.device,
            autocast=runtime.autocast,
            precision=runtime.precision,
            batch_size=config.features.batch_size,
            num_workers=workers,
            resize_to=config.features.resize_to,
        )
    processor = SlideProcessor(config, layout, extractor)
    show = config.output.progress and runtime.is_zero
    try:
        return _process_all(
            processor, mine, show=show, rank=runtime, on_record=manifest.add, claim=state.claim
        )
    except BaseException as exc:
        # stopped early (Ctrl-C, SIGTERM, a bug): keep the rows of the finished slides; a failing
        # merge (disk full) must not hide why the run stopped
        with contextlib.suppress(Exception):
            manifest.abort()
        if isinstance(exc, KeyboardInterrupt):
            log.warning(
                "interrupted%s after %d of %d slide(s); the finished ones are in %s. "
                "Run the same command again to continue (finished slides are skipped).",
                "" if runtime.world_size == 1 else f" (rank {runtime.rank})",
                manifest.added,
                len(mine),
                layout.manifest,
            )
        raise
    finally:
        manifest.close()
        if extractor is not None:
            extractor.close()  # stop the tile-reading workers


def discover(inputs: Sequence[str | Path]) -> list[Any]:
    """Slide sources from folders / files / CSVs (``pathopeft.wsi.discover_slides``).

    Bad inputs (a missing folder, a CSV without 'path', duplicate slide ids) are a
    :class:`~pathopeft.config.ConfigError` (exit 2); a missing file listed in a CSV is not: it
    becomes that slide's ``error`` row.
    """
    from pathopeft.wsi import discover_slides

    if not inputs:
        raise ConfigError("no SLIDES given: pass a folder, slide files, or a CSV with a 'path' column")
    sources = list(discover_slides(list(inputs)))
    if not sources:
        raise ConfigError(f"no slides found in {', '.join(str(p) for p in inputs)}")
    return sources


def _build_backbone(config: TileConfig) -> Backbone:
    from pathopeft.features.backbones import build_backbone

    f = config.features
    return build_backbone(
        f.backbone, pretrained=f.pretrained, weights=f.weights, seed=f.seed, model_kwargs=f.model_kwargs,
        mean=f.mean, std=f.std, interpolation=f.interpolation,
    )  # fmt: skip


def _process_all(
    processor: SlideProcessor,
    sources: list[Any],
    *,
    show: bool,
    rank: Runtime,
    on_record: Callable[[SlideRecord], None] | None = None,
    claim: Callable[..., contextlib.AbstractContextManager[bool]] | None = None,
) -> list[SlideRecord]:
    """Process this rank's slides under a progress bar (tiles/s in the postfix); ``on_record`` sees
    each slide's row as soon as it is finished. With ``claim`` (:meth:`RunState.claim`) a slide
    another process holds is skipped and done at the end, after that process lets go of it."""
    desc = "tile" if rank.world_size == 1 else f"tile [rank 0/{rank.world_size}]"
    bar = tqdm(total=len(sources), desc=desc, unit="slide", disable=not show, dynamic_ncols=True)
    started = time.perf_counter()
    tiles = 0
    status: Counter[str] = Counter()
    last_refresh = started

    def on_tiles(n: int) -> None:
        nonlocal tiles, last_refresh
        tiles += n
        now = time.perf_counter()
        refresh = now - last_refresh >= 1.0  # show progress inside long slides, at most once a second
        if refresh:
            last_refresh = now
        bar.set_postfix(_postfix(tiles, started, status), refresh=refresh)

    def one(source: Any) -> SlideRecord:
        nonlocal tiles
        bar.set_description_str(f"{desc} {source.slide_id}"[:60], refresh=False)
        rec = processor.process(source, on_tiles=on_tiles)
        if processor.extractor is None and not rec.reused:
            tiles += rec.n_tiles  # tiling only: tiles gridded per second
        status[rec.status] += 1
        if on_record is not None:
            on_record(rec)
        bar.set_postfix(_postfix(tiles, started, status), refresh=False)
        bar.update(1)
        return rec

    done: dict[str, SlideRecord] = {}
    held: list[Any] = []  # slides another process is working on: done last, once it lets go
    try:
        for source in sources:
            if claim is None or not safe_slide_id(source.slide_id):
                done[source.slide_id] = one(source)
                continue
            with claim(source.slide_id, wait=False) as mine:
                if mine:
                    done[source.slide_id] = one(source)
                else:
                    held.append(source)
        for source in held:
            log.info("%s: another run is working on it; waiting for it", source.slide_id)
            with claim(source.slide_id, wait=True):
                done[source.slide_id] = one(source)  # usually complete by now: reused
    finally:
        bar.close()
    return [done[s.slide_id] for s in sources if s.slide_id in done]


def _postfix(tiles: int, started: float, status: Counter[str]) -> dict[str, str]:
    elapsed = max(time.perf_counter() - started, 1e-9)
    return {
        "tiles/s": f"{tiles / elapsed:.0f}",
        "ok": str(status["ok"]),
        "empty": str(status["empty"]),
        "error": str(status["error"]),
    }


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``kill``, a cancelled or pre-empted batch job) into ``KeyboardInterrupt``.

    Python's default for SIGTERM ends the process at once, skipping ``finally`` blocks: no manifest
    flush, temporary files left behind. Only installed from the main thread and only over the
    default handler (an application's own handler is left alone).
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
