"""DICOM in and out (issue 12): recognition, study grouping, series selection, assembly into
the same RAS Volume as NIfTI, refusals, scoring with SEG output, resume, zip, case ids."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from scoring_archive import PHANTOM_SHAPE, FakeEngine  # noqa: E402

from ubc.errors import UBCInputError  # noqa: E402
from ubc.io import load_volume  # noqa: E402
from ubc.io.dicom import find_dicom_files, is_dicom_file, load_series, read_header  # noqa: E402
from ubc.io.dicom_select import SeriesInfo, SeriesSelector, select_series  # noqa: E402
from ubc.io.dicom_write import SeriesSpec, write_series  # noqa: E402
from ubc.scoring import discover_cases, read_results, score_archive  # noqa: E402
from ubc.synth import dicom_affine, phantom, phantom_affine, write_dicom_archive  # noqa: E402


@pytest.fixture(scope="module")
def dicom_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom studies (axial LPS, oblique, multi-frame), seed 5 (read-only)."""
    return write_dicom_archive(tmp_path_factory.mktemp("dicom") / "archive", 3, seed=5,
                               shape=PHANTOM_SHAPE)


def _spec(tag: str, **kwargs: object) -> SeriesSpec:
    from pydicom.uid import generate_uid

    uids = [str(generate_uid(entropy_srcs=[tag, what])) for what in ("st", "se", "fr")]
    return SeriesSpec(*uids, **kwargs)  # type: ignore[arg-type]


def _volume() -> np.ndarray:
    return phantom(7, grade=1, shape=(32, 32, 12))[0]


# --- assembly: the same Volume as NIfTI ---------------------------------------------------
def test_phantom_studies_read_back_the_nifti_voxels_and_affine(dicom_archive: Path,
                                                               tmp_path: Path) -> None:
    """Axial LPS, oblique and multi-frame studies: the voxels, affine and spacing of a NIfTI
    file holding the same phantom with the same affine."""
    for i, case in enumerate(sorted(dicom_archive.glob("PH*"))):
        flair = phantom(np.random.SeedSequence([5, i]), grade=_grade_of(dicom_archive, case.name),
                        shape=PHANTOM_SHAPE)[0]
        reference = tmp_path / f"{case.name}.nii.gz"
        nib.save(nib.Nifti1Image(flair, dicom_affine(flair.shape, i)), reference)
        expected = load_volume(reference)
        volume, sources = load_series(find_dicom_files(case / "1_FLAIR"))
        assert np.array_equal(volume.data, expected.data)
        np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-5)
        np.testing.assert_allclose(volume.spacing, expected.spacing, atol=1e-9)
        # slices sorted along the normal, whatever order the files or frames were written in
        assert [k for _, k in sources] == (list(range(24))[::-1] if i % 3 == 2 else [0] * 24)


def _grade_of(root: Path, name: str) -> int:
    for line in (root / "labels.csv").read_text().splitlines()[1:]:
        _uid, grade, patient = line.split(",")
        if patient == name:
            return 1 if grade == "HGG" else 0
    raise AssertionError(name)


@pytest.mark.real
@pytest.mark.parametrize("role, multiframe", [
    ("brats_flair", False), pytest.param("tcga_flair", True, marks=pytest.mark.slow)])
def test_real_volumes_as_dicom_read_back_identical(real_volume_paths: dict[str, Path],
                                                   tmp_path: Path, role: str,
                                                   multiframe: bool) -> None:
    image = nib.load(real_volume_paths[role])
    write_series(np.asarray(image.dataobj), image.affine, tmp_path, _spec(role),
                 multiframe=multiframe)
    volume, _ = load_series(find_dicom_files(tmp_path))
    expected = load_volume(real_volume_paths[role])
    assert np.array_equal(volume.data, expected.data)
    np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-4)
    np.testing.assert_allclose(volume.original_affine, expected.original_affine, atol=1e-4)


