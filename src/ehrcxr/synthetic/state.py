"""The latent patient state behind every synthetic record, and the true label probabilities.

Per admission: acuity ``a ~ N(0, 1)`` and, for each of the 25 phenotypes, a severity
``s_k = offset_k + sqrt(w_k) e_k + sqrt(1 - w_k) c_k`` where ``e_k`` is the part the EHR variables
show, ``c_k`` the part the X-ray shows (``w_k`` from the signal map) and ``offset_k`` the part
explained by age, sex, race group and a subject-level chronic tendency. The label is
``y_k ~ Bernoulli(sigmoid(alpha s_k + beta_k))``; that probability is the oracle. Acute severities
drift linearly in time (``slope_k`` per day around the reference hour), so what a vital sign or an
X-ray shows depends on when it was taken.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ehrcxr.resources import phenotype_labels, phenotypes

LABELS: list[str] = phenotype_labels()

# Which modality carries each label's signal (written to signal_map.json).
SIGNAL_MAP: dict[str, str] = {
    "ph_acute_renal_failure": "weak", "ph_acute_cerebrovascular": "ehr", "ph_acute_mi": "both",
    "ph_cardiac_dysrhythmias": "ehr", "ph_ckd": "weak", "ph_copd": "cxr", "ph_complications_of_care": "weak",
    "ph_conduction_disorders": "ehr", "ph_chf": "both", "ph_coronary_atherosclerosis": "weak",
    "ph_diabetes_complicated": "ehr", "ph_diabetes_uncomplicated": "ehr", "ph_lipid_disorders": "weak",
    "ph_essential_hypertension": "weak", "ph_fluid_electrolyte": "ehr", "ph_gi_hemorrhage": "ehr",
    "ph_hypertension_complicated": "weak", "ph_liver_disease": "weak", "ph_other_lower_respiratory": "cxr",
    "ph_other_upper_respiratory": "weak", "ph_pleurisy_pneumothorax": "cxr", "ph_pneumonia": "cxr",
    "ph_respiratory_failure": "both", "ph_septicemia": "both", "ph_shock": "both",
    "mortality": "both",
}

SIGNAL_CARRIERS: dict[str, str] = {
    "ph_acute_cerebrovascular": "GCS eye/verbal/motor fall with severity",
    "ph_cardiac_dysrhythmias": "heart rate up and irregular from one reading to the next",
    "ph_conduction_disorders": "heart rate down, with occasional much lower readings (dropped beats)",
    "ph_diabetes_complicated": "glucose (strongly) and pH (ketoacidosis)",
    "ph_diabetes_uncomplicated": "glucose",
    "ph_fluid_electrolyte": "pH (labs and arterial blood gas) down, respiratory rate up (compensation)",
    "ph_gi_hemorrhage": "heart rate up, systolic BP down with a narrowed pulse pressure",
    "ph_copd": "hyperinflation: taller, darker lung fields with a low flat diaphragm",
    "ph_pleurisy_pneumothorax": "apical/lateral lung rim without markings (pneumothorax) and basal effusion",
    "ph_pneumonia": "focal consolidation",
    "ph_other_lower_respiratory": "patchy lower-zone opacities",
    "ph_acute_mi": "CXR: mild perihilar edema without a wide heart; EHR: heart rate up, systolic BP down",
    "ph_chf": "CXR: heart width, perihilar edema, effusion; EHR: heart rate up, systolic BP down (as in MIMIC)",
    "ph_respiratory_failure": "CXR: diffuse opacities (and ET tube when ventilated); EHR: SpO2 down, FiO2 and "
                              "respiratory rate up, ventilation (verbal 'No Response-ETT')",
    "ph_septicemia": "CXR: left PICC line; EHR: temperature, heart rate and respiratory rate up, BP down",
    "ph_shock": "CXR: right internal jugular central line, smaller heart; EHR: BP down, heart rate up, pH down",
    "ph_essential_hypertension": "faint: systolic BP slightly up",
    "mortality": "see mortality_description",
}

MORTALITY_DESCRIPTION = (
    "in-hospital death (hospital_expire_flag, deathtime within the admission) ~ Bernoulli(p), "
    "p = sigmoid(b0 + 1.1 acuity + 0.4 s_shock + 0.4 s_respiratory_failure + 0.1 (anchor_age - 65) / 15 "
    "+ 1.3 frailty + 2.5 max(0, -bp_trend) + 7.5 (edema_cxr(24 h) - 0.55) * (-bp_trend)). Only the EHR shows "
    "the acuity (heart rate, respiratory rate, GCS) and bp_trend (per-day drift of systolic BP, 6 mmHg per "
    "unit); only the X-ray shows frailty (thin chest-wall soft tissue: a narrower, fainter body outline; frail "
    "patients' reports more often carry CheXpert 'Fracture', as osteoporotic fractures do) and "
    "edema_cxr, the perihilar edema (0-1, from CHF and acute MI) an X-ray at hour 24 shows. The edema x "
    "BP-trend interaction is centred on the average edema, so neither modality alone sees it: edema with a "
    "falling BP is deadly, edema with a rising BP much less so. Shock and respiratory failure show in both "
    "modalities. b0 is set so that ~13.5% of stays of >= 48 h die.")

# Target prevalences: the real MIMIC-IV demo's cohort (112 stays) where it is inside the published MIMIC-IV
# phenotyping range, else the nearest value inside its 95% CI (realism check: benchmarks/realism.py).
PREVALENCE: dict[str, float] = {
    "ph_acute_renal_failure": 0.24, "ph_acute_cerebrovascular": 0.06, "ph_acute_mi": 0.08,
    "ph_cardiac_dysrhythmias": 0.31, "ph_ckd": 0.22, "ph_copd": 0.13, "ph_complications_of_care": 0.22,
    "ph_conduction_disorders": 0.09, "ph_chf": 0.24, "ph_coronary_atherosclerosis": 0.29,
    "ph_diabetes_complicated": 0.1, "ph_diabetes_uncomplicated": 0.21, "ph_lipid_disorders": 0.42,
    "ph_essential_hypertension": 0.4, "ph_fluid_electrolyte": 0.38, "ph_gi_hemorrhage": 0.09,
    "ph_hypertension_complicated": 0.22, "ph_liver_disease": 0.11, "ph_other_lower_respiratory": 0.1,
    "ph_other_upper_respiratory": 0.06, "ph_pleurisy_pneumothorax": 0.09, "ph_pneumonia": 0.14,
    "ph_respiratory_failure": 0.18, "ph_septicemia": 0.15, "ph_shock": 0.11,
}
# Comorbidities cluster (age, frailty, a sick population): every phenotype severity except the CXR-only ones
# shares BURDEN_WEIGHT x a per-admission burden ~ N(0, 1), so ~7% of stays carry no phenotype (real demo: 7.1%).
BURDEN_WEIGHT = 0.6

ALPHA = 7.0               # oracle slope on the severity: labels are noisy but the oracle stays high
REFERENCE_HOUR = 24.0     # hours after the first ICU intime at which the label severity is defined
ACUTE_SLOPE_SD = 0.35     # severity drift per day of acute phenotypes
MORTALITY_TARGET = 0.135  # share of deaths among stays of >= 48 h
EDEMA_CENTER = 0.55       # about the average X-ray edema: the edema x BP-trend mortality term has ~no marginal effect

RACE_GROUPS = ("WHITE", "BLACK", "HISPANIC", "ASIAN", "OTHER")
# Severity offsets by race group (prevalence differences), by (age - 65) / 15 and for men.
RACE_EFFECTS: dict[str, dict[str, float]] = {
    "BLACK": {"ph_essential_hypertension": 0.45, "ph_hypertension_complicated": 0.45, "ph_ckd": 0.4,
              "ph_diabetes_uncomplicated": 0.25, "ph_coronary_atherosclerosis": -0.2},
    "HISPANIC": {"ph_diabetes_uncomplicated": 0.4, "ph_diabetes_complicated": 0.35, "ph_liver_disease": 0.35},
    "ASIAN": {"ph_coronary_atherosclerosis": -0.25, "ph_diabetes_uncomplicated": 0.2, "ph_liver_disease": 0.2},
    "OTHER": {},
    "WHITE": {"ph_cardiac_dysrhythmias": 0.1},
}
AGE_EFFECTS: dict[str, float] = {
    "ph_cardiac_dysrhythmias": 0.45, "ph_coronary_atherosclerosis": 0.3, "ph_essential_hypertension": 0.3,
    "ph_hypertension_complicated": 0.3, "ph_ckd": 0.3, "ph_lipid_disorders": 0.3, "ph_conduction_disorders": 0.3,
    "ph_copd": 0.25, "ph_chf": 0.3, "ph_acute_renal_failure": 0.15, "ph_acute_mi": 0.2,
    "ph_diabetes_uncomplicated": 0.1, "ph_liver_disease": -0.2,
}
MALE_EFFECTS: dict[str, float] = {"ph_coronary_atherosclerosis": 0.2, "ph_acute_mi": 0.2, "ph_liver_disease": 0.2,
                                  "ph_lipid_disorders": 0.1}
EHR_WEIGHT = {"ehr": 1.0, "cxr": 0.0, "both": 0.5, "weak": 0.5}


def label_index(label: str) -> int:
    """Column of ``label`` in the (admission, phenotype) arrays."""
    return LABELS.index(label)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


def solve_intercepts(scores: np.ndarray, targets: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Per column, the intercept b with mean(sigmoid(scores + b)) == target (bisection, vectorised)."""
    scores = np.atleast_2d(scores.T).T if scores.ndim == 1 else scores
    if rows is not None:
        scores = scores[rows]
    low = np.full(scores.shape[1], -30.0)
    high = np.full(scores.shape[1], 30.0)
    for _ in range(60):
        middle = (low + high) / 2
        too_high = sigmoid(scores + middle).mean(axis=0) > targets
        high = np.where(too_high, middle, high)
        low = np.where(too_high, low, middle)
    return (low + high) / 2


