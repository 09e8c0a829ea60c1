"""Chest X-ray image cache: every usable frontal JPEG decoded once into a memory-mapped uint8 array."""
from __future__ import annotations

import logging
import multiprocessing
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, UnidentifiedImageError

log = logging.getLogger("ehrcxr.cxr")

FRONTAL_VIEWS = ("AP", "PA")
STATUSES = ("ok", "missing", "corrupt")
CHUNK_SIZE = 256


# PIL modes whose values exceed 8 bits (16-bit PNG/TIFF, e.g. converted from DICOM; 32-bit integer or float).
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_8bit_grayscale(image: Image.Image) -> Image.Image:
    """An 8-bit grayscale ('L') version of ``image``.

    8-bit inputs (L, RGB, CMYK, palette, ...) go through PIL's own conversion. High-bit-depth inputs
    (:data:`HIGH_BIT_DEPTH_MODES`) are mapped by their own range, as MIMIC-CXR-JPG itself was made from DICOM:
    ``round((v - min) / (max - min) * 255)`` over the image's pixels (round half to even), so a 12-bit image
    in a 16-bit container fills 0-255 instead of saturating at 255; a constant image becomes 0.
    """
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image.convert("L")
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{image.mode} image holds non-finite values")
    low, high = values.min(), values.max()
    scaled = np.zeros(values.shape) if high == low else (values - low) * (255.0 / (high - low))
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def decode_image(path: str | Path, image_size: int) -> tuple[np.ndarray, str]:
    """Decode one image as 8-bit grayscale (:func:`to_8bit_grayscale`), resize its shorter side to
    ``image_size`` (bilinear) and centre-crop to ``image_size`` x ``image_size``. Returns the uint8 array and
    the file's PIL mode (e.g. 'L', 'RGB', 'I;16'). Truncated or unreadable files raise OSError.

    Large JPEGs are first DCT-downscaled by PIL's ``draft`` while keeping the shorter side at least
    2 x ``image_size`` (no effect on images smaller than 4 x ``image_size``, nor on other formats).
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(path) as image:
        mode = image.mode
        image.draft("L", (2 * image_size, 2 * image_size))
        image = to_8bit_grayscale(image)
        width, height = image.size
        if width <= height:
            new_width, new_height = image_size, max(image_size, int(round(height * image_size / width)))
        else:
            new_width, new_height = max(image_size, int(round(width * image_size / height))), image_size
        resized = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
        left = (new_width - image_size) // 2
        top = (new_height - image_size) // 2
        cropped = resized.crop((left, top, left + image_size, top + image_size))
        return np.asarray(cropped, dtype=np.uint8), mode


def _decode_chunk(task: tuple[str, list[str], int, int]) -> tuple[int, list[str], list[str], list[str]]:
    """Worker: decode ``paths`` into rows ``start..`` of the memmap at ``images_path``; returns statuses,
    input modes ('' when not decoded) and messages."""
    images_path, paths, start, image_size = task
    images = np.load(images_path, mmap_mode="r+")
    statuses, modes, messages = [], [], []
    for offset, path in enumerate(paths):
        mode, message = "", ""
        if not Path(path).is_file():
            status, message = "missing", f"missing CXR image {path}"
        else:
            try:
                images[start + offset], mode = decode_image(path, image_size)
                status = "ok"
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
                status, message = "corrupt", f"corrupt CXR image {path}: {error}"
        statuses.append(status)
        modes.append(mode)
        messages.append(message)
    images.flush()
    del images
    return start, statuses, modes, messages


def frontal_images(cxr_studies: pd.DataFrame) -> pd.DataFrame:
    """Unique frontal (AP/PA) images of ``cxr_studies`` as (dicom_id, path), sorted by dicom_id."""
    missing_columns = {"dicom_id", "view_position", "path"} - set(cxr_studies.columns)
    if missing_columns:
        raise ValueError(f"cxr_studies lacks column(s) {sorted(missing_columns)}")
    frontal = cxr_studies.loc[cxr_studies["view_position"].isin(FRONTAL_VIEWS), ["dicom_id", "path"]]
    frontal = frontal.drop_duplicates("dicom_id").sort_values("dicom_id").reset_index(drop=True)
    if frontal["path"].isna().any():
        bad = frontal.loc[frontal["path"].isna(), "dicom_id"].iloc[0]
        raise ValueError(f"cxr_studies: frontal image {bad} has no path")
    return frontal


def build_cxr_cache(images_root: str | Path, cxr_studies: pd.DataFrame, image_size: int,
                    out_images: str | Path, out_index: str | Path, threads: int = 1) -> dict:
    """Decode every unique frontal image of ``cxr_studies`` (``path`` relative to ``images_root``) once into
    ``out_images`` (uint8 (N, S, S) .npy) and write ``out_index`` (dicom_id, row, status, input_mode).
    Missing/corrupt files are logged, get row -1 and do not stop the run. Returns counts per status and per
    input mode of the decoded images, the number of images and the seconds taken."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    started = time.perf_counter()
    frontal = frontal_images(cxr_studies)
    n_images = len(frontal)
    Path(out_images).parent.mkdir(parents=True, exist_ok=True)
    Path(out_index).parent.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(out_images, mode="w+", dtype=np.uint8, shape=(n_images, image_size, image_size))
    images.flush()
    del images
    paths = [str(Path(images_root) / relative) for relative in frontal["path"]]
    tasks = [(str(out_images), paths[start:start + CHUNK_SIZE], start, image_size)
             for start in range(0, n_images, CHUNK_SIZE)]
    statuses = np.empty(n_images, dtype=object)
    modes = np.empty(n_images, dtype=object)
    threads = max(1, int(threads))
    if threads == 1 or len(tasks) <= 1:
        results = map(_decode_chunk, tasks)
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(threads)
        results = pool.imap_unordered(_decode_chunk, tasks)
    try:
        done = 0
        for start, chunk_statuses, chunk_modes, messages in results:
            statuses[start:start + len(chunk_statuses)] = chunk_statuses
            modes[start:start + len(chunk_modes)] = chunk_modes
            for message in messages:
                if message:
                    log.warning(message)
            done += len(chunk_statuses)
            if len(tasks) > 1:
                log.info("decoded %d/%d CXR images", done, n_images)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    statuses = statuses.astype(str) if n_images else np.array([], dtype=str)
    modes = modes.astype(str) if n_images else np.array([], dtype=str)
    ok = statuses == "ok"
    index = pd.DataFrame({
        "dicom_id": frontal["dicom_id"].astype(str).to_numpy(),
        "row": np.where(ok, np.arange(n_images), -1).astype(np.int64),
        "status": statuses,
        "input_mode": modes,
    })
    index.to_parquet(out_index, index=False)
    counts = {status: int((statuses == status).sum()) for status in STATUSES}
    by_mode = dict(sorted(Counter(modes[ok].tolist()).items()))
    seconds = time.perf_counter() - started
    log.info("CXR cache: %d frontal images (%s) at %dx%d px in %.1f s", n_images,
             ", ".join(f"{k} {v}" for k, v in counts.items()), image_size, image_size, seconds)
    log.info("CXR cache: decoded images per input mode: %s",
             ", ".join(f"{mode} {n}" for mode, n in by_mode.items()) or "none")
    high = sum(n for mode, n in by_mode.items() if mode in HIGH_BIT_DEPTH_MODES)
    if high:
        log.warning("CXR cache: %d high-bit-depth images mapped to 8 bits by their own min-max range", high)
    return {"n_images": n_images, **counts, "modes": by_mode, "seconds": seconds}


def run_cxr_cache(images_root: str | Path, cxr_studies_path: str | Path, out_images: str | Path,
                  out_index: str | Path, image_size: int, threads: int = 1) -> dict:
    """Workflow entry point: read cohort/cxr_studies.parquet and build the cache from the JPEGs under
    ``images_root`` (config ``raw.cxr_images``, by default the MIMIC-CXR-JPG root)."""
    cxr_studies = pd.read_parquet(cxr_studies_path)
    return build_cxr_cache(images_root, cxr_studies, int(image_size), out_images, out_index, threads=threads)


def load_cxr_cache(images_path: str | Path, index_path: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The memory-mapped (read-only) image array and the index DataFrame of a cache."""
    images = np.load(images_path, mmap_mode="r")
    index = pd.read_parquet(index_path)
    missing_columns = {"dicom_id", "row", "status"} - set(index.columns)
    if missing_columns:
        raise ValueError(f"{index_path}: missing column(s) {sorted(missing_columns)}")
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected a uint8 (N, S, S) array, got {images.dtype} {images.shape}")
    if len(index) and int(index["row"].max()) >= images.shape[0]:
        raise ValueError(f"{index_path}: row {int(index['row'].max())} beyond {images.shape[0]} cached images")
    return images, index
