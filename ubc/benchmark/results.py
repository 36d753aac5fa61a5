"""What ``ubc-bench`` measures, as frozen dataclasses, and their JSON form (schema
``ubc-bench/2``, checked by ``validate``). The renderers (``ubc.benchmark.report``) read the
JSON form, so a saved file renders exactly like a live run.

A row's parity is a ``ubc.parity.ParityResult`` (in JSON, the form meta.json records); the
row that *is* the parity reference (eager fp32 on the CPU) carries zero deltas and
``extra["reference"]``. ``validate`` reads the schema off the dataclasses themselves.
Version 2 (this one): parity as ParityResult, ``informational`` rows.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ubc.benchmark.timing import Stats
from ubc.parity import ParityResult

SCHEMA = "ubc-bench/2"


@dataclass(frozen=True)
class EngineRow:
    """One backend x precision x batch size. ``throughput``: slices/s at the median
    latency; ``speedup``: throughput over the baseline's (eager PyTorch fp32, same device,
    same batch); ``host_peak_mib``: the process's peak resident set up to the end of this
    batch size (the backend's own process unless run in-process; ``host_base_mib``: its
    resident set before the engine was loaded); ``load_average``: the machine's
    1/5/15-minute load when this batch size started; ``cores_used`` and
    ``preemptions_per_call`` say how much CPU the process actually got (see
    ``ubc.benchmark.timing.Measurement``): on a shared machine, read them before the speed.
    ``parity``: against eager fp32 on the CPU (see the module doc). ``informational``: not an
    artifact ``backend="auto"`` could pick: its parity failing is shown, not fatal."""

    variant: str
    backend: str
    artifact: str
    device: str
    precision: str
    batch: int
    latency: Stats
    throughput: float
    host_peak_mib: float
    host_base_mib: float
    load_seconds: float
    warmup: int
    buffers: int
    threads: int | None = None
    device_latency: Stats | None = None
    device_peak_mib: float | None = None
    parity: ParityResult | None = None
    informational: bool = False
    speedup: float | None = None
    baseline: bool = False
    isolated: bool = False
    load_average: tuple[float, ...] = ()
    calls_per_batch: int = 1  # > 1: the engine's max_batch split the batch
    cores_used: float | None = None  # process CPU time / wall time while timed
    preemptions_per_call: float | None = None  # involuntary context switches per call
    samples_ms: tuple[float, ...] = ()  # every timed call, in order (wall clock)
    device_samples_ms: tuple[float, ...] = ()  # the same calls seen by CUDA events
    rounds: int = 1  # > 1: the samples of that many interleaved rounds (``merged``)

    @property
    def label(self) -> str:
        return f"{self.variant} {self.precision}"

    @classmethod
    def merged(cls, rounds: list[EngineRow]) -> EngineRow:
        """One row from the same cell and batch timed in several rounds: statistics over
        all samples, the peak memory of the worst round, the CPU share averaged over the
        calls, the parity of the round that checked it."""
        first = rounds[0]
        samples = tuple(x for r in rounds for x in r.samples_ms)
        device = tuple(x for r in rounds for x in r.device_samples_ms)
        latency = Stats.of(samples)
        calls = [r.latency.n for r in rounds]

        def mean(values: list[float | None]) -> float | None:
            if any(v is None for v in values):
                return None
            return round(sum(v * n for v, n in zip(values, calls, strict=True))  # type: ignore
                         / sum(calls), 2)

        peaks = [r.device_peak_mib for r in rounds if r.device_peak_mib is not None]
        return replace(
            first, latency=latency, throughput=first.batch * 1e3 / latency.p50,
            samples_ms=samples, device_samples_ms=device,
            device_latency=Stats.of(device) if device else None,
            host_peak_mib=max(r.host_peak_mib for r in rounds),
            device_peak_mib=max(peaks) if peaks else None,
            load_seconds=round(sum(r.load_seconds for r in rounds) / len(rounds), 3),
            parity=next((r.parity for r in rounds if r.parity is not None), None),
            cores_used=mean([r.cores_used for r in rounds]),
            preemptions_per_call=mean([r.preemptions_per_call for r in rounds]),
            rounds=len(rounds))


@dataclass(frozen=True)
class Unavailable:
    """Something that was not measured, and why. ``failed``: it should have run here but
    raised or crashed (the reason holds the error); otherwise the machine, the installed
    packages or the bundle cannot run it (the reason says what to install or export).
    ``informational``: as in ``EngineRow`` (a failure of it is not fatal)."""

    stage: str  # "engine" | "preprocessing" | "pipeline"
    name: str
    reason: str
    device: str = ""
    precision: str = ""
    failed: bool = False
    informational: bool = False


@dataclass(frozen=True)
class PrepRow:
    """Preparing one volume. ``group``: "preprocess" (in memory -> [S, 1, H, W]) or "load +
    preprocess" (from the .nii.gz file). ``ratio``: this time / ours in the same group
    (> 1: slower than ours). ``max_abs_diff``: against the NumPy reference's output."""

    group: str
    name: str
    latency: Stats
    slices: int
    ratio: float
    ours: bool
    threads: int | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None


