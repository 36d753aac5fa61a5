"""``score_archive_ray``: the batch job of ``score_archive`` on a Ray cluster (``ubc-infer
--ray``), built on Ray Data. Same inputs, same rows, same results file, same resume.

    driver:       discover + plan_resume (``plan_run``)   -> the cases to score
    load tasks    (1 CPU each) load_case + prepare_case   -> per case: its scored slices
                  float32 [S, 1, H, W] + its state with the volume's header only
    engine actors (``map_batches`` with a callable class; a pool of (min, max) ``actors``,
                  ``num_gpus=1`` each where the cluster has GPUs, else ``actor_cpus`` CPUs):
                  the call's slices packed into engine batches -> accumulate per case
                                                          -> per case: its accumulator
    finish tasks  (1 CPU each) finish_case: verdict, mask + overlay written atomically by
                  the worker                              -> one JSON row per case
    driver:       append each row as it arrives (``recording``, ``ubc.scoring.writers``)

What crosses the object store, per case: its slices once (load task -> actor, S x H x W x 4
bytes: about 25 MB for a BraTS volume at 224 x 224, read zero-copy by an actor on the same
node); its accumulator (actor -> finish task: 16 bytes per slice, plus 2 bytes per pixel of
float16 mask probabilities with masks and 2 more with overlays: about 12 or 24 MB); its row
(about 1 kB) to the driver. The voxels and the engine's raw outputs never travel. Mask
resampling and gzip run in finish tasks, not in the actor, so that an accelerator's actor
is not held up by them. Bounded in-flight work: Ray Data's streaming executor admits new
tasks only while the operators' outputs fit their share of the object-store budget
(``object_store_mb``; default Ray Data's share of the object store, itself ``ray start
--object-store-memory``), and at most 2 calls wait at each actor; what is in flight depends
on that budget, never on the archive's size. Rows reach the driver about one actor call
after they are computed.

Failures: a bad case is an ``error`` row (the per-case steps catch everything). A dead
worker or actor (killed process, lost node) has its task retried by Ray: load tasks up to
``max_retries`` times, actors restarted without limit and their calls retried up to
``max_task_retries`` times. A call that still fails (e.g. one case that kills the process
every time) gives error rows for its cases (``max_errored_blocks`` is unlimited) instead of
stopping the run. A killed driver resumes from the results file. The driver appends a case
at most once per run.

Every node must see the bundle, the archive and the output folders at the same paths
(shared storage) and have ``ubc[ray]`` installed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ubc.bundle import Bundle
from ubc.quiet import ignoring_log, ignoring_stderr
from ubc.scoring.archive import (
    RunPlan,
    RunSummary,
    count_rows,
    output_spec,
    plan_run,
    recording,
    write_run_outputs,
)
from ubc.scoring.discover import Case
from ubc.scoring.options import ScoringOptions
from ubc.scoring.outputs import OutputSpec
from ubc.scoring.pipeline import STAGES
from ubc.scoring.ray_tasks import EngineActor, finish, load_and_prepare
from ubc.scoring.result import ERROR, CaseResult
from ubc.scoring.stages import RunContext

__all__ = ["RayOptions", "score_archive_ray", "parse_actors"]

_INSTALL_HINT = "Ray is not installed: pip install ubc[ray]"


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray.

    - ``address``: ``auto`` (the running cluster, else a new local one), ``local`` (a new
      local instance) or a cluster's address (``HOST:6379``, ``ray://HOST:10001``). When
      Ray is already initialised in this process, that connection is used.
    - ``actors``: (min, max) engine actors (None: 1 .. the cluster's GPUs, or on a CPU-only
      cluster 1 .. CPUs - 1 actors of ``actor_cpus`` CPUs).
    - ``cases_per_call``: cases per actor call (their slices share engine batches).
    - ``load_tasks``: most load + preprocess tasks at once (None: as the CPUs allow).
    - ``engine_threads``: intra-op threads of a CPU engine (None: ``actor_cpus``).
    - ``object_store_mb``: Ray Data's object-store budget for this run (None: its default).
    - ``max_retries`` / ``max_task_retries``: Ray's retries of a load task / an actor call
      whose process died.
    """

    address: str = "auto"
    actors: tuple[int, int] | None = None
    cases_per_call: int = 2
    load_tasks: int | None = None
    actor_cpus: float = 1.0
    engine_threads: int | None = None
    object_store_mb: int | None = None
    max_retries: int = 3
    max_task_retries: int = 3

    def __post_init__(self) -> None:
        if self.actors is not None:
            low, high = self.actors
            if not 1 <= low <= high:
                raise ValueError(f"actors must be MIN,MAX with 1 <= MIN <= MAX, got "
                                 f"{low},{high}")
        for name in ("cases_per_call", "load_tasks", "engine_threads", "object_store_mb"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.actor_cpus <= 0:
            raise ValueError(f"actor_cpus must be > 0, got {self.actor_cpus}")


def parse_actors(text: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2), ``"1,4"`` -> (1, 4); ValueError otherwise."""
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not 1 <= values[0] <= values[-1]:
        raise ValueError(f"--actors takes N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return values[0], values[-1]


# --- the driver ---------------------------------------------------------------------------
def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError(_INSTALL_HINT) from exc
    return ray


def _connect(ray: Any, address: str) -> bool:
    """Initialise Ray unless it already is; True when this call did (and must shut down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                  configure_logging=True, logging_level=logging.WARNING)
    # A local instance started here says that it turned token authentication on: it is
    # this run's own cluster, gone at its end (the warning that it is off still shows).
    with ignoring_log("ray._private.authentication.authentication_token_setup",
                      "Token authentication is enabled"):
        if address == "local":
            ray.init(address="local", **kwargs)
        elif address == "auto":
            ray.init(**kwargs)  # the running cluster (RAY_ADDRESS or this machine's), else local
        else:
            ray.init(address=address, **kwargs)
    return True


def _actor_plan(ray: Any, device: str, options: RayOptions) \
        -> tuple[tuple[int, int], dict[str, Any], int | None]:
    """((min, max) actors, their resources, CPU engine threads or None on GPUs)."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if device.startswith("cuda") and gpus < 1:
        raise ValueError(f"--device {device}: the Ray cluster has no GPU")
    if gpus >= 1 and device != "cpu":
        return options.actors or (1, gpus), {"num_gpus": 1, "num_cpus": options.actor_cpus}, \
            None
    actors = options.actors or (1, max(1, int((cpus - 1) // options.actor_cpus)))
    threads = options.engine_threads or max(1, int(options.actor_cpus))
    return actors, {"num_cpus": options.actor_cpus}, threads


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    """For the time of one run: Ray Data's log lines off (the CLI has its own progress bar
    and summary), and two kinds of its deprecation warnings ignored. Ray 2.60 warns about
    its own internals (``DataContext`` copies), and flags the remote-args retries as
    deprecated (to go in 2.64) while offering no named parameter for them yet; without them
    Ray Data retries forever, so one case that kills its worker every time would stall the
    run. The driver's core worker logs an error line for each engine actor because Ray Data
    keeps the actors' constructor in the object store while we let them restart (a killed
    actor must come back): ray-project/ray#53727, nothing for the user to do."""
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # its per-run INFO lines and "progress bars disabled"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning,
                                    module=r"ray(\.|$)")
            warnings.filterwarnings("ignore", category=DeprecationWarning,
                                    message=r".*ray_remote_args.*")
            with ignoring_stderr(r"core_worker\.cc:\d+: Actor with class name: .* has "
                                 "constructor arguments in the object store"):
                yield
    finally:
        data_logger.setLevel(level)


