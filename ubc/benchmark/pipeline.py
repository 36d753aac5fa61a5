"""End to end: ``ubc-infer``'s pipeline (load, preprocess, batch, infer, aggregate, write,
overlapped) over an archive of generated phantoms, in volumes per second."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ubc.benchmark.results import PipelineRow
from ubc.bundle import Bundle


def measure_pipeline(bundle: Bundle, archive: Path, shape: tuple[int, int, int], *,
                     backend: str, device: str) -> PipelineRow:
    """Score every volume of ``archive`` (generated, of ``shape``) with ``score_archive``
    as ``ubc-infer`` does, into a throw-away results file. The wall time is the pipeline's
    own (first volume read to last row written): loading the engine is not in it, nor its
    first call (one batch of zeros beforehand), which an archive pays once, not per volume
    (OpenVINO INT8 at batch 32: 0.47 s against 0.32 s for the calls after it)."""
    from ubc.engine import load
    from ubc.scoring import score_archive
    from ubc.scoring.packer import batch_size_for

    with tempfile.TemporaryDirectory(prefix="ubc-bench-pipeline-") as tmp:
        with load(bundle, backend=backend, device=device) as engine:
            size = bundle.preprocessing.size
            engine.infer(np.zeros((batch_size_for(engine.max_batch), 1, *size), np.float32))
            summary = score_archive(bundle, archive, Path(tmp) / "scores.csv", engine=engine,
                                    progress=False)
    wall = summary.wall_seconds
    return PipelineRow(cases=summary.scored, failed=summary.failed,
                       slices=summary.slices_scored, wall_seconds=round(wall, 3),
                       volumes_per_second=summary.scored / wall if wall > 0 else 0.0,
                       slices_per_second=summary.slices_per_second,
                       backend=f"{summary.backend} ({engine.artifact})",
                       precision=summary.precision, batch_size=summary.batch_size,
                       volume_shape=shape,
                       stage_seconds={k: round(v, 3) for k, v in summary.stage_seconds.items()})