@dataclass
class LatentState:
    """Latent state per admission (rows) and phenotype (columns, order of ``LABELS``)."""

    acuity: np.ndarray
    offset: np.ndarray
    ehr_part: np.ndarray
    cxr_part: np.ndarray
    severity: np.ndarray
    slope: np.ndarray
    bp_trend: np.ndarray
    frailty: np.ndarray
    phenotype_prob: np.ndarray
    phenotypes: np.ndarray
    mortality_prob: np.ndarray | None = None

    def _drift(self, k: int, admission: np.ndarray, hours: np.ndarray) -> np.ndarray:
        elapsed = (np.clip(hours, -120.0, 240.0) - REFERENCE_HOUR) / 24.0
        return self.slope[admission, k] * elapsed

    def ehr_facet(self, label: str, admission: np.ndarray, hours: np.ndarray) -> np.ndarray:
        """What the EHR variables see of ``label`` at ``hours`` after the admission's first ICU intime."""
        k = label_index(label)
        return self.offset[admission, k] + self.ehr_part[admission, k] + self._drift(k, admission, hours)

    def cxr_facet(self, label: str, admission: np.ndarray, hours: np.ndarray) -> np.ndarray:
        """What an X-ray taken at ``hours`` shows of ``label``."""
        k = label_index(label)
        return self.offset[admission, k] + self.cxr_part[admission, k] + self._drift(k, admission, hours)

    def total(self, label: str, admission: np.ndarray, hours: np.ndarray) -> np.ndarray:
        """The label severity itself at ``hours`` (for the faint signal of a weak phenotype)."""
        k = label_index(label)
        return self.severity[admission, k] + self._drift(k, admission, hours)


