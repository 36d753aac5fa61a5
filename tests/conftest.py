"""Shared fixtures. Blocks are grouped by the part of the product they serve."""

from __future__ import annotations

from pathlib import Path

import pytest

# --- real MRI volumes (../shared/data/real): present in the team's checkouts, not in a user's
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
BRATS_FLAIR = REAL_DATA / "BraTS-GLI-00001-000-t2f.nii.gz"
TCGA_FLAIR = REAL_DATA / "TCGA-DU-7294_fla_bet.nii.gz"
TCGA_SEG = REAL_DATA / "TCGA-DU-7294_seg_consensus.nii.gz"


@pytest.fixture(scope="session")
def real_volume_paths() -> dict[str, Path]:
    """The real volumes by role; skips the test when the folder is absent."""
    paths = {"brats_flair": BRATS_FLAIR, "tcga_flair": TCGA_FLAIR, "tcga_seg": TCGA_SEG}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        pytest.skip(f"real MRI volumes not present: {', '.join(missing)}")
    return paths
