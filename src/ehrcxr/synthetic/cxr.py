"""Synthetic MIMIC-CXR-JPG: studies at realistic times, images rendered from the latent state, CheXpert labels.

Each image shows the state at its own acquisition time: heart width (CHF up, shock down) and
perihilar edema (CHF, acute MI), focal consolidation (pneumonia), lower-zone patchy opacities
(other lower respiratory), diffuse opacities (respiratory failure), a basal effusion and an
apical/lateral rim without lung markings (pleurisy/pneumothorax), hyperinflation (COPD: taller,
darker lung fields reaching a low diaphragm), thin chest-wall soft tissue (frailty, a mortality
factor), devices (ET tube when ventilated, right jugular central line with shock, left PICC with
sepsis) and now and then a nodule; position, contrast and noise vary.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from ehrcxr.synthetic import io as sio
from ehrcxr.synthetic import state as st
from ehrcxr.data.raw import cxr_image_relpath
from ehrcxr.synthetic.cohort import HOUR, Cohort
from ehrcxr.synthetic.ehr import Physiology
from ehrcxr.resources import CHEXPERT_LABELS

JPEG_QUALITY = 85
RENDER_BATCH = 128
CXR_AVAILABILITY_OFFSET = {"WHITE": 0.1, "BLACK": -0.3, "HISPANIC": -0.45, "ASIAN": 0.0, "OTHER": -0.25}
PROCEDURE = {"AP": "CHEST (PORTABLE AP)", "PA": "CHEST (PA AND LAT)", "LATERAL": "CHEST (PA AND LAT)",
             "": "CHEST (SINGLE VIEW)"}
VIEW_CODE = {"AP": "antero-posterior", "PA": "postero-anterior", "LATERAL": "lateral", "": None}
# Study kinds (rows): 0 portable AP, 1 two AP images, 2 PA + LATERAL, 3 one frontal without ViewPosition;
# columns: the views of the study's images (None: no such image).
STUDY_VIEWS = np.array([["AP", None], ["AP", "AP"], ["PA", "LATERAL"], ["", None]], dtype=object)
IMAGES_PER_STUDY = np.array([1, 2, 2, 1])

# Per-image inputs of the renderer: finding strengths (0-1 or heart half-width) and lesion anatomy.
FINDINGS = ["heart_width", "edema", "consolidation", "lower_opacity", "diffuse_opacity", "effusion",
            "pneumothorax", "et_tube", "central_line", "swan_ganz", "picc", "nodule", "hyperinflation", "frailty",
            "lesion_side",
            "lesion_dx", "consolidation_y", "nodule_x", "nodule_y"]


def _texture_bank(rng: np.random.Generator, size: int, count: int, low: float, high: float) -> np.ndarray:
    """Band-limited noise fields (count, size, size), zero mean and unit std, frequencies in [low, high]."""
    noise = rng.standard_normal((count, size, size))
    fy = np.fft.fftfreq(size)[:, None] * size
    fx = np.fft.fftfreq(size)[None, :] * size
    radius = np.hypot(fx, fy)
    band = ((radius >= low) & (radius <= high)).astype(float)
    fields = np.real(np.fft.ifft2(np.fft.fft2(noise) * band))
    fields = (fields - fields.mean(axis=(1, 2), keepdims=True)) / fields.std(axis=(1, 2), keepdims=True)
    return np.concatenate([fields, fields[:, :, ::-1]]).astype(np.float32)


def _ellipse(x, y, cx, cy, ax, ay):
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2


def _soft(z, sharpness):
    """Smooth step from 0 to 1 around z = 0 (a logistic written with tanh: no overflow)."""
    return 0.5 + 0.5 * np.tanh(0.5 * sharpness * z)


def _segment(x, y, start, end, width):
    """Brightness of a line of ``width`` from start to end (per-image (B,) coordinates allowed)."""
    ax, ay = [np.asarray(v, dtype=np.float32).reshape(-1, 1, 1) for v in start]
    bx, by = [np.asarray(v, dtype=np.float32).reshape(-1, 1, 1) for v in end]
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    distance2 = (x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2
    return np.exp(-distance2 / (width * width))


@dataclass
class TextureBanks:
    """Lung-marking (fine) and opacity (coarse) textures shared by all renders of one dataset."""

    fine: np.ndarray
    coarse: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, size: int) -> "TextureBanks":
        return cls(_texture_bank(rng, size, 24, size / 16, size / 5), _texture_bank(rng, size, 24, 1.5, 5.0))


def render_images(f: dict[str, np.ndarray], lateral: np.ndarray, size: int, rng: np.random.Generator,
                  banks: TextureBanks) -> np.ndarray:
    """Render a batch of images (B, size, size) uint8 from per-image finding arrays ``f`` (see FINDINGS)."""
    missing = [name for name in FINDINGS if name not in f]
    if missing:
        raise KeyError(f"render_images: missing finding array(s) {', '.join(missing)}")
    n = len(lateral)
    grid = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    dx, dy = rng.normal(0, 0.04, n).astype(np.float32), rng.normal(0, 0.04, n).astype(np.float32)
    scale = (1 + rng.normal(0, 0.04, n)).astype(np.float32)
    x = ((grid[None, None, :] - dx[:, None, None]) / scale[:, None, None])
    y = ((grid[None, :, None] - dy[:, None, None]) / scale[:, None, None])
    fine = banks.fine[rng.integers(0, len(banks.fine), n)]
    coarse = np.abs(banks.coarse[rng.integers(0, len(banks.coarse), n)])
    coarse2 = np.abs(banks.coarse[rng.integers(0, len(banks.coarse), n)])

    def col(name):
        return f[name].astype(np.float32)[:, None, None]

    frontal = ~lateral[:, None, None]
    inflation = col("hyperinflation")
    height = 1.0 + 0.2 * inflation  # hyperinflated lungs reach a lower, flatter diaphragm
    side = col("lesion_side")       # +1/-1: image side of the consolidation / pneumothorax / effusion
    heart_w = col("heart_width")

    # Frontal geometry.
    frail = col("frailty")  # thin chest-wall soft tissue: narrower, fainter body outline
    body_f = _soft(1 - _ellipse(x, y, 0, 0.1, 0.9 - 0.08 * frail, 1.1), 12)
    lung_y = -0.05 + 0.3 * (height - 1.0)
    r_left = _ellipse(x, y, -0.36, lung_y, 0.25, 0.6 * height)
    r_right = _ellipse(x, y, 0.36, lung_y, 0.25, 0.6 * height)
    lung_left, lung_right = _soft(1 - r_left, 10), _soft(1 - r_right, 10)
    lungs_f = np.maximum(lung_left, lung_right)
    r_side = np.where(side > 0, r_right, r_left)
    lung_side = np.where(side > 0, lung_right, lung_left)
    heart_f = _soft(1 - _ellipse(x, y, 0.07, 0.32, heart_w, 0.24), 10)
    mediastinum = _soft(0.11 - np.abs(x), 40) * _soft(0.15 - y, 20) * _soft(y + 0.75, 20)
    # Lateral geometry.
    body_l = _soft(1 - _ellipse(x, y, 0, 0.05, 0.85 - 0.08 * frail, 1.05), 12)
    lungs_l = _soft(1 - _ellipse(x, y, 0.05, -0.05, 0.55, 0.62 * height), 8)
    heart_l = _soft(1 - _ellipse(x, y, -0.28, 0.3, 1.3 * heart_w, 0.26), 10)
    spine_l = _soft(0.08 - np.abs(x - 0.58), 40) * (0.8 + 0.2 * np.sin(y * 30))

    body = np.where(frontal, body_f, body_l)
    lungs = np.where(frontal, lungs_f, lungs_l)
    heart = np.where(frontal, heart_f, heart_l)
    image = 0.06 + (0.36 - 0.05 * frail) * body + np.where(frontal, 0.22 * mediastinum + 0.08 * _soft(0.05 - np.abs(x), 60),
                                          0.25 * spine_l)
    image = image - (0.24 + 0.1 * inflation) * lungs

    # Pneumothorax: an apical/lateral rim of one lung without markings, bounded by a thin pleural line.
    ptx = col("pneumothorax")
    edge = 1 - 0.7 * ptx
    upper = _soft(0.1 - y, 10) * frontal * (ptx > 0.05)
    rim = _soft(r_side - edge, 30) * lung_side * upper
    pleural_line = np.exp(-((r_side - edge) / 0.04) ** 2) * lung_side * upper
    image = image + lungs * (0.07 * fine * (1 - rim) * (1.2 - 0.5 * np.minimum(r_side, 1)))
    image = image - 0.3 * rim + 0.12 * pleural_line

    # Heart over the lungs; edema haze around the hila.
    image = image * (1 - 0.9 * heart) + 0.56 * heart
    hila = np.where(frontal, np.exp(-(((np.abs(x) - 0.2) / 0.18) ** 2 + ((y - 0.05) / 0.3) ** 2)),
                    np.exp(-((x / 0.3) ** 2 + (y / 0.3) ** 2)))
    image = image + 0.3 * col("edema") * hila * lungs
    # Opacities: lower-zone patches, diffuse bilateral, focal consolidation.
    image = image + 0.42 * col("lower_opacity") * coarse * _soft(y - 0.05, 8) * lungs
    image = image + 0.22 * col("diffuse_opacity") * coarse2 * lungs
    cx = np.where(frontal, side * 0.36, side * 0.15) + col("lesion_dx")
    cy = col("consolidation_y")
    image = image + 0.75 * col("consolidation") * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.06) * lungs
    # Effusion: fluid at the base of one lung (posterior base on the lateral) with a meniscus.
    effusion = col("effusion")
    level = 0.58 - 0.45 * effusion
    meniscus_f = _soft(y - (level - 0.18 * effusion * np.clip((x * side - 0.1) / 0.45, 0, 1)), 25) * lung_side
    meniscus_l = _soft(y - level, 25) * _soft(x - 0.05, 10) * lungs_l
    image = image + 0.45 * effusion * np.where(frontal, meniscus_f, meniscus_l)
    # Nodule.
    image = image + 0.3 * col("nodule") * np.exp(-((x - col("nodule_x")) ** 2 + (y - col("nodule_y")) ** 2) / 0.0025)
    # Devices.
    width = 2.2 / size
    tube_x = np.where(lateral, -0.3, 0.0)
    tube = _segment(x, y, (tube_x, -np.ones(n)), (tube_x, np.full(n, -0.36)), width)
    line = _segment(x, y, (np.full(n, -0.45), np.full(n, -0.95)), (np.full(n, -0.1), np.full(n, -0.3)), width)
    picc = np.maximum(_segment(x, y, (np.full(n, 0.95), np.full(n, -0.5)), (np.full(n, 0.35), np.full(n, -0.62)),
                               width),
                      _segment(x, y, (np.full(n, 0.35), np.full(n, -0.62)), (np.full(n, 0.06), np.full(n, -0.33)),
                               width))
    # Pulmonary-artery (Swan-Ganz) catheter: the jugular line continued through the heart.
    swan = np.maximum(_segment(x, y, (np.full(n, -0.1), np.full(n, -0.3)), (np.full(n, 0.02), np.full(n, 0.25)),
                               width),
                      _segment(x, y, (np.full(n, 0.02), np.full(n, 0.25)), (np.full(n, 0.3), np.full(n, -0.02)),
                               width))
    image = image + 0.5 * col("et_tube") * tube + 0.45 * col("central_line") * line * frontal \
        + 0.45 * col("picc") * picc * frontal + 0.45 * col("swan_ganz") * swan * frontal

    # Acquisition: gamma, contrast, brightness, noise.
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.8, 1.25, n).astype(np.float32)[:, None, None]
    image = image * rng.uniform(0.85, 1.15, n).astype(np.float32)[:, None, None] \
        + rng.uniform(-0.05, 0.05, n).astype(np.float32)[:, None, None]
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * 0.02
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


# Who gets a chest X-ray: the logit of being imaged at all rises with acuity and with the respiratory and cardiac
# severities that make clinicians order one (and place lines whose position it checks), with a longer ICU stay,
# and differs by race group (CXR_AVAILABILITY_OFFSET); its intercept is solved so that the expected share of stays
# with a paired image (an AP image in the first PAIRING_WINDOW_HOURS) equals the requested one.
IMAGING_ACUITY = 0.6
IMAGING_SEVERITY = {"ph_respiratory_failure": 0.5, "ph_pneumonia": 0.3, "ph_chf": 0.3, "ph_shock": 0.25,
                    "ph_septicemia": 0.15}
IMAGING_LOS = 0.3           # per unit of log(ICU LOS / 48 h), clipped to +-1.5
PAIRING_WINDOW_HOURS = 48.0
AVAILABILITY_DESCRIPTION = (
    "A stay is imaged at all with probability sigmoid(b + 0.6 acuity + 0.5 s_respiratory_failure + 0.3 s_pneumonia "
    "+ 0.3 s_chf + 0.25 s_shock + 0.15 s_septicemia + 0.3 clip(log(ICU LOS / 48 h), -1.5, 1.5) + race offset "
    "(WHITE +0.1, ASIAN 0, OTHER -0.25, BLACK -0.3, HISPANIC -0.45)); severities at hour 24 of the admission. b is "
    "solved so that the expected share of stays with an AP image in the first 48 h equals synthetic.cxr_paired_share "
    "(real MIMIC-IV + MIMIC-CXR: 26.5%, CareBench). Sicker, respiratory and cardiac patients are imaged more: the "
    "X-ray is missing not at random, unlike the miss<r> settings.")

# Repeat films of the stays with a paired image (an AP image in the first 48 h), calibrated to DDL-CXR's cohort
# (Chenliu-svg/DDL-CXR data_pre/: 1.64 pairs per prediction stay, 57% of them with a pair; X-ray age at 48 h median
# 21.2 h, IQR 10.3-43.5 h): a film in the emergency department or ward before ICU admission, and for the sickest (on a
# ventilator, high acuity) a portable AP film every ICU morning. Who has a paired image does not change.
SERIAL_INTERCEPT = -2.5
SERIAL_ACUITY = 0.8
SERIAL_VENTILATED = 1.5
SERIAL_DAYS = 3.0            # films on the mornings of the first 72 ICU hours
SERIAL_ROUND_HOURS = (5.0, 8.0)  # clock time of the morning film
PRE_ICU_FILM_CHANCE = 0.55
PRE_ICU_FILM_HOURS = (2.0, 24.0)  # hours before intime
SERIAL_FILMS_DESCRIPTION = (
    f"Repeat films of a stay with an AP image in its first 48 h: with probability {PRE_ICU_FILM_CHANCE:g} an AP film "
    f"{PRE_ICU_FILM_HOURS[0]:g}-{PRE_ICU_FILM_HOURS[1]:g} h before ICU admission (emergency department or ward), and "
    f"with probability sigmoid({SERIAL_INTERCEPT:g} + {SERIAL_ACUITY:g} acuity + {SERIAL_VENTILATED:g} ventilated at "
    f"hour 12) a portable AP film every ICU morning (clock {SERIAL_ROUND_HOURS[0]:g}-{SERIAL_ROUND_HOURS[1]:g} h, "
    f"fixed per stay) in the first {24 * SERIAL_DAYS:g} h. Calibrated to DDL-CXR's cohort: 1.64 pairs (x0, x1 more "
    "than 12 h apart in [intime - 24 h, intime + 48 h]) per prediction stay and a median X-ray age at 48 h of 21 h.")
XRAY_TIMING_DESCRIPTION = (
    "An X-ray shows the state at its own acquisition time t: every acute severity drifts linearly in time (slope "
    f"per day ~ N(0, {st.ACUTE_SLOPE_SD:g}), chronic ones do not), so a film at hour t differs from one at t0 < t by (t - t0) times "
    "the drift of each visible finding (heart width, edema, consolidation, opacities, effusion, pneumothorax, "
    "hyperinflation), and devices follow the state at t (ET tube while ventilated, central line with shock, PICC "
    "with sepsis). The EHR of [t0, t1] carries the same drifting severities (its EHR facets), so it tells how the "
    "picture changed. Labels (oracle.parquet) stay the admission's label truth, not any film's.")


def imaging_score(cohort: Cohort, physiology: Physiology) -> np.ndarray:
    """Per stay, the logit of being imaged without its intercept (see AVAILABILITY_DESCRIPTION)."""
    stays, state = cohort.stays, cohort.state
    admission = stays["admission_row"].to_numpy()
    at_day_one = stays["offset_hours"].to_numpy() + st.REFERENCE_HOUR
    los = (stays["outtime"] - stays["intime"]).to_numpy() / HOUR
    score = IMAGING_ACUITY * state.acuity[admission]
    for label, weight in IMAGING_SEVERITY.items():
        score = score + weight * state.total(label, admission, at_day_one)
    score = score + IMAGING_LOS * np.clip(np.log(los / PAIRING_WINDOW_HOURS), -1.5, 1.5)
    return score + np.array([CXR_AVAILABILITY_OFFSET[g] for g in physiology.race_group])


def repeat_films(cohort: Cohort, physiology: Physiology, eligible: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(stay, hours from intime) of the repeat AP films (pre-ICU and serial morning films, SERIAL_FILMS_DESCRIPTION)
    of the ``eligible`` stays."""
    stays = cohort.stays
    n = len(stays)
    admission = stays["admission_row"].to_numpy()
    ventilated = physiology.ventilated(np.arange(n), np.full(n, 12.0)).astype(float)
    chance = st.sigmoid(SERIAL_INTERCEPT + SERIAL_ACUITY * cohort.state.acuity[admission]
                        + SERIAL_VENTILATED * ventilated)
    serial = eligible & (rng.random(n) < chance)
    round_clock = rng.uniform(*SERIAL_ROUND_HOURS, n)
    intime_clock = (stays["intime"].to_numpy() % (24 * HOUR)) / HOUR
    first = (round_clock - intime_clock) % 24.0  # the first morning round after intime
    los = (stays["outtime"] - stays["intime"]).to_numpy() / HOUR
    days = np.arange(int(np.ceil(SERIAL_DAYS)))
    hours = first[:, None] + 24.0 * days[None, :] + rng.normal(0.0, 0.3, (n, days.size))
    taken = serial[:, None] & (hours < np.minimum(los, 24.0 * SERIAL_DAYS)[:, None]) & (hours > 0)
    stay_index = np.broadcast_to(np.arange(n)[:, None], hours.shape)
    pre_icu = eligible & (rng.random(n) < PRE_ICU_FILM_CHANCE)
    pre_hours = -rng.uniform(*PRE_ICU_FILM_HOURS, n)
    return np.r_[stay_index[taken], np.flatnonzero(pre_icu)], np.r_[hours[taken], pre_hours[pre_icu]]


