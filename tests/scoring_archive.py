"""Helpers of the scoring tests: a tiny bundle, phantom archives with bad files mixed in, and
a deterministic stand-in engine. Used through the fixtures in conftest.py."""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np

from ubc.bundle import Preprocessing
from ubc.engine.base import Engine

#: Tiny model geometry: 32 x 32 pixels of 2 mm cover a (64, 64, 24) phantom of 1 mm voxels.
TINY_SIZE = (32, 32)
TINY_SPACING = (2.0, 2.0)
PHANTOM_SHAPE = (64, 64, 24)


def make_tiny_bundle(path: Path) -> Path:
    """A UBC bundle with random weights (seeded) at 32 x 32, 2 mm."""
    import torch

    from ubc.bundle import Preprocessing, create_bundle
    from ubc.model import build_model

    torch.manual_seed(0)
    create_bundle(path, arch="ubc-resnet34", state_dict=build_model().state_dict(),
                  preprocessing=Preprocessing(size=TINY_SIZE, target_spacing=TINY_SPACING))
    return path


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def add_permuted(root: Path, source: Path) -> str:
    """The same scan stored with its axes permuted (z, x, y): another orientation on disk,
    the same image in the world. Returns its case id."""
    image = nib.load(source)
    permutation = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    data = np.asarray(image.dataobj).transpose(2, 0, 1)
    _save(np.ascontiguousarray(data), image.affine @ permutation,
          root / "other" / "permuted_flair.nii.gz")
    return "other/permuted_flair"


def add_bad_files(root: Path, good: Path) -> dict[str, str]:
    """Bad inputs under ``root/bad`` (and an empty folder); case id -> words expected in its
    error (alternatives separated by ``|``)."""
    bad = root / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    raw = good.read_bytes()
    (bad / "corrupt_flair.nii.gz").write_bytes(raw[:20] + bytes(range(256)) * 8)
    (bad / "truncated_flair.nii.gz").write_bytes(raw[: len(raw) // 2])
    (bad / "text_flair.nii.gz").write_text("this is not an image\n")
    (bad / "notgz_flair.nii.gz").write_bytes(gzip.compress(b"plain text, gzipped" * 40))
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    shape = PHANTOM_SHAPE
    _save(np.ones((*shape, 2), np.int16), affine, bad / "fourd_flair.nii.gz")
    _save(np.zeros(shape, np.int16), affine, bad / "zero_flair.nii.gz")
    _save(np.full(shape, 7, np.int16), affine, bad / "constant_flair.nii.gz")
    nan = np.ones(shape, np.float32)
    nan[3, 3, 3] = np.nan
    _save(nan, affine, bad / "nan_flair.nii")
    (root / "empty_folder").mkdir(exist_ok=True)
    # "deflate": igzip's words for a corrupt stream (ubc.io passes them through)
    return {"bad/corrupt_flair": "gzip|deflate", "bad/truncated_flair": "gzip|deflate",
            "bad/text_flair": "NIfTI", "bad/notgz_flair": "NIfTI", "bad/fourd_flair": "4-D",
            "bad/zero_flair": "empty", "bad/constant_flair": "constant",
            "bad/nan_flair": "NaN"}


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


class FakeEngine(Engine):
    """A deterministic engine without a network: the mask logit of a pixel is its intensity
    minus ``threshold`` and the HGG logit is the slice's mean intensity, so every slice's
    outputs depend on that slice alone (whatever batch it travels in). Records what it saw;
    ``delay`` seconds per slice emulate a slow accelerator; ``fail_on`` makes the n-th call
    raise."""

    backend = "fake"

    def __init__(self, size: tuple[int, int] = TINY_SIZE, *, max_batch: int = 8,
                 threshold: float = 1.0, delay: float = 0.0, fail_on: int | None = None):
        header = SimpleNamespace(meta={}, preprocessing=Preprocessing(size=size))
        super().__init__(header, device="cpu",  # type: ignore[arg-type]
                         precision="fp32", max_batch=max_batch)
        self.threshold = threshold
        self.delay = delay
        self.fail_on = fail_on
        self.calls = 0
        self.slices_seen = 0

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError("simulated accelerator fault")
        self.slices_seen += len(batch)
        if self.delay:
            time.sleep(self.delay * len(batch))
        mean = batch.reshape(len(batch), -1).mean(axis=1)
        class_logits = np.stack([np.zeros_like(mean), mean * 4.0], axis=1).astype(np.float32)
        return class_logits, (batch - self.threshold).astype(np.float32)


def record_training_data(bundle: Path, archive: Path) -> Path:
    """``bundle`` with meta.json's training data record made, as ``ubc-train`` makes it,
    from the cases of ``archive`` (the bundle is changed: pass a copy)."""
    from ubc.bundle import Bundle
    from ubc.data import discover, training_data

    record = training_data(archive, discover(archive))
    Bundle(bundle).update_meta(training={"training_data": record.to_json()})
    return bundle
