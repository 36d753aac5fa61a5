"""The one interface every inference backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from ubc.artifacts import artifacts_of, rebuild_hint
from ubc.bundle import artifact_metadata_mismatch
from ubc.devices import missing
from ubc.errors import BundleError

if TYPE_CHECKING:
    from ubc.bundle import Bundle


class Engine(ABC):
    """``infer(float32 [B, 1, H, W]) -> (class_logits [B, 2], mask_logits [B, 1, H, W])``.

    Subclasses declare what they need and can do (``packages`` and ``install``, ``devices``,
    ``precisions`` per device kind, ``artifact_kinds``: the table ``ubc.engine.registry``
    derives its orders from, and ``unavailable`` its checks), say which bundle file they
    run (``artifact_for``) and implement ``_run`` for one batch of at most ``max_batch``
    slices; ``infer`` checks the input and splits larger batches.
    """

    backend: str = "?"
    #: pip names of the packages it imports, and the command that installs them
    packages: tuple[str, ...] = ()
    install: str = ""
    #: device kinds this backend runs on
    devices: tuple[str, ...] = ()
    #: device kind -> the precisions it offers there
    precisions: Mapping[str, tuple[str, ...]] = {}
    #: kinds of bundle artifact it runs: eager, torchscript, onnx, aoti, plan
    artifact_kinds: tuple[str, ...] = ()
    #: the bundle file this engine runs (``weights.pt``, ``model.onnx``, a plan, ...)
    artifact: str = ""
    #: how ``ubc.engine.load`` chose this engine (set by ``load``; None when named)
    selection: Any = None

    @classmethod
    def artifact_for(cls, bundle: Bundle, device: str, precision: str, **options: Any) -> str:
        """The bundle file this backend would run for ``device`` and ``precision``."""
        raise NotImplementedError

    @classmethod
    def unsupported(cls, device: str, precision: str) -> str | None:
        """Why ``device`` or ``precision`` is outside what the class declares, or None."""
        kind = device.partition(":")[0]
        if kind not in cls.devices:
            return f"this backend runs on {' or '.join(cls.devices)} (device={cls.devices[0]!r})"
        offered = cls.precisions.get(kind, ())
        if precision not in offered:
            return f"{precision} is not offered on {kind} ({', '.join(offered)})"
        return None

    @classmethod
    def unavailable(cls, bundle: Bundle, device: str, precision: str,
                    **options: Any) -> str | None:
        """Why this backend cannot run the bundle here (missing package, device, precision,
        artifact or the weights file its meta.json entry names, then ``unfit``), or None
        when it can. Cheap: imports nothing heavy, verifies no hash."""
        reason = missing(cls.packages, cls.install) or cls.unsupported(device, precision)
        if reason is not None:
            return reason
        name = cls.artifact_for(bundle, device, precision, **options)
        weights = artifacts_of(bundle.meta).get(name, {}).get("weights_file")
        for needed in (name, weights) if weights else (name,):
            if not bundle.has(needed):
                return cls.absent(bundle, needed, device, precision)
        return cls.unfit(bundle, name, device, precision)

    @classmethod
    def absent(cls, bundle: Bundle, name: str, device: str, precision: str) -> str:
        """What to say when the bundle lacks ``name``: the command that makes it."""
        return f"the bundle has no {name} (make it with `{rebuild_hint(bundle.path, name)}`)"

    @classmethod
    def unfit(cls, bundle: Bundle, name: str, device: str, precision: str) -> str | None:
        """Why artifact ``name``, present, cannot run here (built for another machine or
        runtime, a precision this CPU lacks), or None."""
        return None

    def __init__(self, bundle: Bundle, *, device: str, precision: str,
                 max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.bundle = bundle
        self.meta = bundle.meta
        self.device = device
        self.precision = precision
        self.max_batch = max_batch
        self.input_size = bundle.preprocessing.size

    def check_settings(self, embedded: Mapping[str, str]) -> None:
        """Refuse the artifact (BundleError) when the settings it was exported with
        (``embedded``: its ``ubc.*`` metadata) differ from meta.json's: scoring with other
        preprocessing than the model's gives confident nonsense."""
        mismatch = artifact_metadata_mismatch(self.meta, embedded)
        if mismatch is not None:
            raise BundleError(f"{self.bundle.path / self.artifact}: {mismatch}; restore "
                              "meta.json, or re-export it with "
                              f"`{rebuild_hint(self.bundle.path, self.artifact)}`")

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class logits float32 [B, 2] and mask logits float32 [B, 1, H, W] for a batch."""
        batch = self._checked(batch)
        if len(batch) <= self.max_batch:
            return self._run(batch)
        parts = [self._run(batch[i:i + self.max_batch])
                 for i in range(0, len(batch), self.max_batch)]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def _checked(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed; load the bundle again")
        if not isinstance(batch, np.ndarray) or batch.dtype != np.float32:
            raise TypeError(f"batch must be a float32 numpy array, got "
                            f"{getattr(batch, 'dtype', type(batch).__name__)}")
        expected = (1, *self.input_size)
        if batch.ndim != 4 or batch.shape[1:] != expected or batch.shape[0] == 0:
            raise ValueError(f"batch must have shape [B>0, {', '.join(map(str, expected))}], "
                             f"got {list(batch.shape)}")
        return np.ascontiguousarray(batch)

    @abstractmethod
    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run one C-contiguous batch of at most ``max_batch`` slices."""

    _closed: bool = False

    def close(self) -> None:
        """Release device memory, sessions and streams (idempotent); ``infer`` then fails."""
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:  # noqa: B027 - optional hook, nothing to free by default
        """Free what the backend holds (called once, by ``close``)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, artifact={self.artifact!r}, "
                f"device={self.device!r}, precision={self.precision!r}, "
                f"max_batch={self.max_batch})")