def test_ubc_synth_format_dicom(tmp_path: Path) -> None:
    from ubc.cli.synth import main

    assert main([str(tmp_path / "d"), "--cases", "1", "--shape", "16", "16", "8",
                 "--format", "dicom"]) == 0
    (case,) = discover_cases(tmp_path / "d")
    assert case.reader.study is not None and len(case.reader.study.series) == 2
    assert case.reader.study.chosen is not None and case.reader.study.chosen.frames == 8


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    data = _volume().astype(np.float32) * 0.5 + 100
    write_series(data, phantom_affine(data.shape), tmp_path, _spec("r", rescale=(0.5, 100.0)))
    volume, _ = load_series(find_dicom_files(tmp_path))
    assert volume.data.dtype == np.float32
    assert np.array_equal(volume.to_original_orientation(np.asarray(volume.data)), data)


def test_pydicom_bundled_mr_files_real_world_headers() -> None:
    from pydicom.data import get_testdata_file

    plain = get_testdata_file("MR_small.dcm", download=False)
    compressed = get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False)
    if plain is None or compressed is None:
        pytest.skip("pydicom's bundled MR_small files are not installed")
    volume, _ = load_series([plain])
    expected = pydicom.dcmread(plain).pixel_array
    assert volume.data.shape[2] == 1 and volume.spacing[2] > 0
    assert np.array_equal(np.sort(np.asarray(volume.data).ravel()), np.sort(expected.ravel()))
    try:
        decoded, _ = load_series([compressed])
    except UBCInputError as exc:  # no JPEG-LS plugin here: the message names the extra
        assert "pip install" in str(exc)
    else:
        assert np.array_equal(decoded.data, volume.data)


def test_pydicom_dicomdir_study_without_flair_lists_its_series() -> None:
    from pydicom.data import get_testdata_file

    dicomdir = get_testdata_file("DICOMDIR", download=False)
    if dicomdir is None:
        pytest.skip("pydicom's bundled dicomdirtests are not installed")
    root = Path(dicomdir).parent / "98892003"  # one patient: localizers and MR angiography
    cases = discover_cases(root)
    assert cases and all(c.reader.study is not None and c.reader.study.error for c in cases)
    errors = " ".join(c.reader.study.error or "" for c in cases if c.reader.study is not None)
    assert "no MR series" in errors and "FAST LOCALIZER" in errors and "--series-select" in errors
    angio = [c.reader.study for c in discover_cases(root, series_select="ANGIO")
             if c.reader.study is not None and c.reader.study.chosen is not None]
    assert len(angio) == 1 and angio[0].chosen is not None
    with pytest.raises(UBCInputError, match="mixed orientations"):  # projections, not a stack
        load_series(angio[0].chosen.files)


# --- refusals -------------------------------------------------------------------------------
def _series(tmp_path: Path, affine: np.ndarray | None = None, **spec: object) -> list[Path]:
    data = _volume()
    return write_series(data, phantom_affine(data.shape) if affine is None else affine,
                        tmp_path, _spec(str(tmp_path), **spec))


