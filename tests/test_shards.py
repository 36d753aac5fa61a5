"""ubc.scoring.shards: deterministic parts of an archive (``--num-parts/--part-id``) and
``ubc-infer --merge``, which refuses parts of different models, overlapping or missing parts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ubc.cli.infer import main
from ubc.errors import UBCInputError
from ubc.scoring import CaseResult, read_results
from ubc.scoring.discover import Case, discover_cases
from ubc.scoring.shards import merge_results, part_of, select_part
from ubc.scoring.writers import open_results

MODEL_A, MODEL_B = "a" * 64, "b" * 64


def _cases(ids: list[str]) -> list[Case]:
    return [Case(i, Path(f"/archive/{i}.nii.gz")) for i in ids]


def _write(path: Path, ids: list[str], sha: str = MODEL_A) -> Path:
    rows = [CaseResult(case_id=i, path=f"/archive/{i}.nii.gz", status="no_lesion",
                       bundle_sha256=sha) for i in ids]
    results = open_results(path)
    results.start(rows)
    results.close()
    return path


def _split(ids: list[str], n: int) -> list[list[str]]:
    return [[i for i in ids if part_of(i, n) == k] for k in range(n)]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=30), unique=True, max_size=60),
       st.sampled_from([1, 2, 3, 7, 16]))
def test_parts_cover_every_case_exactly_once(ids: list[str], n: int) -> None:
    cases = _cases(ids)
    parts = [select_part(cases, n, k) for k in range(n)]
    assert sorted(c.case_id for p in parts for c in p) == sorted(ids)
    shuffled = random.Random(0).sample(cases, len(cases))  # re-discovered in another order
    assert [{c.case_id for c in select_part(shuffled, n, k)} for k in range(n)] == \
        [{c.case_id for c in p} for p in parts]


def test_part_of_is_pinned_and_balanced() -> None:
    # pinned: a part must never move between versions, or resumed part runs would mix
    assert [part_of("BraTS-GLI-00001-000", n) for n in (2, 3, 8, 1000)] == [1, 0, 1, 361]
    assert [part_of("PH005_0000", n) for n in (2, 3, 8, 1000)] == [0, 2, 2, 634]
    ids = [f"case{i:05d}" for i in range(4000)]
    sizes = [len(p) for p in _split(ids, 8)]
    assert min(sizes) > 400 and max(sizes) < 600, sizes
    with pytest.raises(ValueError, match="part id"):
        select_part(_cases(ids[:3]), 4, 4)
    with pytest.raises(ValueError, match="number of parts"):
        part_of("x", 0)


def test_parts_scored_then_merged_equal_one_run(tmp_path: Path, tiny_bundle: Path,
                                                phantom_archive: Path) -> None:
    common = ["--model", str(tiny_bundle), "--input", str(phantom_archive), "--backend",
              "torch", "--device", "cpu", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "all.csv")]) == 0
    parts = [tmp_path / f"part{k}.jsonl" for k in range(3)]
    for k, part in enumerate(parts):
        assert main([*common, "--out", str(part), "--num-parts", "3", "--part-id", str(k)]) == 0
    assert sum(len(read_results(p)) for p in parts) == 6
    merged = tmp_path / "merged.csv"
    assert main(["--merge", str(merged), *map(str, parts), "--model", str(tiny_bundle),
                 "--input", str(phantom_archive), "--quiet"]) == 0

    def key(row: CaseResult) -> tuple[object, ...]:
        return (row.case_id, row.status, row.slices_used, row.p_hgg, row.lesion_volume_ml)

    assert [key(r) for r in read_results(merged)] == \
        sorted(key(r) for r in read_results(tmp_path / "all.csv"))
    assert main(["--merge", str(tmp_path / "again.csv"), *map(str, parts[:2]), "--input",
                 str(phantom_archive), "--quiet"]) == 2  # a part missing
    assert not (tmp_path / "again.csv").exists()


def test_merge_refuses_other_models_overlaps_and_other_splits(tmp_path: Path) -> None:
    ids = [f"case{i:03d}" for i in range(40)]
    a, b = _split(ids, 2)
    good = [_write(tmp_path / "p0.csv", a), _write(tmp_path / "p1.jsonl", b)]
    with pytest.raises(UBCInputError, match="different models"):
        merge_results(tmp_path / "m.csv", [good[0], _write(tmp_path / "x.csv", b, MODEL_B)])
    with pytest.raises(UBCInputError, match="different models"):
        merge_results(tmp_path / "m.csv", good, bundle_sha256=MODEL_B)
    with pytest.raises(UBCInputError, match="overlap"):
        merge_results(tmp_path / "m.csv", [good[0], _write(tmp_path / "y.csv", b + a[:1])])
    three = _split(ids, 3)
    with pytest.raises(UBCInputError, match="several of 2 parts"):  # a 3-way part given as 2
        merge_results(tmp_path / "m.csv", [_write(tmp_path / "t0.csv", three[0]),
                                           _write(tmp_path / "t1.csv", three[1] + three[2])])
    with pytest.raises(UBCInputError, match="same part"):
        merge_results(tmp_path / "m.csv", [_write(tmp_path / "z0.csv", a[:5]),
                                           _write(tmp_path / "z1.csv", a[5:])])
    with pytest.raises(UBCInputError, match="in no part"):
        merge_results(tmp_path / "m.csv", good, cases=_cases(ids + ["late"]))
    with pytest.raises(UBCInputError, match="not in the archive"):
        merge_results(tmp_path / "m.csv", good, cases=_cases(ids[1:]))
    assert not (tmp_path / "m.csv").exists()
    summary = merge_results(tmp_path / "m.parquet", good, cases=_cases(ids),
                            bundle_sha256=MODEL_A)
    assert summary.rows == 40 and summary.counts == {"no_lesion": 40}
    assert [r.case_id for r in read_results(tmp_path / "m.parquet")] == sorted(ids)
    with pytest.raises(UBCInputError, match="already exists"):
        merge_results(tmp_path / "m.parquet", good)


def test_cli_part_options_are_checked(tmp_path: Path, tiny_bundle: Path,
                                      phantom_archive: Path) -> None:
    base = ["--model", str(tiny_bundle), "--input", str(phantom_archive), "--out",
            str(tmp_path / "r.csv"), "--quiet"]
    for extra in (["--num-parts", "3"], ["--num-parts", "3", "--part-id", "3"],
                  ["--actors", "1,2"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *extra])
        assert exit_info.value.code == 2
    assert not (tmp_path / "r.csv").exists()
    assert len(discover_cases(phantom_archive)) == 6