def draw_studies(cohort: Cohort, physiology: Physiology, rng: np.random.Generator,
                 paired_share: float = 0.265) -> pd.DataFrame:
    """One row per image: stay, study number, time (hours from intime), view position. Every stay first gets a
    candidate imaging history; the stays imaged at all are then drawn from ``imaging_score`` with the intercept
    that makes the expected share of stays with a paired image (AP, first 48 h) equal ``paired_share``."""
    if not 0.0 < paired_share < 1.0:
        raise ValueError(f"paired_share must lie in (0, 1), got {paired_share!r}")
    stays = cohort.stays
    n = len(stays)
    los = (stays["outtime"] - stays["intime"]).to_numpy() / HOUR
    count = 1 + np.minimum(rng.poisson(0.6, n), 4)
    stay = np.repeat(np.arange(n), count)
    first = np.r_[True, np.diff(stay) != 0] if len(stay) else np.zeros(0, bool)
    span = los[stay]
    early_end = np.minimum(PAIRING_WINDOW_HOURS, span)
    kind = rng.random(len(stay))
    hours = np.where(kind < 0.12, -rng.uniform(2.0, 96.0, len(stay)),
                     np.where(kind < 0.82, 0.2 + (early_end - 0.2) * rng.random(len(stay)) ** 1.3,
                              np.where(span > 50, 48.0 + (span - 48.0) * rng.random(len(stay)),
                                       span * rng.random(len(stay)))))
    later = ~first
    extra_kind = rng.random(len(stay))
    hours[later] = np.where(extra_kind[later] < 0.15, -rng.uniform(2.0, 96.0, int(later.sum())),
                            span[later] * rng.random(int(later.sum())))
    hours = np.clip(hours, -96.0, span - 0.05)
    before_stay = hours < 0
    view_draw = rng.random(len(stay))
    study_kind = np.where(before_stay, np.digitize(view_draw, [0.47, 0.5, 0.95]),
                          np.digitize(view_draw, [0.86, 0.89, 0.97]))
    pairing = np.isin(study_kind, (0, 1)) & (hours >= 0) & (hours <= PAIRING_WINDOW_HOURS)
    would_pair = np.bincount(stay[pairing], minlength=n) > 0
    # expected paired share = sum over would-pair stays of sigmoid(score + b) / n: solve b on those stays
    candidates = int(would_pair.sum())
    if candidates <= paired_share * n:
        raise ValueError(f"paired_share {paired_share} is unreachable: only {candidates} of {n} stays have an AP image "
                         f"in the first {PAIRING_WINDOW_HOURS:.0f} h even when all are imaged")
    score = imaging_score(cohort, physiology)
    intercept = st.solve_intercepts(score[would_pair][:, None], np.array([paired_share * n / candidates]))[0]
    imaged = rng.random(n) < st.sigmoid(score + intercept)
    keep = imaged[stay]
    repeat_stay, repeat_hours = repeat_films(cohort, physiology, imaged & would_pair, rng)
    studies = pd.DataFrame({"stay": np.r_[stay[keep], repeat_stay], "hours": np.r_[hours[keep], repeat_hours],
                            "kind": np.r_[study_kind[keep], np.zeros(len(repeat_stay), dtype=study_kind.dtype)]})
    studies = studies.sort_values(["stay", "hours"], kind="stable").reset_index(drop=True)
    studies["study_id"] = rng.permutation(sio.unique_ids(rng, len(studies), 50_000_000, 60_000_000))
    studies["ms"] = rng.integers(0, 1000, len(studies))
    n_images = IMAGES_PER_STUDY[studies["kind"].to_numpy()]
    images = studies.loc[studies.index.repeat(n_images)].reset_index(drop=True)
    image_number = np.arange(len(images)) - np.repeat(np.cumsum(n_images) - n_images, n_images)
    images["view"] = STUDY_VIEWS[images["kind"].to_numpy(), image_number]
    images["dicom_id"] = sio.hex_ids(rng, len(images))
    return images


