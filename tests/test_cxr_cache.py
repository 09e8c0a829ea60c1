"""CXR image cache: decoding, statuses of missing/truncated files, frontal-only selection, flat image folders."""
from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ehrcxr.data.cohort import build_cohort
from ehrcxr.data.cxr import build_cxr_cache, load_cxr_cache, run_cxr_cache
from ehrcxr.data.datasets import _cxr_rows
from tiny_mimic import mimic_cxr_tables, mimic_iv_tables, write_images, write_tables

SIZE = 8


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _expected_pixels(path, new_size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """PIL's own bilinear resize to ``new_size`` and crop ``box`` (worked out by hand per image)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize(new_size, Image.Resampling.BILINEAR).crop(box))


@pytest.fixture()
def cxr_tree(tmp_path):
    """Four readable JPEGs (one lateral), one truncated, one absent; cxr_studies lists them all."""
    rng = np.random.default_rng(0)
    root = tmp_path / "cxr"
    (root / "files").mkdir(parents=True)
    shapes = {"d1": (20, 10), "d2": (10, 30), "d3": (8, 8), "lat": (12, 12)}  # (height, width)
    for name, shape in shapes.items():
        gray = rng.integers(0, 256, size=shape, dtype=np.uint8)
        (root / "files" / f"{name}.jpg").write_bytes(_jpeg_bytes(gray))
    rgb = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    full = _jpeg_bytes(rgb)
    (root / "files" / "trunc.jpg").write_bytes(full[: len(full) // 2])
    studies = pd.DataFrame({
        "stay_id": [1, 1, 2, 3, 3, 4, 5, 5],
        "dicom_id": ["d1", "d1", "d2", "d3", "lat", "trunc", "gone", "d3"],
        "view_position": ["AP", "AP", "PA", "AP", "LATERAL", "AP", "PA", "AP"],
        "path": ["files/d1.jpg", "files/d1.jpg", "files/d2.jpg", "files/d3.jpg", "files/lat.jpg",
                 "files/trunc.jpg", "files/gone.jpg", "files/d3.jpg"],
    })
    return root, studies


@pytest.mark.parametrize("threads", [1, 2])
def test_cache_statuses_pixels_and_layout(cxr_tree, tmp_path, caplog, threads, monkeypatch):
    root, studies = cxr_tree
    monkeypatch.setattr("ehrcxr.data.cxr.CHUNK_SIZE", 2)  # several chunks, so the pool path really splits work
    images_path, index_path = tmp_path / "images.npy", tmp_path / "index.parquet"
    with caplog.at_level(logging.WARNING, logger="ehrcxr"):
        summary = build_cxr_cache(root, studies, SIZE, images_path, index_path, threads=threads)
    assert (summary["n_images"], summary["ok"], summary["missing"], summary["corrupt"]) == (5, 3, 1, 1)
    assert "files/trunc.jpg" in caplog.text and "files/gone.jpg" in caplog.text

    images, index = load_cxr_cache(images_path, index_path)
    assert isinstance(images, np.memmap) and images.dtype == np.uint8 and images.shape == (5, SIZE, SIZE)
    # unique frontal images sorted by dicom_id; the lateral one never enters the cache
    assert index["dicom_id"].tolist() == ["d1", "d2", "d3", "gone", "trunc"]
    assert index["status"].tolist() == ["ok", "ok", "ok", "missing", "corrupt"]
    assert index["row"].tolist() == [0, 1, 2, -1, -1]

    # d1 is 10 wide x 20 high -> 8 x 16, crop rows 4..12; d2 is 30 x 10 -> 24 x 8, crop columns 8..16;
    # d3 is already 8 x 8.
    files = root / "files"
    np.testing.assert_array_equal(images[0], _expected_pixels(files / "d1.jpg", (8, 16), (0, 4, 8, 12)))
    np.testing.assert_array_equal(images[1], _expected_pixels(files / "d2.jpg", (24, 8), (8, 0, 16, 8)))
    np.testing.assert_array_equal(images[2], _expected_pixels(files / "d3.jpg", (8, 8), (0, 0, 8, 8)))


def test_run_cxr_cache_reads_parquet_and_rejects_bad_columns(cxr_tree, tmp_path):
    root, studies = cxr_tree
    studies_path = tmp_path / "cxr_studies.parquet"
    studies.to_parquet(studies_path)
    summary = run_cxr_cache(root, studies_path, tmp_path / "a.npy", tmp_path / "a.parquet", image_size=4, threads=1)
    assert summary["ok"] == 3 and np.load(tmp_path / "a.npy").shape == (5, 4, 4)
    with pytest.raises(ValueError, match="view_position"):
        build_cxr_cache(root, studies.drop(columns="view_position"), 4, tmp_path / "b.npy", tmp_path / "b.parquet")


def test_empty_cache(tmp_path):
    studies = pd.DataFrame({"dicom_id": ["x"], "view_position": ["LL"], "path": ["x.jpg"]})
    summary = build_cxr_cache(tmp_path, studies, 4, tmp_path / "e.npy", tmp_path / "e.parquet")
    images, index = load_cxr_cache(tmp_path / "e.npy", tmp_path / "e.parquet")
    assert summary["n_images"] == 0 and images.shape == (0, 4, 4) and index.empty


# The 11 frontal (AP/PA) candidates of the tiny cohort, in dicom_id order = their cache rows.
TINY_FRONTAL = ["s1-ap-minus14h", "s1-ap-plus22h-a", "s1-ap-plus22h-b", "s1-ap-plus5h", "s1-ap-plus60h",
                "s1-pa-plus34h", "s3-ap-plus10h", "s5-ap-at-intime", "s5-ap-minus1h", "s5-ap-plus50h",
                "s8-pa-plus6h"]


@pytest.fixture()
def flat_tiny(tmp_path):
    """The tiny dataset with its JPEGs as <dicom_id>.jpg in one folder outside the MIMIC-CXR-JPG root."""
    iv_root, cxr_root, images_root = tmp_path / "mimic-iv", tmp_path / "mimic-cxr-jpg", tmp_path / "jpg-flat"
    write_tables(iv_root, mimic_iv_tables())
    write_tables(cxr_root, mimic_cxr_tables())
    write_images(images_root, layout="flat")
    stays, cxr_studies = build_cohort(iv_root, cxr_root, cxr_image_layout="flat")
    return images_root, stays, cxr_studies


def test_flat_layout_in_separate_folder_is_cached(flat_tiny, tmp_path):
    images_root, _, cxr_studies = flat_tiny
    summary = build_cxr_cache(images_root, cxr_studies, SIZE, tmp_path / "i.npy", tmp_path / "i.parquet")
    assert (summary["n_images"], summary["ok"], summary["missing"], summary["corrupt"]) == (11, 11, 0, 0)
    images, index = load_cxr_cache(tmp_path / "i.npy", tmp_path / "i.parquet")
    assert index["dicom_id"].tolist() == TINY_FRONTAL and index["row"].tolist() == list(range(11))
    for row, dicom in enumerate(TINY_FRONTAL):  # 8x8 files at 8 px: PIL's identity resize of the flat file
        np.testing.assert_array_equal(images[row], _expected_pixels(images_root / f"{dicom}.jpg", (8, 8),
                                                                    (0, 0, 8, 8)))


def test_absent_paired_image_leaves_only_its_stay_without_cxr(flat_tiny, tmp_path, caplog):
    images_root, stays, cxr_studies = flat_tiny
    (images_root / "s3-ap-plus10h.jpg").unlink()  # the paired image of stay 30000003
    index_path = tmp_path / "i.parquet"
    with caplog.at_level(logging.WARNING, logger="ehrcxr"):
        summary = build_cxr_cache(images_root, cxr_studies, SIZE, tmp_path / "i.npy", index_path)
    assert (summary["n_images"], summary["ok"], summary["missing"], summary["corrupt"]) == (11, 10, 1, 0)
    assert f"missing CXR image {images_root / 's3-ap-plus10h.jpg'}" in caplog.text
    index = pd.read_parquet(index_path).set_index("dicom_id")
    assert index.loc["s3-ap-plus10h"].tolist() == [-1, "missing", ""]
    assert (index.drop("s3-ap-plus10h")["status"] == "ok").all()
    # The stay stays in the cohort; only its CXR is gone (cache row -1, as for unpaired stays).
    rows = dict(zip(stays["stay_id"], _cxr_rows(stays, index_path)))
    assert rows == {30000001: 2, 30000003: -1, 30000004: -1, 30000008: -1, 30000009: -1, 30000051: -1,
                    30000052: 7}