def _set(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def test_refuses_duplicate_missing_and_non_uniform_positions(tmp_path: Path) -> None:
    files = _series(tmp_path / "dup")
    _set(files[3], ImagePositionPatient=pydicom.dcmread(files[2]).ImagePositionPatient)
    with pytest.raises(UBCInputError, match="same position"):
        load_series(files)
    files = _series(tmp_path / "gap")
    with pytest.raises(UBCInputError, match="missing slice"):
        load_series(files[:5] + files[6:])
    files = _series(tmp_path / "uneven")
    ipp = pydicom.dcmread(files[5]).ImagePositionPatient
    _set(files[5], ImagePositionPatient=[ipp[0], ipp[1], float(ipp[2]) + 0.3])
    with pytest.raises(UBCInputError, match="non-uniform"):
        load_series(files)


def test_refuses_tilt_mixed_geometry_and_non_mr(tmp_path: Path) -> None:
    sheared = phantom_affine((32, 32, 12))
    sheared[1, 2] = 0.2  # each slice shifted 0.2 mm along y: a gantry tilt
    with pytest.raises(UBCInputError, match="gantry tilt"):
        load_series(_series(tmp_path / "tilt", sheared))
    files = _series(tmp_path / "orient")
    _set(files[4], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    with pytest.raises(UBCInputError, match="mixed orientations"):
        load_series(files)
    files = _series(tmp_path / "size")
    ds = pydicom.dcmread(files[2])
    ds.Rows, ds.PixelData = 16, ds.PixelData[: 16 * 32 * 2]
    ds.save_as(files[2])
    with pytest.raises(UBCInputError, match="mixed sizes"):
        load_series(files)
    with pytest.raises(UBCInputError, match="CT, not MR"):
        load_series(_series(tmp_path / "ct", modality="CT"))


def test_truncated_and_undecodable_instances_are_named(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    files = _series(tmp_path / "trunc")
    raw = files[4].read_bytes()
    files[4].write_bytes(raw[: len(raw) - 500])
    with pytest.raises(UBCInputError, match=files[4].name):
        load_series(files)
    files = _series(tmp_path / "jpeg")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path)
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    with pytest.raises(UBCInputError, match="pip install"):
        load_series(files)


# --- discovery and selection ------------------------------------------------------------------
def test_discovery_finds_studies_by_content_and_chooses_the_flair(dicom_archive: Path,
                                                                  tmp_path: Path) -> None:
    root = shutil.copytree(dicom_archive, tmp_path / "a")
    (root / "PH005_0000" / "notes.dcm").write_text("not DICOM at all\n")
    (root / "PH005_0000" / "README").write_text("hello\n")
    assert not is_dicom_file(root / "PH005_0000" / "notes.dcm")
    cases = discover_cases(root)
    assert len(cases) == 3
    for case in cases:
        assert case.reader.study is not None and case.reader.study.chosen is not None
        assert case.case_id == case.reader.study.study_uid
        assert case.reader.study.chosen.description == "AX T2 FLAIR"
        assert {s.description for s in case.reader.study.series} == {"AX T2 FLAIR", "AX T1 SE"}
    assert sorted(c.label for c in cases) == [0, 1, 1]  # labels.csv keyed by study uid
    patient = discover_cases(root, case_id="patient")
    assert sorted(c.case_id for c in patient) == [f"PH005_000{i}_20000101" for i in range(3)]
    assert sorted(c.case_id for c in discover_cases(root, case_id="folder")) == \
        ["PH005_0000", "PH005_0001", "PH005_0002"]
    t1 = discover_cases(root, series_select="SeriesDescription=t1;EchoTime<20")
    assert all(c.reader.study is not None and c.reader.study.chosen is not None
               and c.reader.study.chosen.description == "AX T1 SE" for c in t1)


def _info(description: str, **kwargs: object) -> SeriesInfo:
    values: dict[str, object] = dict(
        series_uid=description, description=description, protocol="", sequence_name="",
        scanning_sequence="SE", inversion_time_ms=None, echo_time_ms=100.0,
        image_type="ORIGINAL\\PRIMARY", series_number=1, modality="MR", plane="axial",
        frames=24, files=())
    values.update(kwargs)
    return SeriesInfo(**values)  # type: ignore[arg-type]


def test_selection_rules_and_tie_break() -> None:
    def chosen(*series: SeriesInfo) -> str | None:
        picked, _flags, _error = select_series(series)
        return None if picked is None else picked.series_uid

    assert chosen(_info("t2_tirm_tra_dark-fluid"), _info("T1 SE")) == "t2_tirm_tra_dark-fluid"
    assert chosen(_info("ax 3"), _info("x", scanning_sequence="SE\\IR",
                                       inversion_time_ms=2500.0)) == "x"
    assert chosen(_info("stir", scanning_sequence="IR", inversion_time_ms=150.0)) is None
    assert chosen(_info("T1 FLAIR"), _info("FLAIR localizer")) is None
    assert chosen(_info("FLAIR", modality="CT"), _info("FLAIR", frames=3)) is None
    picked, flags, _ = select_series([
        _info("sag FLAIR", plane="sagittal", frames=176), _info("ax FLAIR", frames=24),
        _info("ax FLAIR thin", frames=40), _info("ax FLAIR mpr", frames=90,
                                                  image_type="DERIVED\\SECONDARY")])
    assert picked is not None and picked.series_uid == "ax FLAIR thin"
    assert any("4 candidates" in f for f in flags)
    _, _, error = select_series([_info("T1 SE"), _info("DWI")])
    assert error is not None and "'T1 SE'" in error and "'DWI'" in error
    selector = SeriesSelector.parse("dwi")
    assert select_series([_info("T1 SE"), _info("DWI")], selector)[0] is not None
    for bad in ("Nonsense=1", "InversionTime>=long", "SeriesDescription=(", "("):
        with pytest.raises(ValueError):
            SeriesSelector.parse(bad)


# --- scoring: rows, SEG, resume, zip ----------------------------------------------------------
def test_scoring_a_dicom_archive_writes_seg_equal_to_the_nifti_mask(
        dicom_archive: Path, phantom_archive: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "dicom.jsonl"
    summary = score_archive(tiny_bundle, dicom_archive, out, masks=tmp_path / "masks",
                            engine=FakeEngine(), dicom_seg=tmp_path / "seg")
    assert summary.counts == {"ok": 3}
    from ubc.io.dicom_seg import read_seg

    rows = {r.case_id: r for r in read_results(out)}
    for case in discover_cases(dicom_archive):
        row = rows[case.case_id]
        study = case.reader.study
        assert study is not None and study.chosen is not None
        assert row.study_uid == case.case_id and row.series_description == "AX T2 FLAIR"
        assert row.series_uid == study.chosen.series_uid and "series_rule:name" in row.flags
        _, sources = load_series(study.chosen.files)
        nifti = np.asarray(nib.load(tmp_path / "masks" / f"{case.case_id}.nii.gz").dataobj)
        seg = read_seg(tmp_path / "seg" / f"{case.case_id}.dcm", sources)
        assert nifti.sum() > 0 and np.array_equal(seg, nifti)
    assert "Phantom" not in out.read_text()  # no patient name in rows
    nifti_rows = {r.case_id: r for r in read_results(
        _score(tiny_bundle, phantom_archive, tmp_path / "nifti.jsonl"))}
    for row in rows.values():
        twin = nifti_rows[Path(row.path).name]
        assert row.p_hgg == pytest.approx(twin.p_hgg, rel=1e-6)
        assert row.lesion_volume_ml == pytest.approx(twin.lesion_volume_ml, rel=1e-6)
    again = score_archive(tiny_bundle, dicom_archive, out, engine=FakeEngine())
    assert again.scored == 0 and again.skipped == 3


def _score(bundle: Path, archive: Path, out: Path) -> Path:
    score_archive(bundle, archive, out, engine=FakeEngine())
    return out


def test_resume_rescoring_a_changed_study_and_zip_input(
        dicom_archive: Path, tiny_bundle: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from ubc.scoring import archive_zip

    root = shutil.copytree(dicom_archive, tmp_path / "a")
    out = tmp_path / "r.csv"
    score_archive(tiny_bundle, root, out, engine=FakeEngine())
    touched = sorted((root / "PH005_0001" / "2_T1").iterdir())[0]
    os.utime(touched, ns=(10**18, 10**18))  # 2001: a zip holds no earlier date
    again = score_archive(tiny_bundle, root, out, engine=FakeEngine())
    assert again.scored == 1 and again.skipped == 2
    archive = tmp_path / "studies.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(root.rglob("*")):
            z.write(path, path.relative_to(root).as_posix())
    zipped = discover_cases(archive)
    assert sorted(c.case_id for c in zipped) == sorted(c.case_id for c in discover_cases(root))
    first = score_archive(tiny_bundle, archive, tmp_path / "z.jsonl", engine=FakeEngine())
    assert first.counts == {"ok": 3}
    monkeypatch.setattr(archive_zip, "_extracted", {})  # as a new process: extract again
    assert score_archive(tiny_bundle, archive, tmp_path / "z.jsonl",
                         engine=FakeEngine()).skipped == 3


def test_broken_studies_become_error_rows(dicom_archive: Path, tiny_bundle: Path,
                                          tmp_path: Path) -> None:
    root = shutil.copytree(dicom_archive, tmp_path / "a")
    shutil.rmtree(root / "PH005_0002" / "1_FLAIR")  # a study with no FLAIR
    files = sorted((root / "PH005_0001" / "1_FLAIR").iterdir())
    raw = files[3].read_bytes()
    files[3].write_bytes(raw[:200])  # truncated inside the header
    out = tmp_path / "rows.jsonl"
    summary = score_archive(tiny_bundle, root, out, engine=FakeEngine())
    errors = [(r.path, r.error or "") for r in read_results(out) if r.status == "error"]

    def error_of(where: str) -> str:
        return next(error for path, error in errors if path.endswith(where))

    assert summary.failed == 3 and summary.counts.get("ok") == 1
    assert "no MR series" in error_of("2_T1") and "'AX T1 SE'" in error_of("2_T1")
    assert "DICOM header" in error_of(files[3].name)
    assert "missing slice" in error_of("PH005_0001")  # the rest of its FLAIR has a gap


def test_ubc_infer_cli_scores_a_dicom_folder_with_seg_output(dicom_archive: Path,
                                                             tiny_bundle: Path,
                                                             tmp_path: Path) -> None:
    from ubc.cli.infer import main

    code = main(["--model", str(tiny_bundle), "--input", str(dicom_archive / "PH005_0000"),
                 "--out", str(tmp_path / "r.jsonl"), "--dicom-seg", str(tmp_path / "seg"),
                 "--case-id", "folder", "--series-select", "SeriesDescription=flair",
                 "--backend", "torch", "--quiet"])
    (row,) = read_results(tmp_path / "r.jsonl")
    assert code == 0, row.error
    assert row.case_id == "PH005_0000" and row.status in ("ok", "no_lesion")
    assert "series_rule:--series-select" in (row.flags or "")
    assert (tmp_path / "seg" / "PH005_0000.dcm").is_file()
    assert main(["--model", str(tiny_bundle), "--input", str(dicom_archive), "--out",
                 str(tmp_path / "x.jsonl"), "--series-select", "Bogus=1", "--quiet"]) == 2


def test_a_single_flair_slice_is_too_few_frames_not_a_non_flair(dicom_archive: Path,
                                                                tiny_bundle: Path,
                                                                tmp_path: Path) -> None:
    one_slice = sorted((dicom_archive / "PH005_0000" / "1_FLAIR").iterdir())[0]
    out = tmp_path / "rows.jsonl"
    assert score_archive(tiny_bundle, one_slice, out, engine=FakeEngine()).failed == 1
    (row,) = read_results(out)
    assert "the FLAIR series #1 'AX T2 FLAIR' MR axial 1 frames has too few frames for a " \
           "volume (at least 8)" in (row.error or "")
    assert "no MR series" not in (row.error or "")


def test_discovery_headers_are_not_parsed_again(dicom_archive: Path) -> None:
    """The series found by discovery loads from the headers it read (pixels at the offsets
    it located) into the same volume as reading every file again, single- and multi-frame."""
    for case in discover_cases(dicom_archive):
        chosen = case.reader.study.chosen  # type: ignore[attr-defined]
        assert chosen.headers and all(h.instance is not None for h in chosen.headers)
        fast, fast_sources = load_series(chosen.files, headers=chosen.headers)
        slow, slow_sources = load_series(chosen.files)
        assert np.array_equal(fast.data, slow.data) and fast.data.dtype == slow.data.dtype
        assert np.array_equal(fast.affine, slow.affine) and fast_sources == slow_sources


def test_a_file_rewritten_after_discovery_is_read_again(tmp_path: Path) -> None:
    """Offsets found by discovery are used only while the file is as it was then."""
    data = _volume()
    files = write_series(data, phantom_affine(data.shape), tmp_path, _spec("rewrite"))
    headers = [h for h in (read_header(f) for f in files) if h is not None]
    changed = data.copy()
    changed[:, :, 0] += 1
    write_series(changed, phantom_affine(data.shape), tmp_path, _spec("rewrite"))
    volume, _ = load_series(files, headers=headers)
    assert np.array_equal(volume.data, load_series(files)[0].data)


def test_the_same_series_and_model_make_the_same_seg(tmp_path: Path) -> None:
    """A SEG's UIDs derive from its source instances and the model: written again (a node
    killed after sending it, before its row) it is the same instance, which a PACS keeps
    once; another model's SEG is another instance."""
    from ubc.io.dicom_seg import write_seg

    _, sources = load_series(_series(tmp_path / "s"))
    mask = np.zeros((32, 32, 12), np.uint8)
    mask[10:20, 10:20, 4:8] = 1

    def uids(name: str, version: str) -> tuple[str, str]:
        ds = pydicom.dcmread(write_seg(mask, sources, tmp_path / name, version=version))
        return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)

    first = uids("a.dcm", "abc")
    assert uids("b.dcm", "abc") == first
    assert set(uids("c.dcm", "def")).isdisjoint(first)


def test_a_seg_from_discovery_headers_is_the_seg_from_reading_them_again(tmp_path: Path) -> None:
    """Scoring hands ``write_seg`` the headers discovery read, instead of reading the
    source instances a second time: the same SEG but for its time stamps."""
    from ubc.io.dicom_seg import write_seg

    files = _series(tmp_path / "s")
    (case,) = discover_cases(tmp_path / "s")
    headers = case.reader.headers  # type: ignore[attr-defined]
    assert len(headers) == len(files)
    _, sources = load_series(files)
    mask = np.zeros((32, 32, 12), np.uint8)
    mask[10:20, 10:20, 4:8] = 1
    read = pydicom.dcmread(write_seg(mask, sources, tmp_path / "read.dcm"))
    given = pydicom.dcmread(write_seg(mask, sources, tmp_path / "given.dcm",
                                      headers=headers))
    stamps = {"InstanceCreationTime", "ContentTime", "InstanceCreationDate", "ContentDate"}
    assert [e for e in read if e.keyword not in stamps] == \
        [e for e in given if e.keyword not in stamps]


@pytest.mark.parametrize("multiframe", [False, True])
def test_seg_reads_back_the_mask_and_references_each_source_frame(tmp_path: Path,
                                                                 multiframe: bool) -> None:
    """The SEG (encoded without highdicom) read back by highdicom is the mask, voxel for
    voxel, empty frames included; each SEG frame names its source instance (and frame of an
    Enhanced MR instance, written in reverse order) and that frame's ImagePositionPatient."""
    from ubc.io.dicom_seg import read_seg, write_seg

    data = phantom(3, grade=1, shape=(64, 64, 20))[0]
    files = write_series(data, dicom_affine(data.shape, 1), tmp_path / "series",
                         _spec(f"seg-{multiframe}"), multiframe=multiframe,
                         order=list(range(20))[::-1] if multiframe else None)
    _, sources = load_series(files)
    mask = (np.random.default_rng(0).random((64, 64, 20)) < 0.2).astype(np.uint8)
    mask[:, :, 5] = 0
    path = write_seg(mask, sources, tmp_path / "seg.dcm")
    assert np.array_equal(read_seg(path, sources), mask)

    positions = {}  # (SOP instance UID, frame number or None): ImagePositionPatient
    for file in files:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        if multiframe:
            for number, group in enumerate(ds.PerFrameFunctionalGroupsSequence, 1):
                ipp = group.PlanePositionSequence[0].ImagePositionPatient
                positions[(ds.SOPInstanceUID, number)] = [float(v) for v in ipp]
        else:
            positions[(ds.SOPInstanceUID, None)] = [float(v) for v in ds.ImagePositionPatient]
    seg = pydicom.dcmread(path)
    referenced = {}
    for group in seg.PerFrameFunctionalGroupsSequence:
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        number = source.get("ReferencedFrameNumber")
        key = (source.ReferencedSOPInstanceUID, None if number is None else int(number))
        referenced[key] = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
    assert seg.NumberOfFrames == len(referenced) == 20
    assert referenced == positions
