"""The DICOM node (issue 30, ``ubc-listen``): studies arrive by C-STORE, each is scored as
``ubc-infer`` scores a DICOM study once no instance of it arrived for ``study_timeout_s``,
its row appended to the results file, its SEG written and sent on with C-STORE.

- Receiving (pynetdicom's association threads): C-ECHO; C-STORE of an image storage SOP
  class is checked (``read_instance``) and kept durably (``InstanceSpool``) before the
  success status is answered; other objects (SR, SEG, presentation states) are
  acknowledged and not kept. A malformed dataset is refused (0xC210) with a log line
  naming the calling AE and why; a full spool answers out of resources (0xA700). An
  instance of a study already scored (or being scored) is acknowledged and dropped: a
  study is scored once.
- Scoring (one thread, ``Scorer``): the complete studies go together through
  ``score_archive`` with one engine loaded at start (the pipeline's batching across
  them), its source the studies' spool folders (``SpoolSource``), so rows, flags,
  conformance and the SEG are ``ubc-infer``'s. A study's folder is removed once its row
  is written and its outputs (the forward included) succeeded; a row whose forward failed
  keeps its folder, and the study is scored again with ``retry_errors`` at start and
  every ``retry_every_s``: only the missing outputs are written, the SEG kept is sent.
- Exactly once across crashes: at start, a spooled study without a row is scored, one
  whose row has an ``output_error`` is retried, one with a clean row is removed.
Receiving never waits for the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ubc.errors import UBCInputError
from ubc.net.dimse import DimseNode, DimseStore, _pynetdicom
from ubc.net.listen_spool import (
    InstanceSpool,
    Malformed,
    SpoolFull,
    is_image_storage,
    read_instance,
)
from ubc.net.remote import Retry
from ubc.scoring.archive import needs_retry
from ubc.scoring.discover import Discovery, discover_archive

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from ubc.engine.base import Engine
    from ubc.io.dicom_select import SeriesSelector
    from ubc.scoring import OutputSpec, ScoringOptions
    from ubc.scoring.result import CaseResult

__all__ = ["ListenSettings", "Arrivals", "SpoolSource", "Node", "parse_forward"]

log = logging.getLogger(__name__)

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND, PROCESSING_FAILURE = \
    0x0000, 0xA700, 0xC210, 0x0110
_VERIFICATION = "1.2.840.10008.1.1"


def parse_forward(text: str) -> DimseNode:
    """``AET@HOST:PORT`` (or ``dicom://AET@HOST:PORT``): where the SEGs go."""
    return DimseNode.parse(text if text.startswith("dicom://") else f"dicom://{text}")


@dataclass(frozen=True)
class ListenSettings:
    """The node: our AE title, where it listens, who may call (None: anyone), when a study
    is complete, the spool and its cap, network time-outs (connection, association, each
    message), the largest PDU we accept, where the SEGs go and how often a failed forward
    is tried again, and an optional Prometheus port."""

    spool: Path
    ae_title: str = "UBC"
    host: str = "127.0.0.1"
    port: int = 11112
    allow: tuple[str, ...] | None = None
    study_timeout_s: float = 30.0
    spool_max_bytes: int = 10 * 10**9
    timeout_s: float = 30.0
    max_pdu: int = 262144
    max_associations: int = 10
    forward: DimseNode | None = None
    retries: int = 3
    retry_every_s: float = 300.0
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if not 0 < len(self.ae_title) <= 16:
            raise ValueError(f"--ae-title {self.ae_title!r}: 1 to 16 characters")
        if self.study_timeout_s <= 0 or self.timeout_s <= 0:
            raise ValueError("--study-timeout and --timeout must be > 0")

    def store(self) -> DimseStore | None:
        if self.forward is None:
            return None
        return DimseStore(self.forward, self.ae_title, self.timeout_s,
                          Retry(tries=self.retries + 1))


@dataclass
class _Pending:
    last: float
    writing: int = 0


class Arrivals:
    """Which studies are arriving, and when each last got an instance. ``closed``: the
    studies scored or being scored (their instances are no longer taken). Thread-safe."""

    def __init__(self, closed: Iterable[str] = ()) -> None:
        self._pending: dict[str, _Pending] = {}
        self._closed = set(closed)
        self._lock = threading.Lock()

    def begin(self, study_uid: str) -> bool:
        """An instance of the study is being written; False when the study is closed."""
        with self._lock:
            if study_uid in self._closed:
                return False
            pending = self._pending.setdefault(study_uid, _Pending(time.monotonic()))
            pending.writing += 1
            return True

    def end(self, study_uid: str) -> None:
        with self._lock:
            pending = self._pending[study_uid]
            pending.writing -= 1
            pending.last = time.monotonic()

    def ready(self, study_uid: str) -> None:
        """A study spooled before a restart: complete at once."""
        with self._lock:
            self._pending[study_uid] = _Pending(float("-inf"))

    def take_complete(self, timeout_s: float) -> list[str]:
        """The studies quiet for ``timeout_s`` (none being written), now closed."""
        now = time.monotonic()
        with self._lock:
            done = [uid for uid, p in self._pending.items()
                    if p.writing == 0 and now - p.last >= timeout_s]
            for uid in done:
                del self._pending[uid]
                self._closed.add(uid)
            return done

    def reopen(self, study_uids: Iterable[str]) -> None:
        """Scoring failed as a whole: the studies wait another study time-out."""
        with self._lock:
            for uid in study_uids:
                self._closed.discard(uid)
                self._pending.setdefault(uid, _Pending(time.monotonic()))

    def waiting(self) -> int:
        with self._lock:
            return len(self._pending)


class SpoolSource:
    """Some studies of the spool as the archive of ``score_archive`` (an
    ``ArchiveSource``): each folder discovered as ``ubc-infer`` discovers a folder."""

    def __init__(self, spool: InstanceSpool, study_uids: list[str]) -> None:
        self.spool, self.study_uids = spool, study_uids

    def __str__(self) -> str:
        return f"{self.spool.root} ({len(self.study_uids)} studies)"

    def discover(self, *, pattern: str | None, limit: int | None,
                 series_select: SeriesSelector | None, case_id: str) -> Discovery:
        cases, skipped = [], []
        for uid in self.study_uids:
            found = discover_archive(self.spool.folder(uid), series_select=series_select,
                                     case_id=case_id)
            cases += found.cases
            skipped += found.skipped
        return Discovery(cases[:limit] if limit is not None else cases, skipped)

    def release(self, case_id: str) -> None:
        """Nothing here: the node removes a folder once the row says all went well."""

    def close(self) -> None:
        pass


class Scorer(threading.Thread):
    """Scores the complete studies, one ``score_archive`` per round (see the module
    docstring); ``stop`` lets the round under way finish."""

    def __init__(self, node: Node, engine: Engine, bundle: Any, outputs: OutputSpec,
                 options: ScoringOptions) -> None:
        super().__init__(name="ubc-listen-scorer", daemon=True)
        self.node, self.engine, self.bundle = node, engine, bundle
        self.outputs, self.options = outputs, options
        self.failed_forward: set[str] = set()
        self._stop_event = threading.Event()
        self._next_retry = 0.0  # at start: at once

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        settings = self.node.settings
        while not self._stop_event.is_set():
            uids = self.node.arrivals.take_complete(settings.study_timeout_s)
            if uids:
                for _ in uids:
                    self.node.metrics.count("received")
                self.score(uids, retry=False)
            elif self.failed_forward and time.monotonic() >= self._next_retry:
                self.score(sorted(self.failed_forward), retry=True)
                self._next_retry = time.monotonic() + (settings.retry_every_s or float("inf"))
            else:
                self._stop_event.wait(0.2)

    def score(self, uids: list[str], *, retry: bool) -> None:
        """One round: ``uids``' rows appended (``retry``: rows whose outputs failed are
        done again), their folders removed where all went well."""
        from ubc.scoring import score_archive

        uids = self._with_files(uids)
        if not uids:
            return
        rows: dict[str, CaseResult] = {}

        def on_result(row: CaseResult) -> None:  # the row is on disk
            rows[row.case_id] = row
            if row.case_id in uids:
                self.finished(row.case_id, row)
            else:  # a file discovery could not read: a row of its own (an error)
                self.node.metrics.count("failed")

        options = dataclasses.replace(self.options, retry_errors=retry)
        try:
            score_archive(self.bundle, SpoolSource(self.node.spool, uids), self.outputs,
                          options=options, engine=self.engine, on_result=on_result)
        except Exception as exc:  # the results file or a folder at fault: try again later
            log.error("scoring %d studies failed (%s: %s); they stay spooled and are "
                      "tried again in %g s", len(uids), type(exc).__name__, exc,
                      self.node.settings.study_timeout_s)
            if not retry:
                self.node.arrivals.reopen(uids)
            return
        for uid in uids:
            if uid not in rows and not retry:  # only files discovery could not read
                log.warning("study %s: no readable instance in its spool folder", uid)
                self.node.spool.remove(uid)

    def _with_files(self, uids: list[str]) -> list[str]:
        """``uids`` whose folders hold files; the others' folders go (a write that failed
        after creating the folder leaves it empty)."""
        kept = []
        for uid in uids:
            folder = self.node.spool.folder(uid)
            if folder.is_dir() and any(folder.iterdir()):
                kept.append(uid)
            else:
                self.node.spool.remove(uid)
                self.failed_forward.discard(uid)
        return kept

    def finished(self, uid: str, row: CaseResult) -> None:
        metrics = self.node.metrics
        metrics.count("scored")
        if needs_retry(row):
            metrics.count("failed")
        if row.seg_stored:
            metrics.count("forwarded")
        if row.output_error is None:
            self.failed_forward.discard(uid)
            self.node.spool.remove(uid)
        else:
            self.failed_forward.add(uid)
        log.info("study %s: %s%s%s%s", uid, row.status,
                 f" p_hgg {row.p_hgg:.3f}" if row.p_hgg is not None else "",
                 f", forwarded {row.seg_stored}" if row.seg_stored else "",
                 f"; {row.error or row.output_error}" if row.error or row.output_error else "")


class Metrics:
    """Prometheus counters and gauges of the node (``--metrics-port``); without one, the
    counts are only kept."""

    NAMES = ("received", "scored", "forwarded", "failed")

    def __init__(self, spool: InstanceSpool, arrivals: Arrivals) -> None:
        self._counts = dict.fromkeys(self.NAMES, 0)
        self._prometheus: dict[str, Any] = {}
        self.spool, self.arrivals = spool, arrivals

    def count(self, name: str) -> None:
        self._counts[name] += 1
        if name in self._prometheus:
            self._prometheus[name].inc()

    def serve(self, host: str, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
        except ImportError as exc:
            raise UBCInputError("--metrics-port needs prometheus-client: pip install "
                                "ubc[pacs]") from exc
        registry = CollectorRegistry()
        for name in self.NAMES:
            self._prometheus[name] = Counter(f"ubc_listen_studies_{name}",
                                             f"studies {name}", registry=registry)
        Gauge("ubc_listen_spool_bytes", "bytes in the spool",
              registry=registry).set_function(lambda: self.spool.bytes)
        Gauge("ubc_listen_queue_studies", "studies received and not yet scored",
              registry=registry).set_function(self.arrivals.waiting)
        start_http_server(port, addr=host, registry=registry)


@dataclass
class Node:
    """The node's state shared by the receiving threads and the scorer."""

    settings: ListenSettings
    spool: InstanceSpool
    arrivals: Arrivals
    metrics: Metrics = field(init=False)
    _server: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.spool, self.arrivals)

    # --- receiving ---------------------------------------------------------------------
    def on_store(self, event: Event) -> int:
        """One C-STORE (see the module docstring)."""
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_class = str(event.context.abstract_syntax)
        if not is_image_storage(sop_class):
            return SUCCESS  # acknowledged, not kept: not an image
        try:
            data = event.encoded_dataset()
            instance = read_instance(data)
        except Malformed as exc:
            log.warning("C-STORE from %s refused: the dataset %s", calling, exc)
            return CANNOT_UNDERSTAND
        if not self.arrivals.begin(instance.study_uid):
            log.warning("C-STORE from %s: study %s is scored already; instance %s "
                        "acknowledged and dropped", calling, instance.study_uid,
                        instance.sop_uid)
            return SUCCESS
        try:
            self.spool.add(instance, data)
            return SUCCESS
        except SpoolFull as exc:
            log.warning("C-STORE from %s refused (out of resources): %s", calling, exc)
            return OUT_OF_RESOURCES
        except OSError as exc:
            log.error("C-STORE from %s: cannot write to the spool (%s)", calling,
                      exc.strerror or exc)
            return OUT_OF_RESOURCES
        finally:
            self.arrivals.end(instance.study_uid)

    def start(self) -> None:
        """Listen (returns at once; the associations run in pynetdicom's threads)."""
        pynetdicom = _pynetdicom()
        settings = self.settings
        ae = pynetdicom.AE(ae_title=settings.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout_s
        ae.maximum_pdu_size = settings.max_pdu
        ae.maximum_associations = settings.max_associations
        if settings.allow is not None:
            ae.require_calling_aet = list(settings.allow)
        syntaxes = pynetdicom.ALL_TRANSFER_SYNTAXES
        for context in pynetdicom.StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(_VERIFICATION)
        handlers = [(pynetdicom.evt.EVT_C_STORE, self.on_store)]
        self._server = ae.start_server((settings.host, settings.port), block=False,
                                       evt_handlers=handlers)

    def stop(self) -> None:
        """Stop listening (associations under way are aborted)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def resume(node: Node, rows: list[CaseResult]) -> set[str]:
    """What a restart owes (see the module docstring): studies without a row made ready,
    clean ones removed; returns those whose outputs failed (to retry)."""
    latest = {row.case_id: row for row in rows}
    retry = set()
    for uid in node.spool.studies():
        row = latest.get(uid)
        if row is None:
            node.arrivals.ready(uid)
        elif row.output_error is not None:
            retry.add(uid)
        else:
            node.spool.remove(uid)
    return retry


def run_node(settings: ListenSettings, bundle: Any, engine: Engine, outputs: OutputSpec,
             options: ScoringOptions, rows: list[CaseResult],
             until: Callable[[], object]) -> None:
    """Resume, listen, score until ``until()`` returns (SIGTERM), then stop listening and
    let the round being scored finish; the rest stays spooled."""
    spool = InstanceSpool(settings.spool, settings.spool_max_bytes)
    node = Node(settings, spool, Arrivals(row.case_id for row in rows))
    scorer = Scorer(node, engine, bundle, outputs, options)
    scorer.failed_forward = resume(node, rows)
    if settings.metrics_port is not None:
        node.metrics.serve(settings.host, settings.metrics_port)
    node.start()
    scorer.start()
    log.info("listening as %s on %s:%d (study time-out %g s)%s", settings.ae_title,
             settings.host, settings.port, settings.study_timeout_s,
             f", forwarding SEGs to {settings.forward}" if settings.forward else "")
    try:
        until()
    finally:
        node.stop()
        scorer.stop()
        scorer.join()
        log.info("stopped; %d studies left in the spool for the next start",
                 len(spool.studies()))