def study_findings(cohort: Cohort, physiology: Physiology, studies: pd.DataFrame,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Finding strengths of each study (rows of ``studies``, one per study) from the state at its time (each
    severity scaled by ``physiology.signal_strength``, as for the EHR variables)."""
    state = cohort.state

    def visible(label: str, admission: np.ndarray, hours: np.ndarray) -> np.ndarray:
        return physiology.signal_strength * state.cxr_facet(label, admission, hours)

    stays = cohort.stays
    s = studies["stay"].to_numpy()
    adm = stays["admission_row"].to_numpy()[s]
    t = stays["offset_hours"].to_numpy()[s] + studies["hours"].to_numpy()
    m = len(s)
    chf = visible("ph_chf", adm, t)
    acute_mi = visible("ph_acute_mi", adm, t)
    pleura = visible("ph_pleurisy_pneumothorax", adm, t)
    shock = visible("ph_shock", adm, t)
    # Per-admission anatomy of lesions: the same side, lobe and nodule place at every study.
    n_adm = len(cohort.admissions)
    side = rng.choice([-1.0, 1.0], n_adm)[adm]
    consolidation_y = rng.choice([-0.3, 0.0, 0.3], n_adm)[adm]
    lesion = (rng.random(n_adm) < 0.04)[adm]
    nodule_x = (rng.choice([-1.0, 1.0], n_adm) * rng.uniform(0.25, 0.45, n_adm))[adm]
    nodule_y = rng.uniform(-0.45, 0.25, n_adm)[adm]
    f = {
        "heart_width": (0.23 + 0.06 * np.clip(chf, -2.0, 3.0) - 0.03 * np.clip(shock, -2.0, 3.0)
                        + rng.normal(0, 0.006, m)),
        "edema": st.edema_level(chf, acute_mi),
        "consolidation": st.sigmoid(2.5 * (visible("ph_pneumonia", adm, t) - 0.5)),
        "lower_opacity": st.sigmoid(2.2 * (visible("ph_other_lower_respiratory", adm, t) - 0.4)),
        "diffuse_opacity": st.sigmoid(2.2 * (visible("ph_respiratory_failure", adm, t) - 0.5)),
        "effusion": np.maximum(0.7 * st.sigmoid(3.0 * (pleura - 0.8)), 0.6 * st.sigmoid(2.5 * (chf - 1.3))),
        "pneumothorax": st.sigmoid(3.0 * (pleura - 0.8)),
        "et_tube": physiology.ventilated(s, studies["hours"].to_numpy()).astype(float),
        "central_line": (shock + rng.normal(0, 0.15, m) > 0.3).astype(float),
        "swan_ganz": (shock + rng.normal(0, 0.25, m) > 1.2).astype(float),
        "picc": (visible("ph_septicemia", adm, t) + rng.normal(0, 0.1, m) > 0.4).astype(float),
        "nodule": lesion.astype(float),
        "hyperinflation": st.sigmoid(2.0 * (visible("ph_copd", adm, t) - 0.5)),
        "frailty": np.clip(state.frailty[adm], -2.5, 2.5),
        "lesion_side": side,
        "lesion_dx": rng.normal(0, 0.04, m),
        "consolidation_y": consolidation_y,
        "nodule_x": nodule_x,
        "nodule_y": nodule_y,
    }
    return f


def chexpert_labels(f: dict[str, np.ndarray], rng: np.random.Generator) -> pd.DataFrame:
    """The 14 CheXpert labels of each study (1.0 / 0.0 / -1.0 / NaN) from its findings, with reader noise."""
    m = len(f["edema"])
    strength = {
        "Atelectasis": 0.6 * f["lower_opacity"] + 0.4 * f["effusion"],
        "Cardiomegaly": st.sigmoid((f["heart_width"] - 0.30) / 0.012),
        "Consolidation": f["consolidation"],
        "Edema": f["edema"],
        "Enlarged Cardiomediastinum": 0.8 * st.sigmoid((f["heart_width"] - 0.31) / 0.012),
        # frailty goes with osteoporotic (rib, vertebral) fractures, so CheXpert-trained encoders learn to see it
        "Fracture": np.maximum(st.sigmoid(2.5 * (f["frailty"] - 1.3)), (rng.random(m) < 0.015).astype(float)),
        "Lung Lesion": f["nodule"],
        "Lung Opacity": np.maximum.reduce([f["lower_opacity"], f["diffuse_opacity"], f["consolidation"],
                                           f["edema"]]),
        "Pleural Effusion": f["effusion"] / 0.7,
        "Pleural Other": (rng.random(m) < 0.01).astype(float),
        "Pneumonia": 0.85 * f["consolidation"],
        "Pneumothorax": f["pneumothorax"],
        "Support Devices": np.maximum.reduce([f["et_tube"], f["central_line"], f["picc"], f["swan_ganz"]]),
    }
    labels = {}
    for name, value in strength.items():
        read = value + rng.normal(0, 0.08, m)
        explicit_negative = rng.random(m) < 0.2
        uncertain = rng.random(m) < 0.6
        labels[name] = np.where(read > 0.6, 1.0, np.where(read > 0.4, np.where(uncertain, -1.0, np.nan),
                                                           np.where(explicit_negative, 0.0, np.nan)))
        missed = rng.random(m) < 0.03
        labels[name] = np.where(missed, np.nan, labels[name])
    findings = np.column_stack([labels[name] for name in strength if name != "Support Devices"])
    labels["No Finding"] = np.where(np.any(np.isin(findings, [1.0, -1.0]), axis=1), np.nan, 1.0)
    return pd.DataFrame({name: labels[name] for name in CHEXPERT_LABELS})


def _study_time(seconds: np.ndarray, ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StudyDate (int YYYYMMDD) and StudyTime (float HHMMSS.fff) of epoch seconds + milliseconds."""
    seconds = seconds + (seconds % 86400 == 0)  # 00:00:00 would be written "0": move it one second
    stamp = seconds.astype("datetime64[s]")
    day = stamp.astype("datetime64[D]")
    ymd = pd.DatetimeIndex(day)
    study_date = (ymd.year * 10000 + ymd.month * 100 + ymd.day).to_numpy().astype("int64")
    of_day = (stamp - day).astype("int64")
    hhmmss = (of_day // 3600) * 10000 + (of_day % 3600 // 60) * 100 + of_day % 60
    return study_date, hhmmss + ms / 1000.0


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_cxr(cohort: Cohort, physiology: Physiology, rng: np.random.Generator, root: Path, image_size: int,
              n_corrupt_images: int, paired_share: float = 0.265) -> dict:
    """Write the three MIMIC-CXR-JPG tables and every JPEG (``paired_share``: see ``draw_studies``); returns counts
    and the corrupt image paths."""
    images = draw_studies(cohort, physiology, rng, paired_share)
    stays = cohort.stays
    images["subject_id"] = stays["subject_id"].to_numpy()[images["stay"]]
    study_rows = images.drop_duplicates("study_id").reset_index(drop=True)
    findings = study_findings(cohort, physiology, study_rows, rng)
    chexpert = chexpert_labels(findings, rng)
    seconds = stays["intime"].to_numpy()[study_rows["stay"]] + np.floor(study_rows["hours"].to_numpy() * HOUR)
    study_date, study_time = _study_time(seconds.astype("int64"), study_rows["ms"].to_numpy())
    position = pd.Series(np.arange(len(study_rows)), index=study_rows["study_id"])
    image_study = position.loc[images["study_id"]].to_numpy()

    # Images: render in batches, write, then truncate a few files.
    banks = TextureBanks.draw(rng, image_size)
    relpath = cxr_image_relpath(images["subject_id"], images["study_id"], images["dicom_id"]).to_numpy()
    lateral = (images["view"] == "LATERAL").to_numpy()
    per_image = {name: values[image_study] for name, values in findings.items()}
    for directory in sorted({str(Path(p).parent) for p in relpath}):
        (root / directory).mkdir(parents=True, exist_ok=True)
    corrupt = set(rng.choice(len(images), size=min(n_corrupt_images, len(images)), replace=False).tolist())
    for start in range(0, len(images), RENDER_BATCH):
        stop = min(start + RENDER_BATCH, len(images))
        batch = render_images({k: v[start:stop] for k, v in per_image.items()}, lateral[start:stop], image_size,
                              rng, banks)
        for offset, pixels in enumerate(batch):
            index = start + offset
            data = _encode_jpeg(pixels)
            (root / relpath[index]).write_bytes(data[: len(data) // 3] if index in corrupt else data)

    # Tables.
    views = images["view"].to_numpy()
    orientation = np.where(np.isin(views, ["PA", "LATERAL"]), "Erect",
                           np.where(rng.random(len(images)) < 0.7, "Recumbent", None))
    order = np.lexsort((images["dicom_id"].to_numpy(), images["study_id"].to_numpy(),
                        images["subject_id"].to_numpy()))
    procedure = images["view"].map(PROCEDURE).to_numpy()
    view_code = images["view"].map(VIEW_CODE).to_numpy()
    counts = {"cxr_images": sio.write_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", {
        "dicom_id": images["dicom_id"].to_numpy()[order], "subject_id": images["subject_id"].to_numpy()[order],
        "study_id": images["study_id"].to_numpy()[order],
        "PerformedProcedureStepDescription": procedure[order],
        "ViewPosition": np.where(views == "", None, views)[order],
        "Rows": np.full(len(images), image_size, dtype="int64"),
        "Columns": np.full(len(images), image_size, dtype="int64"),
        "StudyDate": study_date[image_study][order], "StudyTime": study_time[image_study][order],
        "ProcedureCodeSequence_CodeMeaning": procedure[order], "ViewCodeSequence_CodeMeaning": view_code[order],
        "PatientOrientationCodeSequence_CodeMeaning": orientation[order]})}
    study_order = np.lexsort((study_rows["study_id"].to_numpy(), study_rows["subject_id"].to_numpy()))
    columns = {"subject_id": study_rows["subject_id"].to_numpy()[study_order],
               "study_id": study_rows["study_id"].to_numpy()[study_order]}
    for name in CHEXPERT_LABELS:  # written like the official file: 1.0 / 0.0 / -1.0 / empty
        values = chexpert[name].to_numpy()[study_order]
        columns[name] = pc.if_else(pa.array(np.isnan(values)), pa.nulls(len(values), pa.string()),
                                   sio.fixed_text(np.nan_to_num(values), 1))
    counts["cxr_studies"] = sio.write_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", columns)
    subjects = np.unique(images["subject_id"].to_numpy())
    subject_split = pd.Series(np.array(["train", "validate", "test"])[
        np.digitize(rng.random(len(subjects)), [0.95, 0.97])], index=subjects)
    counts["cxr_split"] = sio.write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", {
        "dicom_id": images["dicom_id"].to_numpy()[order], "study_id": images["study_id"].to_numpy()[order],
        "subject_id": images["subject_id"].to_numpy()[order],
        "split": subject_split.loc[images["subject_id"].to_numpy()[order]].to_numpy()})
    counts["corrupt_images"] = sorted(relpath[i] for i in corrupt)
    return counts