def _dataset(ray: Any, plan: RunPlan, context: RunContext, options: RayOptions,
             actor: dict[str, Any]) -> Any:
    """The lazy Ray Data pipeline: case indices -> load tasks -> engine actors -> finish
    tasks -> rows (to be built and run within ``_quiet_ray``)."""
    data = ray.data
    (low, high), resources, threads = actor["actors"], actor["resources"], actor["threads"]
    items = [{"index": i} for i in range(len(plan.todo))]
    ds = data.from_items(items, override_num_blocks=max(1, min(len(items), 10_000)))
    ds.context.max_errored_blocks = -1  # a call that keeps killing its actor: error rows
    ds.context.enable_progress_bars = False
    if options.object_store_mb is not None:
        ds.context.execution_options.resource_limits = \
            ds.context.execution_options.resource_limits.copy(
                object_store_memory=options.object_store_mb * 2 ** 20)
    ds = ds.map(load_and_prepare, fn_kwargs=dict(cases=plan.todo, context=context),
                num_cpus=1, max_retries=options.max_retries,
                compute=data.TaskPoolStrategy(size=options.load_tasks)
                if options.load_tasks else None)
    ds = ds.map_batches(
        EngineActor, batch_size=options.cases_per_call, batch_format="numpy",
        fn_constructor_kwargs=dict(bundle=str(plan.bundle.path), backend=actor["backend"],
                                   device=actor["device"], batch_size=actor["batch_size"],
                                   threads=threads, context=context, outputs=plan.outputs),
        compute=data.ActorPoolStrategy(min_size=low, max_size=high,
                                       max_tasks_in_flight_per_actor=2),
        max_restarts=-1, max_task_retries=options.max_task_retries, **resources)
    return ds.map(finish, fn_kwargs=dict(context=context), num_cpus=1,
                  max_retries=options.max_retries)


def _lost_row(case: Case, context: RunContext) -> CaseResult:
    """The row of a case whose actor call failed even after Ray's retries."""
    size, mtime, digest = case.reader.identity()
    return CaseResult(case_id=case.case_id, path=str(case.image), status=ERROR,
                      error="the Ray worker scoring this case died on every retry (out of "
                      "memory, or a crash in native code); re-run with --retry-errors",
                      model=context.model, bundle_sha256=context.bundle_sha256,
                      trained_on=context.trained_on, input_bytes=size, input_mtime_ns=mtime,
                      input_digest=digest)


