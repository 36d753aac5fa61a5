"""Scoring a hospital's archive where it lives (issue 29): a PACS reached over DICOMweb
(``ubc.net.dicomweb``) or DIMSE (``ubc.net.dimse``) as one more source of ``ubc-infer``.

- ``ubc.net.remote``: what both protocols share: the ``Pacs`` protocol (find, metadata,
  retrieve), a study as a ``VolumeReader`` (``RemoteStudy``), the bounded ``Spool``, and
  bounded retries with backoff (``with_retries``).
- ``ubc.net.sources``: ``PacsSettings`` and ``open_source(url, settings)``: the archive
  source ``ubc.scoring.score_archive`` takes instead of a path, and ``open_store`` for
  ``--store-seg``.

Layer: net sits above scoring and io (it may import them; they never import it).
"""

from __future__ import annotations

from ubc.net.sources import PacsSettings, PacsSource, is_pacs_url, open_source, open_store

__all__ = ["PacsSettings", "PacsSource", "is_pacs_url", "open_source", "open_store"]