def draw_state(rng: np.random.Generator, subject_of_admission: np.ndarray, race_group: np.ndarray,
               age: np.ndarray, male: np.ndarray) -> LatentState:
    """Draw acuity, severities and phenotype labels of every admission.

    ``race_group``/``age``/``male`` are per admission; chronic phenotypes share a subject-level
    tendency across a subject's admissions.
    """
    n = len(subject_of_admission)
    n_labels = len(LABELS)
    kinds = [SIGNAL_MAP[label] for label in LABELS]
    chronic = np.array([p["type"] == "chronic" for p in phenotypes()])
    acuity = rng.standard_normal(n)
    ehr_part = rng.standard_normal((n, n_labels))
    cxr_part = rng.standard_normal((n, n_labels))
    n_subjects = int(subject_of_admission.max()) + 1
    subject_tendency = rng.normal(0.0, 0.7, (n_subjects, n_labels))[subject_of_admission]
    age_z = (age - 65.0) / 15.0
    burden = rng.standard_normal(n)
    offset = np.where(chronic, subject_tendency, 0.0) + BURDEN_WEIGHT * burden[:, None]
    for k, label in enumerate(LABELS):
        if SIGNAL_MAP[label] == "cxr":
            offset[:, k] = 0.0  # CXR-only labels carry nothing the EHR or demographics could reveal
            continue
        offset[:, k] += AGE_EFFECTS.get(label, 0.0) * age_z + MALE_EFFECTS.get(label, 0.0) * male
        for group, effects in RACE_EFFECTS.items():
            offset[:, k] += effects.get(label, 0.0) * (race_group == group)
    weight = np.array([EHR_WEIGHT[kind] for kind in kinds])
    severity = offset + np.sqrt(weight) * ehr_part + np.sqrt(1.0 - weight) * cxr_part
    slope = np.where(chronic, 0.0, rng.normal(0.0, ACUTE_SLOPE_SD, (n, n_labels)))
    bp_trend = rng.standard_normal(n)
    frailty = rng.standard_normal(n)
    targets = np.array([PREVALENCE[label] for label in LABELS])
    beta = solve_intercepts(ALPHA * severity, targets)
    phenotype_prob = sigmoid(ALPHA * severity + beta)
    phenotypes_drawn = (rng.random((n, n_labels)) < phenotype_prob).astype(np.int8)
    return LatentState(acuity=acuity, offset=offset, ehr_part=ehr_part, cxr_part=cxr_part, severity=severity,
                       slope=slope, bp_trend=bp_trend, frailty=frailty,
                       phenotype_prob=phenotype_prob, phenotypes=phenotypes_drawn)


