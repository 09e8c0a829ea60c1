"""Synthetic MIMIC-IV v2.2 + MIMIC-CXR-JPG v2.0.0 generator driven by a latent patient state.

``generate`` writes the raw files in the official layouts plus ``oracle.parquet`` (the true
probability of every label per ICU stay) and ``signal_map.json`` (which modality carries each
label). The latent model lives in :mod:`ehrcxr.synthetic.state`, the cohort in
:mod:`~ehrcxr.synthetic.cohort`, chart/lab events in :mod:`~ehrcxr.synthetic.ehr` and
the X-rays in :mod:`~ehrcxr.synthetic.cxr`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ehrcxr.synthetic.cohort import build_cohort, write_core_tables, write_diagnoses
from ehrcxr.synthetic.cxr import (AVAILABILITY_DESCRIPTION, SERIAL_FILMS_DESCRIPTION, XRAY_TIMING_DESCRIPTION,
                                  write_cxr)
from ehrcxr.synthetic.ehr import (PULSE_OXIMETRY_DESCRIPTION, Physiology, write_chartevents, write_dictionaries,
                                  write_labevents)
from ehrcxr.synthetic.state import (LABELS, MORTALITY_DESCRIPTION, PREVALENCE, SIGNAL_CARRIERS,
                                         SIGNAL_MAP)

log = logging.getLogger("ehrcxr.synthetic")

__all__ = ["generate", "SIGNAL_MAP", "SIGNAL_CARRIERS", "PREVALENCE", "MORTALITY_DESCRIPTION", "signal_map"]


def signal_map() -> dict:
    """Content of signal_map.json: label -> "cxr"|"ehr"|"both"|"weak" (phenotypes and "mortality"),
    plus ``mortality_description``, ``cxr_availability_description`` (who gets an X-ray) and
    ``pulse_oximetry_description`` (the planted racial bias), ``serial_films_description`` (daily films) and
    ``xray_timing_description`` (what a film at hour t shows against one at t0 < t)."""
    return {**{label: SIGNAL_MAP[label] for label in [*LABELS, "mortality"]},
            "mortality_description": MORTALITY_DESCRIPTION, "cxr_availability_description": AVAILABILITY_DESCRIPTION,
            "pulse_oximetry_description": PULSE_OXIMETRY_DESCRIPTION,
            "serial_films_description": SERIAL_FILMS_DESCRIPTION, "xray_timing_description": XRAY_TIMING_DESCRIPTION}


def generate(out_dir: str | Path, n_stays: int = 6000, seed: int = 0, image_size: int = 128,
             n_corrupt_images: int = 2, cxr_paired_share: float = 0.265, signal_strength: float = 1.0) -> dict:
    """Write a synthetic MIMIC-IV + MIMIC-CXR-JPG dataset of ``n_stays`` ICU stays under ``out_dir``.

    Layout: ``mimic-iv/{hosp,icu}/*.csv.gz``, ``mimic-cxr-jpg/mimic-cxr-2.0.0-*.csv.gz`` and
    ``mimic-cxr-jpg/files/...jpg``, ``oracle.parquet``, ``signal_map.json``. Deterministic per seed.
    Returns the row count of every table written plus ``corrupt_images`` (relative paths of the
    JPEGs written truncated on purpose). ``cxr_paired_share``: expected share of stays with an AP image in their
    first 48 h (who is imaged is informative: see ``signal_map()['cxr_availability_description']``).
    ``signal_strength`` multiplies every latent severity before it reaches an EHR variable or an X-ray finding
    (1 = default; labels, the oracle and mortality are unchanged, only how visible they are).
    """
    if int(n_stays) != n_stays or n_stays < 10:
        raise ValueError(f"n_stays must be an integer >= 10, got {n_stays!r}")
    if int(image_size) != image_size or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    if not signal_strength > 0:
        raise ValueError(f"signal_strength must be positive, got {signal_strength!r}")
    if int(n_corrupt_images) != n_corrupt_images or n_corrupt_images < 0:
        raise ValueError(f"n_corrupt_images must be a non-negative integer, got {n_corrupt_images!r}")
    out = Path(out_dir)
    mimic_iv, mimic_cxr = out / "mimic-iv", out / "mimic-cxr-jpg"
    rng = np.random.default_rng(seed)
    started = time.perf_counter()

    cohort = build_cohort(rng, int(n_stays))
    counts: dict = write_core_tables(cohort, mimic_iv)
    counts.update(write_diagnoses(cohort, rng, mimic_iv))
    physiology = Physiology(cohort, rng, signal_strength=float(signal_strength))
    counts["chartevents"] = write_chartevents(cohort, physiology, rng, mimic_iv)
    counts["labevents"] = write_labevents(cohort, physiology, rng, mimic_iv)
    counts.update(write_dictionaries(mimic_iv))
    log.info("MIMIC-IV tables written after %.1f s", time.perf_counter() - started)
    counts.update(write_cxr(cohort, physiology, rng, mimic_cxr, int(image_size), int(n_corrupt_images),
                            float(cxr_paired_share)))
    log.info("MIMIC-CXR-JPG written after %.1f s", time.perf_counter() - started)

    admission = cohort.stays["admission_row"].to_numpy()
    oracle = pd.DataFrame({"stay_id": cohort.stays["stay_id"].to_numpy(),
                           "mortality": cohort.state.mortality_prob[admission]})
    for k, label in enumerate(LABELS):
        oracle[label] = cohort.state.phenotype_prob[admission, k]
    oracle.sort_values("stay_id").reset_index(drop=True).to_parquet(out / "oracle.parquet", index=False)
    (out / "signal_map.json").write_text(json.dumps(signal_map(), indent=2) + "\n")
    counts["oracle"] = len(oracle)
    log.info("synthetic dataset of %d stays written to %s in %.1f s (corrupt images: %s)", n_stays, out,
             time.perf_counter() - started, counts["corrupt_images"])
    return counts
