"""The worker side of ``ubc-infer --ray`` (see ``ubc.scoring.ray_runner``): the load task,
the engine actor and the finish task, all built on the per-case steps of
``ubc.scoring.stages``, and how a case's state travels between them. Imports no Ray."""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ubc.bundle import Bundle
from ubc.io import Volume
from ubc.scoring.discover import Case
from ubc.scoring.stages import (
    CaseWork,
    RunContext,
    accumulate,
    batch_size_for,
    finish_case,
    load_case,
    prepare_case,
)

__all__ = ["EngineActor", "load_and_prepare", "finish", "TIMES"]


# --- what travels: a case's slices, its state with the volume's header only -----------------
def _dump(work: CaseWork, **extra: Any) -> bytes:
    """A case's state (``extra`` added) without its slices and with its volume's header only:
    the next stages need no voxels (the verdict and the mask's grid come from the header)."""
    state = dict(vars(work))
    del state["slices"]
    volume = state.pop("volume")
    header = None if volume is None else (
        tuple(volume.data.shape),
        {f.name: getattr(volume, f.name) for f in dataclasses.fields(volume) if f.name != "data"})
    return pickle.dumps(dict(state=state, header=header, **extra))


def _load(blob: bytes) -> tuple[CaseWork, dict[str, Any]]:
    """The inverse of ``_dump``: the case and the extra values."""
    meta = pickle.loads(blob)
    work = CaseWork(meta["state"]["case"])
    work.__dict__.update(meta.pop("state"))
    header = meta.pop("header")
    if header is not None:
        shape, fields = header
        voxels = np.broadcast_to(np.zeros((), np.uint8), shape)  # as prepare_case leaves it
        work.volume = Volume(data=voxels, **fields)
    return work, meta


def load_and_prepare(row: dict[str, Any], *, cases: list[Case],
                      context: RunContext) -> dict[str, Any]:
    """CPU task 1 (one case, ``row["index"]`` into ``cases``): its slices [S, 1, H, W] and
    its state. Never raises for a bad case (the steps turn failures into its error)."""
    index = int(row["index"])
    start = time.perf_counter()
    work, volume = load_case(cases[index])
    loaded = time.perf_counter()
    if volume is not None:
        prepare_case(work, volume, context)
    del volume
    slices = work.slices if work.slices is not None else \
        np.zeros((0, 1, *context.preprocessing.size), np.float32)
    return {"work": _dump(work, load_s=loaded - start, prep_s=time.perf_counter() - loaded),
            "slices": slices}


#: the seconds and counts each row carries to the driver (its RunSummary); ``actor_s``: the
#: actor's own work besides the engine (unpacking, packing batches, accumulating)
TIMES = ("load_s", "prep_s", "engine_s", "actor_s", "finish_s", "slices", "batch")


def finish(row: dict[str, Any], *, context: RunContext) -> dict[str, Any]:
    """CPU task 3 (one case): verdict, mask, overlay (``finish_case``, atomic writes) and the
    row as JSON, with the seconds of each stage."""
    work, meta = _load(row["work"])
    start = time.perf_counter()
    result = finish_case(work, dataclasses.replace(context, backend=meta["backend"],
                                                   precision=meta["precision"]))
    meta["finish_s"] = time.perf_counter() - start
    return {"row": json.dumps(result.to_row(), allow_nan=False),
            **{k: meta[k] for k in TIMES}}


# --- the engine actor ---------------------------------------------------------------------
class EngineActor:
    """One engine, loaded once per actor; ``__call__`` runs a Ray Data batch of prepared
    cases through it (their slices packed into engine batches) and accumulates each case's
    outputs; what leaves is each case's state with its accumulator (two floats per slice,
    plus float16 mask probabilities and images when masks or overlays are asked for)."""

    def __init__(self, bundle: str, backend: str, device: str, batch_size: int | None,
                 threads: int | None, context: RunContext) -> None:
        from ubc import engine as engines

        options: dict[str, Any] = {} if threads is None else {"threads": threads}
        self.engine = engines.load(Bundle(bundle), backend=backend, device=device, **options)
        self.context = dataclasses.replace(context, backend=self.engine.backend,
                                           precision=self.engine.precision)
        self.batch_size = batch_size_for(self.engine.max_batch, batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        items = [_load(blob) for blob in batch["work"]]
        works = [work for work, _ in items]
        for work, slices in zip(works, batch["slices"], strict=True):
            if work.error is None:
                work.slices = np.asarray(slices, np.float32).reshape(-1, 1, *slices.shape[-2:])
        slices, engine_s = self._infer(works)
        share = (time.perf_counter() - start - engine_s) / max(len(works), 1)
        blobs = [_dump(work, **meta, engine_s=engine_s * work.n_scored / max(slices, 1),
                       actor_s=share, slices=work.n_scored if work.error is None else 0,
                       batch=self.batch_size, backend=self.engine.backend,
                       precision=self.engine.precision)
                 for work, meta in items]
        return {"work": np.array(blobs, dtype=object)}

    def _batches(self, works: list[CaseWork]) -> Iterator[tuple[np.ndarray, list[Any]]]:
        """Engine batches packed from the cases' slices, with (case, batch row, case slice,
        count) for each run of rows, as the threaded pipeline packs them."""
        size = self.context.preprocessing.size
        pending = np.empty((self.batch_size, 1, *size), np.float32)
        fill, segments = 0, []
        for work in works:
            position = 0
            while work.error is None and work.slices is not None and position < work.n_scored:
                take = min(self.batch_size - fill, work.n_scored - position)
                pending[fill:fill + take] = work.slices[position:position + take]
                segments.append((work, fill, position, take))
                fill, position = fill + take, position + take
                if fill == self.batch_size:
                    yield pending, segments
                    pending, fill, segments = np.empty_like(pending), 0, []
            work.slices = None
        if fill:
            yield pending[:fill], segments

    def _infer(self, works: list[CaseWork]) -> tuple[int, float]:
        """Run the engine on every scored slice and accumulate per case; returns (slices,
        engine seconds)."""
        scored, engine_s = 0, 0.0
        for array, segments in self._batches(works):
            started = time.perf_counter()
            try:
                class_logits, mask_logits = self.engine.infer(array)
            except Exception as exc:  # the cases of this batch fail, the others go on
                for work, *_ in segments:
                    work.fail("inference", exc)
                continue
            seconds = time.perf_counter() - started
            share, engine_s, scored = seconds / len(array), engine_s + seconds, \
                scored + len(array)
            for work, row, position, count in segments:
                work.seconds += share * count
                if work.error is not None:
                    continue
                try:
                    accumulate(work, position, class_logits[row:row + count],
                               mask_logits[row:row + count], array[row:row + count, 0],
                               self.context)
                except Exception as exc:
                    work.fail("aggregate", exc)
        return scored, engine_s