def edema_level(cxr_chf_facet: np.ndarray, cxr_mi_facet: np.ndarray) -> np.ndarray:
    """Perihilar edema intensity (0-1) an X-ray shows for given CHF and acute-MI X-ray facets."""
    return np.clip(sigmoid(2.0 * (cxr_chf_facet - 0.6)) + 0.8 * sigmoid(2.5 * (cxr_mi_facet - 0.5)), 0.0, 1.0)


def mortality_score(state: LatentState, age: np.ndarray) -> np.ndarray:
    """Mortality logit without its intercept (see MORTALITY_DESCRIPTION)."""
    admission = np.arange(len(state.acuity))
    at_reference = np.full(len(admission), REFERENCE_HOUR)
    edema = edema_level(state.cxr_facet("ph_chf", admission, at_reference),
                        state.cxr_facet("ph_acute_mi", admission, at_reference))
    return (1.1 * state.acuity + 0.4 * state.severity[:, label_index("ph_shock")]
            + 0.4 * state.severity[:, label_index("ph_respiratory_failure")] + 0.1 * (age - 65.0) / 15.0
            + 1.3 * state.frailty + 2.5 * np.maximum(0.0, -state.bp_trend)
            + 7.5 * (edema - EDEMA_CENTER) * -state.bp_trend)
