"""CXR image cache: decoding, statuses of missing/truncated files, frontal-only selection."""
from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ehrcxr.data.cxr import build_cxr_cache, load_cxr_cache, run_cxr_cache

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