@dataclass(frozen=True)
class PipelineRow:
    """``ubc-infer``'s pipeline (``ubc.scoring.score_archive``) over a generated archive."""

    cases: int
    failed: int
    slices: int
    wall_seconds: float
    volumes_per_second: float
    slices_per_second: float
    backend: str
    precision: str
    batch_size: int
    volume_shape: tuple[int, int, int]
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchReport:
    """A whole ``ubc-bench`` run."""

    created: str
    command: str
    bundle: dict[str, Any]
    options: dict[str, Any]
    machine: dict[str, Any]
    rows: tuple[EngineRow, ...]
    unavailable: tuple[Unavailable, ...] = ()
    preprocessing: tuple[PrepRow, ...] = ()
    pipeline: PipelineRow | None = None
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    load_average_end: tuple[float, ...] = ()
    auto_choice: str | None = None  # the variant ubc.engine.load(backend="auto") picks
    auto_precision: str | None = None  # ... and its precision

    def to_json(self) -> dict[str, Any]:
        """The JSON document (schema ``SCHEMA``)."""
        doc = asdict(self)
        doc["schema"] = SCHEMA
        return _plain(doc)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (``asdict`` keeps tuples; JSON has lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_JSON_TYPES: dict[Any, Any] = {str: str, int: int, float: (int, float), bool: bool}
_MACHINE = ("cpu", "gpus", "libraries", "load_average")


def _value_problems(value: Any, hint: Any, where: str) -> list[str]:
    """What is wrong with ``value`` (from JSON) as a value of type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return []
        options = [a for a in args if a is not type(None)]
        hint = options[0] if len(options) == 1 else Any
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _problems(value, hint, where)
    if origin in (tuple, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [p for i, v in enumerate(value)
                for p in _value_problems(v, args[0], f"{where}[{i}]")]
    kind = dict if origin is dict else _JSON_TYPES.get(hint)
    if kind is not None and (not isinstance(value, kind) or
                             (isinstance(value, bool) and hint is not bool)):
        return [f"{where}: expected {getattr(hint, '__name__', hint)}, got "
                f"{type(value).__name__}"]
    return []


def _problems(obj: Any, cls: Any, where: str) -> list[str]:
    """What is wrong with ``obj`` (from JSON) as the ``asdict`` form of dataclass ``cls``."""
    if not isinstance(obj, dict):
        return [f"{where}: expected an object, got {type(obj).__name__}"]
    hints = typing.get_type_hints(cls)
    problems = []
    for f in dataclasses.fields(cls):
        if f.name in obj:
            problems += _value_problems(obj[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{where}: missing {f.name!r}")
    return problems


def validate(doc: Any) -> list[str]:
    """Problems with a ``ubc-bench`` JSON document (empty: it follows ``SCHEMA``), checked
    against the dataclasses above (and ``ubc.parity.ParityResult``) themselves."""
    if not isinstance(doc, dict):
        return [f"report: expected an object, got {type(doc).__name__}"]
    if doc.get("schema") != SCHEMA:
        return [f"report.schema: expected {SCHEMA!r}, got {doc.get('schema')!r}"]
    problems = _problems(doc, BenchReport, "report")
    if isinstance(doc.get("machine"), dict):
        problems += [f"report.machine: missing {k!r}" for k in _MACHINE
                     if k not in doc["machine"]]
    return problems