#: RunSummary stages <- the rows' seconds; "batch" is the actor's own work besides the engine
#: (unpacking, packing engine batches, accumulating), "aggregate" the finish tasks'
_STAGE_COLUMNS = (("load", "load_s"), ("preprocess", "prep_s"), ("batch", "actor_s"),
                  ("engine", "engine_s"), ("aggregate", "finish_s"))


def _stream(ds: Any, plan: RunPlan, record: Callable[[CaseResult], None],
            context: RunContext) -> tuple[dict[str, float], int, int, CaseResult | None]:
    """Record each row as its block reaches the driver, once per case; the cases that
    never came back get an error row. Returns (seconds per stage, slices, engine batch
    size, a row of an actor's engine or None)."""
    stages, slices, batch_size, sample = dict.fromkeys(STAGES, 0.0), 0.0, 0, None
    pending = {c.case_id: c for c in plan.todo}
    for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        for i, text in enumerate(block["row"]):
            result = CaseResult.from_row(json.loads(str(text)))
            if pending.pop(result.case_id, None) is None:
                continue  # a retried call delivered twice: the first row stands
            written = time.perf_counter()
            record(result)
            stages["write"] += time.perf_counter() - written
            for stage, column in _STAGE_COLUMNS:
                stages[stage] += float(block[column][i])
            slices += float(block["slices"][i])
            batch_size = int(block["batch"][i])
            sample = sample if sample is not None or result.backend is None else result
    for case in pending.values():
        record(_lost_row(case, context))
    return stages, round(slices), batch_size, sample


def _run(plan: RunPlan, context: RunContext, record: Callable[[CaseResult], None],
         backend: str, device: str, options: ScoringOptions, ray_options: RayOptions) \
        -> tuple[dict[str, float], int, int, CaseResult | None]:
    """Connect, run the dataset and stream its rows into ``record`` (see ``_stream``)."""
    from ubc.scoring.pipeline import PipelineError

    ray = _ray()
    owned = _connect(ray, ray_options.address)
    try:
        actors, resources, threads = _actor_plan(ray, device, ray_options)
        actor = dict(actors=actors, resources=resources, threads=threads, backend=backend,
                     device="cuda" if "num_gpus" in resources and device == "auto" else device,
                     batch_size=options.batch_size)
        with _quiet_ray():
            return _stream(_dataset(ray, plan, context, ray_options, actor), plan, record,
                           context)
    except ray.exceptions.RayError as exc:  # not one case's failure (those are error rows)
        raise PipelineError(f"the Ray job stopped ({type(exc).__name__}: {exc})") from exc
    finally:
        if owned:
            ray.shutdown()


def score_archive_ray(bundle: str | os.PathLike[str] | Bundle, source: str | os.PathLike[str],
                      out: str | os.PathLike[str] | OutputSpec, *,
                      masks: str | os.PathLike[str] | None = None,
                      overlays: str | os.PathLike[str] | None = None,
                      dicom_seg: str | os.PathLike[str] | None = None, backend: str = "auto",
                      device: str = "auto", pattern: str | None = None,
                      limit: int | None = None, options: ScoringOptions | None = None,
                      ray_options: RayOptions | None = None, progress: bool = False,
                      on_result: Callable[[CaseResult], None] | None = None,
                      part: tuple[int, int] | None = None) -> RunSummary:
    """``score_archive`` on Ray (see the module docstring): the same arguments, rows,
    results file and resume; ``ray_options`` says where and how wide. Raises
    ``PipelineError`` when the Ray job itself fails (the rows written so far stay valid)."""
    options = options or ScoringOptions()
    ray_options = ray_options or RayOptions()
    if backend != "auto":
        from ubc.engine import backend_class

        backend_class(backend)  # an unknown name is a usage error here, not in an actor
    outputs = output_spec(out, masks=masks, overlays=overlays, dicom_seg=dicom_seg)
    plan = plan_run(bundle, source, outputs, pattern=pattern, limit=limit, options=options,
                    part=part)
    # the actors replace backend and precision by their engine's (see EngineActor)
    context = RunContext.create(plan.bundle, backend, "?", options.case)
    counts = count_rows(plan.done)
    started = time.perf_counter()
    stages, slices, batch_size, sample = dict.fromkeys(STAGES, 0.0), 0, 0, None
    with recording(plan, counts, progress, on_result) as record:
        if plan.todo:  # (with nothing left to do, Ray is not even started)
            stages, slices, batch_size, sample = _run(plan, context, record, backend, device,
                                                      options, ray_options)
    write_run_outputs(plan, time.perf_counter() - started)
    return RunSummary(out=plan.results.path, cases=len(plan.cases), scored=len(plan.todo),
                      skipped=len(plan.done), counts=dict(counts),
                      wall_seconds=time.perf_counter() - started, stage_seconds=stages,
                      slices_scored=slices, peak_in_flight=0,
                      backend=sample.backend or backend if sample else backend,
                      precision=sample.precision or "?" if sample else "?",
                      batch_size=batch_size or options.batch_size or 0,
                      skipped_files=tuple(plan.skipped))
