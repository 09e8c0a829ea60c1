"""Synthetic chartevents and labevents: the 17 benchmark variables through their real MIMIC-IV itemids.

Vitals come hourly (jittered, a short gap in some stays; ~95% of hours observed, as in the real MIMIC-IV demo),
temperature/GCS/FiO2 every few hours, glucose and pH a few times, weight and height once; values follow the latent
state at the charting time (see ``Physiology``), diseases moving each variable one way only (``excess``). Chart events stop 72 h into each stay to keep the volume sane.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ehrcxr.synthetic import io as sio
from ehrcxr.synthetic.cohort import HOUR, Cohort
from ehrcxr.synthetic.state import LatentState, sigmoid

CHART_HOURS = 72.0
PULSE_OXIMETRY_BIAS = {"BLACK": 2.5}  # SpO2 reads this many points above the true saturation
SPO2_POINTS_PER_SEVERITY = 2.6  # true saturation lost per unit of respiratory-failure severity (above 0.3)
PULSE_OXIMETRY_DESCRIPTION = (
    "SpO2 (itemid 220277) reads 2.5 points above the true saturation in BLACK patients (pulse-oximetry bias: "
    "Sjoding et al., NEJM 2020), and oxygen therapy follows the reading: supplemental oxygen, FiO2 and intubation "
    "respond to respiratory-failure severity minus 2.5 / 2.6 units in those patients (Fawzy et al., JAMA Intern Med "
    "2022), so SpO2, FiO2, ventilation (GCS verbal 'intubated', the ET tube on X-rays) all under-show their "
    "respiratory failure. Labels and the oracle are unchanged: a model sees less of it and should flag it less "
    "often (a lower TPR for ph_respiratory_failure in BLACK patients).")
BP_TREND_MMHG_PER_DAY = 6.0  # systolic BP drift per day per unit of the latent bp_trend (a mortality factor)
VENTILATION_THRESHOLD = 0.6  # respiratory-failure facet + acuity + baseline above this: intubated

# d_items rows (MIMIC-IV v2.2) of the items written: itemid, label, abbreviation, linksto, category,
# unitname, param_type, lownormalvalue, highnormalvalue.
D_ITEMS = [
    (220045, "Heart Rate", "HR", "chartevents", "Routine Vital Signs", "bpm", "Numeric", None, None),
    (220050, "Arterial Blood Pressure systolic", "ABPs", "chartevents", "Routine Vital Signs", "mmHg", "Numeric",
     90, 140),
    (220051, "Arterial Blood Pressure diastolic", "ABPd", "chartevents", "Routine Vital Signs", "mmHg", "Numeric",
     60, 90),
    (220052, "Arterial Blood Pressure mean", "ABPm", "chartevents", "Routine Vital Signs", "mmHg", "Numeric", None,
     None),
    (220179, "Non Invasive Blood Pressure systolic", "NBPs", "chartevents", "Routine Vital Signs", "mmHg", "Numeric",
     None, None),
    (220180, "Non Invasive Blood Pressure diastolic", "NBPd", "chartevents", "Routine Vital Signs", "mmHg", "Numeric",
     None, None),
    (220181, "Non Invasive Blood Pressure mean", "NBPm", "chartevents", "Routine Vital Signs", "mmHg", "Numeric", None,
     None),
    (220210, "Respiratory Rate", "RR", "chartevents", "Respiratory", "insp/min", "Numeric", None, None),
    (220227, "Arterial O2 Saturation", "SaO2", "chartevents", "Labs", "%", "Numeric", None, None),
    (220274, "PH (Venous)", "PH (Venous)", "chartevents", "Labs", None, "Numeric", None, None),
    (220277, "O2 saturation pulseoxymetry", "SpO2", "chartevents", "Respiratory", "%", "Numeric", None, None),
    (220621, "Glucose (serum)", "Glucose (serum)", "chartevents", "Labs", None, "Numeric", None, None),
    (220739, "GCS - Eye Opening", "Eye Opening", "chartevents", "Neurological", None, "Text", None, None),
    (223761, "Temperature Fahrenheit", "Temperature F", "chartevents", "Routine Vital Signs", "°F", "Numeric", None,
     None),
    (223762, "Temperature Celsius", "Temperature C", "chartevents", "Routine Vital Signs", "°C", "Numeric", None,
     None),
    (223830, "PH (Arterial)", "PH (Arterial)", "chartevents", "Labs", None, "Numeric", None, None),
    (223835, "Inspired O2 Fraction", "FiO2", "chartevents", "Respiratory", None, "Numeric", None, None),
    (223900, "GCS - Verbal Response", "Verbal Response", "chartevents", "Neurological", None, "Text", None, None),
    (223901, "GCS - Motor Response", "Motor Response", "chartevents", "Neurological", None, "Text", None, None),
    (224639, "Daily Weight", "Daily Weight", "chartevents", "General", "kg", "Numeric", None, None),
    (225664, "Glucose finger stick (range 70-100)", "Glucose FS (range 70 -100)", "chartevents", "Labs", None,
     "Numeric", None, None),
    (226512, "Admission Weight (Kg)", "Admission Weight (Kg)", "chartevents", "General", "kg", "Numeric", None, None),
    (226531, "Admission Weight (lbs.)", "Admission Weight (lbs.)", "chartevents", "General", None, "Numeric", None,
     None),
    (226707, "Height", "Height", "chartevents", "General", "Inch", "Numeric", None, None),
    (226730, "Height (cm)", "Height (cm)", "chartevents", "General", "cm", "Numeric", None, None),
]
D_LABITEMS = [(50809, "Glucose", "Blood", "Blood Gas"), (50820, "pH", "Blood", "Blood Gas"),
              (50931, "Glucose", "Blood", "Chemistry")]
# valueuom as MIMIC-IV chartevents writes it (empty where MIMIC leaves it empty).
VALUEUOM = {220045: "bpm", 220050: "mmHg", 220051: "mmHg", 220052: "mmHg", 220179: "mmHg", 220180: "mmHg",
            220181: "mmHg", 220210: "insp/min", 220227: "%", 220274: "units", 220277: "%", 220621: "mg/dL",
            223761: "°F", 223762: "°C", 223830: "units", 224639: "kg", 226512: "kg", 226707: "Inch", 226730: "cm"}

GCS_EYE = {4: "Spontaneously", 3: "To Speech", 2: "To Pain", 1: "None"}
GCS_VERBAL = {5: "Oriented", 4: "Confused", 3: "Inappropriate Words", 2: "Incomprehensible sounds",
              1: "No Response"}
GCS_MOTOR = {6: "Obeys Commands", 5: "Localizes Pain", 4: "Flex-withdraws", 3: "Abnormal Flexion",
             2: "Abnormal extension", 1: "No response"}
VERBAL_ETT = "No Response-ETT"


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)), stable."""
    return np.logaddexp(0.0, x)


def excess(facet: np.ndarray, threshold: float = 0.5, sharpness: float = 1.5) -> np.ndarray:
    """How far a severity lies above ``threshold``: a smooth ReLU, ~0 below it and ~facet - threshold above. A
    disease moves a vital sign one way only (sepsis raises the temperature; its absence does not lower it), so the
    variables' tails stay clinically plausible."""
    return softplus(sharpness * (facet - threshold)) / sharpness


@dataclass
class Physiology:
    """Vital signs and labs of any stay at any hour, from the latent state plus per-stay baselines.

    ``signal_strength`` multiplies every severity before it reaches a variable (1 = the default; see the README
    for how strong each planted effect then is against the same summary on the real MIMIC-IV demo).
    """

    cohort: Cohort
    rng: np.random.Generator
    signal_strength: float = 1.0
    baseline: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.cohort.stays)
        stays, admissions = self.cohort.stays, self.cohort.admissions
        self.admission = stays["admission_row"].to_numpy()
        self.offset = stays["offset_hours"].to_numpy()
        subject_row = admissions["subject_row"].to_numpy()[self.admission]
        self.race_group = self.cohort.subjects["race_group"].to_numpy()[subject_row]
        self.male = (self.cohort.subjects["gender"].to_numpy() == "M")[subject_row]
        self.age = admissions["age"].to_numpy()[self.admission]
        draw = self.rng.normal
        self.baseline = {"hr": draw(0, 9, n), "sbp": draw(0, 9, n), "dbp": draw(0, 9, n), "rr": draw(0, 2.0, n), "spo2": draw(0, 1.0, n),
                         "temp": draw(0, 0.22, n), "glucose": draw(0, 0.12, n), "ph": draw(0, 0.03, n),
                         "vent": draw(0, 0.6, n), "o2": draw(0, 0.4, n), "neuro": draw(0, 0.5, n),
                         "weight": draw(0, 1, n), "height": draw(0, 1, n)}
        state = self.cohort.state
        shock = state.ehr_facet("ph_shock", self.admission, self.offset + 24.0)
        self.arterial_line = self.rng.random(n) < sigmoid(1.2 * shock + 0.5 * state.acuity[self.admission] - 0.4)

    @property
    def state(self) -> LatentState:
        return self.cohort.state

    def facet(self, label: str, stay: np.ndarray, hours: np.ndarray) -> np.ndarray:
        """EHR-visible severity of ``label`` for stay rows ``stay`` at ``hours`` after their intime."""
        return self.signal_strength * self.state.ehr_facet(label, self.admission[stay], self.offset[stay] + hours)

    def _acuity(self, stay: np.ndarray) -> np.ndarray:
        return self.state.acuity[self.admission[stay]]

    def noise(self, n: int, scale: float) -> np.ndarray:
        return self.rng.normal(0.0, scale, n)

    def heart_rate(self, stay, hours):
        f = self.facet
        n = len(stay)
        irregular = 12.0 * sigmoid(2.0 * (f("ph_cardiac_dysrhythmias", stay, hours) - 0.8))
        conduction = excess(f("ph_conduction_disorders", stay, hours))
        dropped_beats = self.rng.random(n) < 0.3 * sigmoid(2.5 * (conduction - 1.0))
        value = (82 + 8 * excess(f("ph_shock", stay, hours)) + 7 * excess(f("ph_septicemia", stay, hours))
                 + 5 * excess(f("ph_chf", stay, hours)) + 4 * excess(f("ph_cardiac_dysrhythmias", stay, hours))
                 + 10 * excess(f("ph_acute_mi", stay, hours)) + 8 * excess(f("ph_gi_hemorrhage", stay, hours))
                 - 9 * conduction - 12 * dropped_beats
                 + 6 * self._acuity(stay) + self.baseline["hr"][stay] + self.noise(n, 5)
                 + irregular * self.rng.standard_normal(n))
        return np.clip(value, 38, 200)

    def systolic(self, stay, hours):
        f = self.facet
        adm = self.admission[stay]
        elapsed = np.clip(self.offset[stay] + hours, 0, 96) / 24.0
        value = (123 - 9 * excess(f("ph_shock", stay, hours)) - 4 * excess(f("ph_septicemia", stay, hours))
                 - 5 * excess(f("ph_chf", stay, hours)) - 6 * excess(f("ph_acute_mi", stay, hours))
                 - 6 * excess(f("ph_gi_hemorrhage", stay, hours))
                 + 12 * excess(self.signal_strength * self.state.total("ph_essential_hypertension", adm,
                                                                      self.offset[stay] + hours))
                 + 0.15 * (self.age[stay] - 65) + BP_TREND_MMHG_PER_DAY * self.state.bp_trend[adm] * elapsed
                 + self.baseline["sbp"][stay] + self.noise(len(stay), 6))
        return np.clip(value, 60, 220)

    def diastolic(self, stay, hours, systolic):
        """Diastolic BP: under half the systolic, lower in shock, relatively kept up in GI bleeding (narrow pulse
        pressure)."""
        f = self.facet
        value = (0.45 * systolic + 8 - 3 * excess(f("ph_shock", stay, hours))
                 + 4 * excess(f("ph_gi_hemorrhage", stay, hours)) + self.baseline["dbp"][stay] + self.noise(len(stay), 6))
        return np.clip(value, 25, 130)

    def oximetry_bias(self, stay):
        """Points the pulse oximeter adds to the true saturation of each stay row (PULSE_OXIMETRY_BIAS by race)."""
        bias = np.zeros(len(stay))
        for group, points in PULSE_OXIMETRY_BIAS.items():
            bias[self.race_group[stay] == group] = points
        return bias

    def treated_respiratory_failure(self, stay, hours):
        """Respiratory-failure severity as the bedside team treats it: judged by the displayed SpO2, so the
        oximetry bias hides ``bias / SPO2_POINTS_PER_SEVERITY`` of it and oxygen, FiO2 and intubation escalate
        less (fewer Black patients with occult hypoxaemia get oxygen: Fawzy et al., JAMA Intern Med 2022)."""
        return self.facet("ph_respiratory_failure", stay, hours) - self.oximetry_bias(stay) / SPO2_POINTS_PER_SEVERITY

    def ventilated(self, stay, hours):
        level = self.treated_respiratory_failure(stay, hours) + 0.5 * self._acuity(stay)
        return level + self.baseline["vent"][stay] > VENTILATION_THRESHOLD

    def on_oxygen(self, stay, hours):
        level = self.treated_respiratory_failure(stay, hours) + 0.2 * self._acuity(stay)
        return self.ventilated(stay, hours) | (level + self.baseline["o2"][stay] > -0.1)

    def fio2_percent(self, stay, hours):
        resp = excess(self.treated_respiratory_failure(stay, hours), 0.3)
        vent = self.ventilated(stay, hours)
        n = len(stay)
        invasive = np.clip(np.round((35 + 12 * resp + self.noise(n, 7)) / 5) * 5, 30, 100)
        invasive = np.where(self.rng.random(n) < 0.03, 100.0, invasive)  # pre-oxygenation, suctioning
        cannula = np.clip(np.round(36 + 5 * resp + self.noise(n, 4)), 24, 60)
        return np.where(vent, invasive, cannula)

    def true_saturation(self, stay, hours):
        resp = excess(self.facet("ph_respiratory_failure", stay, hours), 0.3)
        value = (97.0 - SPO2_POINTS_PER_SEVERITY * resp + 1.0 * self.on_oxygen(stay, hours) + self.baseline["spo2"][stay]
                 + self.noise(len(stay), 1.3))
        return np.clip(value, 70, 100)

    def pulse_oximetry(self, stay, hours):
        return np.clip(self.true_saturation(stay, hours) + self.oximetry_bias(stay), 70, 100)

    def respiratory_rate(self, stay, hours):
        f = self.facet
        value = (18.5 + 3 * excess(f("ph_respiratory_failure", stay, hours)) + 2 * excess(f("ph_septicemia", stay, hours))
                 + 3 * excess(f("ph_fluid_electrolyte", stay, hours)) + 2.5 * self._acuity(stay)
                 + self.baseline["rr"][stay] + self.noise(len(stay), 3))
        return np.clip(value, 6, 45)

    def temperature_celsius(self, stay, hours):
        f = self.facet
        value = (36.8 + 0.9 * excess(f("ph_septicemia", stay, hours), 0.6) - 0.4 * excess(f("ph_shock", stay, hours), 1.2)
                 + 0.05 * self._acuity(stay) + self.baseline["temp"][stay] + self.noise(len(stay), 0.25))
        return np.clip(value, 33.5, 41.5)

    def gcs(self, stay, hours):
        """(eye, verbal, motor) scores and whether the patient is intubated."""
        vent = self.ventilated(stay, hours)
        neuro = (1.2 * excess(self.facet("ph_acute_cerebrovascular", stay, hours), 0.3) + 0.5 * self._acuity(stay)
                 + 0.9 * vent + self.baseline["neuro"][stay])
        n = len(stay)
        eye = 4 - np.digitize(neuro + self.noise(n, 0.3), [0.5, 1.1, 1.7])
        verbal = 5 - np.digitize(neuro + self.noise(n, 0.3), [0.3, 0.9, 1.4, 2.0])
        motor = 6 - np.digitize(neuro + self.noise(n, 0.3), [1.7, 2.1, 2.5, 2.9, 3.3])
        return eye, verbal, motor, vent

    def glucose(self, stay, hours):
        f = self.facet
        value = (105 + 45 * excess(f("ph_diabetes_uncomplicated", stay, hours), 1.0)
                 + 70 * excess(f("ph_diabetes_complicated", stay, hours), 1.0) + 6 * self._acuity(stay))
        value = value * np.exp(self.baseline["glucose"][stay] + self.noise(len(stay), 0.2))
        return np.clip(value, 40, 900)

    def ph(self, stay, hours):
        f = self.facet
        value = (7.40 - 0.07 * excess(f("ph_fluid_electrolyte", stay, hours), 0.3)
                 - 0.06 * excess(f("ph_diabetes_complicated", stay, hours), 0.8)
                 - 0.05 * excess(f("ph_shock", stay, hours)) + self.baseline["ph"][stay]
                 + self.noise(len(stay), 0.03))
        return np.clip(value, 6.9, 7.65)

    def weight_kg(self, stay):
        return np.clip(np.where(self.male[stay], 82, 70) * np.exp(0.24 * self.baseline["weight"][stay]), 35, 250)

    def height_cm(self, stay):
        return np.clip(np.where(self.male[stay], 176, 162) + 7 * self.baseline["height"][stay], 140, 205)


def schedule(rng: np.random.Generator, window: np.ndarray, interval: np.ndarray, first: np.ndarray,
             jitter: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Charting times: every ``interval`` hours (jittered) from ``first`` to ``window`` for each stay.

    Returns (stay row, hours after intime) of each event, within [0, window].
    """
    count = np.where(window >= first, np.floor((window - first) / interval).astype("int64") + 1, 0)
    stay = np.repeat(np.arange(len(window)), count)
    k = np.arange(len(stay)) - np.repeat(np.cumsum(count) - count, count)
    hours = first[stay] + (k + rng.uniform(-jitter, jitter, len(stay))) * interval[stay]
    keep = (hours >= 0) & (hours <= window[stay])
    return stay[keep], hours[keep]


@dataclass
class EventBlock:
    """Chart events of one item: stay rows, hours after intime, value text and valuenum."""

    stay: np.ndarray
    hours: np.ndarray
    itemid: int
    value: pa.Array
    valuenum: np.ndarray


def _numeric(stay, hours, itemid, values, decimals, fixed=False) -> EventBlock:
    text = sio.fixed_text(values, decimals) if fixed else sio.number_text(values, decimals)
    return EventBlock(stay, hours, itemid, text, np.round(values, decimals))


def _coded(stay, hours, itemid, scores, vocabulary: dict[int, str]) -> EventBlock:
    codes = np.searchsorted(sorted(vocabulary), scores)
    return EventBlock(stay, hours, itemid, sio.pick_text(codes, [vocabulary[s] for s in sorted(vocabulary)]),
                      scores.astype(float))


def _outliers(rng, block: EventBlock, rate: float, values: list[float]) -> EventBlock:
    hit = rng.random(len(block.stay)) < rate
    if not hit.any():
        return block
    replacement = np.asarray(values, dtype=float)[rng.integers(0, len(values), int(hit.sum()))]
    valuenum = block.valuenum.copy()
    valuenum[hit] = replacement
    text = pc.if_else(pa.array(hit), sio.number_text(valuenum, 1), block.value)
    return EventBlock(block.stay, block.hours, block.itemid, text, valuenum)


def chart_blocks(physiology: Physiology, rng: np.random.Generator) -> list[EventBlock]:
    """Every chart event block of the first 72 h of every stay."""
    stays = physiology.cohort.stays
    n = len(stays)
    window = np.minimum((stays["outtime"] - stays["intime"]).to_numpy() / HOUR, CHART_HOURS)
    blocks: list[EventBlock] = []

    # Vitals: about hourly, with one gap of a few hours in many stays and some missed readings.
    stay, hours = schedule(rng, window, rng.uniform(0.9, 1.05, n), rng.uniform(0.02, 0.5, n))
    gap_start = rng.uniform(0, window)
    gap_length = np.where(rng.random(n) < 0.2, rng.uniform(1.5, 4, n), 0.0)
    in_gap = (hours >= gap_start[stay]) & (hours < gap_start[stay] + gap_length[stay])
    stay, hours = stay[~in_gap], hours[~in_gap]
    blocks.append(_outliers(rng, _numeric(stay, hours, 220045, physiology.heart_rate(stay, hours), 0),
                            2e-4, [0.0, 999.0]))
    bp = rng.random(len(stay)) < 0.985
    s, h = stay[bp], hours[bp]
    systolic = physiology.systolic(s, h)
    diastolic = physiology.diastolic(s, h, systolic)
    mean = (systolic + 2 * diastolic) / 3 + physiology.noise(len(s), 1.5)
    arterial = physiology.arterial_line[s]
    for values, invasive, noninvasive in ((systolic, 220050, 220179), (diastolic, 220051, 220180),
                                          (mean, 220052, 220181)):
        blocks.append(_numeric(s[arterial], h[arterial], invasive, values[arterial], 0))
        blocks.append(_numeric(s[~arterial], h[~arterial], noninvasive, values[~arterial], 0))
    rr = rng.random(len(stay)) < 0.99
    blocks.append(_numeric(stay[rr], hours[rr], 220210, physiology.respiratory_rate(stay[rr], hours[rr]), 0))
    ox = rng.random(len(stay)) < 0.985
    blocks.append(_numeric(stay[ox], hours[ox], 220277, physiology.pulse_oximetry(stay[ox], hours[ox]), 0))

    # Temperature every ~4 h, mostly Fahrenheit; a few absurd entries.
    stay, hours = schedule(rng, window, rng.uniform(3.5, 4.5, n), rng.uniform(0.1, 1.0, n))
    celsius = physiology.temperature_celsius(stay, hours)
    prefers_celsius = rng.random(n) < 0.2
    as_celsius = rng.random(len(stay)) < np.where(prefers_celsius[stay], 0.9, 0.05)
    blocks.append(_outliers(rng, _numeric(stay[as_celsius], hours[as_celsius], 223762, celsius[as_celsius], 1),
                            5e-4, [9999.0]))
    fahrenheit = celsius[~as_celsius] * 9 / 5 + 32
    blocks.append(_outliers(rng, _numeric(stay[~as_celsius], hours[~as_celsius], 223761, fahrenheit, 1),
                            5e-4, [9999.0]))

    # GCS every ~4 h as MIMIC-IV text with the score in valuenum.
    stay, hours = schedule(rng, window, rng.uniform(3.5, 4.5, n), rng.uniform(0.2, 1.5, n))
    eye, verbal, motor, intubated = physiology.gcs(stay, hours)
    blocks.append(_coded(stay, hours, 220739, eye, GCS_EYE))
    verbal_vocabulary = {**GCS_VERBAL, 0: VERBAL_ETT}
    verbal_block = _coded(stay, hours, 223900, np.where(intubated, 0, verbal), verbal_vocabulary)
    verbal_block.valuenum = np.where(intubated, 1.0, verbal).astype(float)
    blocks.append(verbal_block)
    blocks.append(_coded(stay, hours, 223901, motor, GCS_MOTOR))

    # FiO2 (percent) every ~4 h while on oxygen.
    stay, hours = schedule(rng, window, rng.uniform(3.0, 5.0, n), rng.uniform(0.2, 2.0, n))
    oxygen = physiology.on_oxygen(stay, hours)
    blocks.append(_numeric(stay[oxygen], hours[oxygen], 223835, physiology.fio2_percent(stay[oxygen],
                                                                                          hours[oxygen]), 0))

    # Bedside glucose: finger sticks, more often in diabetics; serum glucose copied into the chart for some.
    diabetic = (physiology.facet("ph_diabetes_uncomplicated", np.arange(n), np.full(n, 24.0)) > 0.7) | (
        physiology.facet("ph_diabetes_complicated", np.arange(n), np.full(n, 24.0)) > 0.7)
    checks = diabetic | (rng.random(n) < 0.35)
    interval = np.where(diabetic, rng.uniform(4.5, 7.0, n), rng.uniform(10.0, 14.0, n))
    stay, hours = schedule(rng, np.where(checks, window, -1.0), interval, rng.uniform(0.5, 3.0, n))
    blocks.append(_numeric(stay, hours, 225664, physiology.glucose(stay, hours), 0))
    serum = rng.random(n) < 0.3
    stay, hours = schedule(rng, np.where(serum, window, -1.0), rng.uniform(10, 14, n), rng.uniform(1, 6, n))
    blocks.append(_numeric(stay, hours, 220621, physiology.glucose(stay, hours), 0))

    # Arterial blood gases charted for arterial-line stays (pH + SaO2); venous pH for a few.
    stay, hours = schedule(rng, np.where(physiology.arterial_line, window, -1.0), rng.uniform(6, 10, n),
                           rng.uniform(0.5, 4.0, n))
    blocks.append(_numeric(stay, hours, 223830, physiology.ph(stay, hours), 2, fixed=True))
    blocks.append(_numeric(stay, hours, 220227, physiology.true_saturation(stay, hours), 0))
    venous = rng.random(n) < 0.1
    stay, hours = schedule(rng, np.where(venous, window, -1.0), rng.uniform(10, 14, n), rng.uniform(1, 8, n))
    blocks.append(_numeric(stay, hours, 220274, physiology.ph(stay, hours) - 0.03, 2, fixed=True))

    # Weight once at admission (kg or lbs), daily weights for some; height once (cm or inches).
    all_stays = np.arange(n)
    hours = np.minimum(rng.uniform(0.2, 3.0, n), window)
    kilograms = physiology.weight_kg(all_stays)
    pounds = rng.random(n) < 0.35
    blocks.append(_numeric(all_stays[~pounds], hours[~pounds], 226512, kilograms[~pounds], 1))
    blocks.append(_numeric(all_stays[pounds], hours[pounds], 226531, kilograms[pounds] * 2.20462, 1))
    stay, hours = schedule(rng, np.where(rng.random(n) < 0.4, window, -1.0), np.full(n, 24.0),
                           rng.uniform(20, 28, n), jitter=0.05)
    blocks.append(_numeric(stay, hours, 224639, physiology.weight_kg(stay) + physiology.noise(len(stay), 1.0), 1))
    measured = np.flatnonzero(rng.random(n) < 0.7)
    hours = np.minimum(rng.uniform(0.2, 3.0, len(measured)), window[measured])
    inches = rng.random(len(measured)) < 0.4
    centimetres = physiology.height_cm(measured)
    blocks.append(_numeric(measured[~inches], hours[~inches], 226730, centimetres[~inches], 0))
    blocks.append(_numeric(measured[inches], hours[inches], 226707, centimetres[inches] / 2.54, 0))
    return blocks


def write_chartevents(cohort: Cohort, physiology: Physiology, rng: np.random.Generator, root: Path) -> int:
    """chartevents.csv.gz in MIMIC-IV v2.2 column order, sorted by stay and time; returns the row count."""
    blocks = [b for b in chart_blocks(physiology, rng) if len(b.stay)]
    stays = cohort.stays
    stay = np.concatenate([b.stay for b in blocks])
    hours = np.concatenate([b.hours for b in blocks])
    itemid = np.concatenate([np.full(len(b.stay), b.itemid, dtype="int64") for b in blocks])
    valuenum = np.concatenate([b.valuenum for b in blocks])
    value = pa.concat_arrays([b.value for b in blocks])
    intime = stays["intime"].to_numpy()
    charttime = (np.ceil((intime[stay] + hours * HOUR) / 60.0) * 60).astype("int64")
    order = np.lexsort((itemid, charttime, stay))
    stay, itemid, charttime, valuenum = stay[order], itemid[order], charttime[order], valuenum[order]
    value = value.take(pa.array(order))
    storetime = charttime + rng.integers(0, 46, len(stay)) * 60
    nurse_pool = rng.integers(10_000, 99_999, 3_000)
    shift = (hours[order] // 12).astype("int64")
    caregiver = nurse_pool[(stay * 7 + shift * 13) % len(nurse_pool)]
    items = sorted({b.itemid for b in blocks})
    uom = sio.pick_text(np.searchsorted(items, itemid), [VALUEUOM.get(i) for i in items])
    return sio.write_csv_gz(root / "icu" / "chartevents.csv.gz", {
        "subject_id": stays["subject_id"].to_numpy()[stay], "hadm_id": stays["hadm_id"].to_numpy()[stay],
        "stay_id": stays["stay_id"].to_numpy()[stay], "caregiver_id": caregiver,
        "charttime": sio.seconds_to_timestamps(charttime), "storetime": sio.seconds_to_timestamps(storetime),
        "itemid": itemid, "value": value, "valuenum": valuenum, "valueuom": uom,
        "warning": np.zeros(len(stay), dtype="int64")})


def write_labevents(cohort: Cohort, physiology: Physiology, rng: np.random.Generator, root: Path) -> int:
    """labevents.csv.gz (glucose 50931/50809, pH 50820) with every official column; returns the row count."""
    stays, admissions = cohort.stays, cohort.admissions
    n = len(stays)
    window = np.minimum((stays["outtime"] - stays["intime"]).to_numpy() / HOUR, CHART_HOURS)
    intime = stays["intime"].to_numpy()
    # Chemistry panels every ~12 h; blood gases every ~6 h with an arterial line, else now and then.
    chem_stay, chem_hours = schedule(rng, window, rng.uniform(10, 14, n), rng.uniform(0.0, 4.0, n))
    gases = physiology.arterial_line | (rng.random(n) < 0.6)
    gas_interval = np.where(physiology.arterial_line, rng.uniform(5, 8, n), rng.uniform(16, 30, n))
    gas_stay, gas_hours = schedule(rng, np.where(gases, window, -1.0), gas_interval, rng.uniform(0.2, 6.0, n))
    # Emergency-department labs before the ICU (and before the admission: no hadm_id).
    ed = np.flatnonzero(admissions["has_ed"].to_numpy()[stays["admission_row"]] & (stays["stay_number"] == 0))
    ed_seconds = admissions["edregtime"].to_numpy()[stays["admission_row"].to_numpy()[ed]] + \
        rng.uniform(0.3, 1.0, len(ed)) * HOUR
    ed_hours = (ed_seconds - intime[ed]) / HOUR
    ed_gas = rng.random(len(ed)) < 0.4
    draws = pd.DataFrame({
        "stay": np.r_[chem_stay, gas_stay, ed, ed[ed_gas]],
        "hours": np.r_[chem_hours, gas_hours, ed_hours, ed_hours[ed_gas]],
        "gas": np.r_[np.zeros(len(chem_stay), bool), np.ones(len(gas_stay), bool), np.zeros(len(ed), bool),
                     np.ones(int(ed_gas.sum()), bool)],
        "before_admission": np.r_[np.zeros(len(chem_stay) + len(gas_stay), bool), np.ones(len(ed), bool),
                                  np.ones(int(ed_gas.sum()), bool)],
    })
    draws["specimen_id"] = sio.unique_ids(rng, len(draws), 10_000_000, 100_000_000)[rng.permutation(len(draws))]
    # One row per measured item: chemistry -> 50931; gas -> 50820 (+ 50809 half of the time).
    chem = draws[~draws["gas"]].assign(itemid=50931)
    gas = draws[draws["gas"]]
    rows = pd.concat([chem, gas.assign(itemid=50820), gas[rng.random(len(gas)) < 0.5].assign(itemid=50809)],
                     ignore_index=True)
    s, h = rows["stay"].to_numpy(), rows["hours"].to_numpy()
    is_ph = rows["itemid"].to_numpy() == 50820
    numeric = np.where(is_ph, np.round(physiology.ph(s, h), 2), np.round(physiology.glucose(s, h)))
    charttime = (np.floor((intime[s] + h * HOUR) / 60.0) * 60).astype("int64")
    rows = rows.assign(charttime=charttime, numeric=numeric)
    rows = rows.assign(subject_id=stays["subject_id"].to_numpy()[s], hadm_id=stays["hadm_id"].to_numpy()[s])
    rows = rows.sort_values(["subject_id", "charttime", "specimen_id", "itemid"], kind="stable").reset_index(drop=True)
    m = len(rows)
    is_ph = rows["itemid"].to_numpy() == 50820
    numeric = rows["numeric"].to_numpy()
    failed = rng.random(m) < 0.006
    failure_text = np.where(rng.random(m) < 0.5, "___", "ERROR")
    value = pc.if_else(pa.array(failed), pa.array(failure_text),
                       pc.if_else(pa.array(is_ph), sio.fixed_text(numeric, 2), sio.number_text(numeric, 0)))
    valuenum = pa.array(numeric, mask=failed)
    lower = np.where(is_ph, 7.35, 70.0)
    upper = np.where(is_ph, 7.45, np.where(rows["itemid"].to_numpy() == 50809, 105.0, 100.0))
    abnormal = ~failed & ((numeric < lower) | (numeric > upper))
    no_hadm = rows["before_admission"].to_numpy() | (rng.random(m) < 0.03)
    is_glucose_chem = rows["itemid"].to_numpy() == 50931
    comment = np.where(is_glucose_chem & (rng.random(m) < 0.6),
                       "IF FASTING, 70-100 NORMAL, >125 PROVISIONAL DIABETES.", None)
    comment = np.where(failed, "___", comment)
    chemistry_priority = np.where(rng.random(m) < 0.55, "STAT", "ROUTINE")
    return sio.write_csv_gz(root / "hosp" / "labevents.csv.gz", {
        "labevent_id": np.arange(1, m + 1, dtype="int64") * 3 + rng.integers(0, 3, m),
        "subject_id": rows["subject_id"], "hadm_id": pa.array(rows["hadm_id"].to_numpy(), mask=no_hadm),
        "specimen_id": rows["specimen_id"], "itemid": rows["itemid"],
        "order_provider_id": pa.nulls(m, pa.string()),
        "charttime": sio.seconds_to_timestamps(rows["charttime"]),
        "storetime": sio.seconds_to_timestamps(rows["charttime"].to_numpy() + rng.integers(2, 120, m) * 60),
        "value": value, "valuenum": valuenum,
        "valueuom": np.where(is_ph, "units", "mg/dL"),
        "ref_range_lower": lower, "ref_range_upper": upper,
        "flag": np.where(abnormal, "abnormal", None),
        "priority": np.where(rows["gas"].to_numpy(), None, chemistry_priority),
        "comments": comment})


def write_dictionaries(root: Path) -> dict[str, int]:
    """d_items (icu) and d_labitems (hosp) for the items written, official columns."""
    columns = ["itemid", "label", "abbreviation", "linksto", "category", "unitname", "param_type", "lownormalvalue",
               "highnormalvalue"]
    items = pd.DataFrame(D_ITEMS, columns=columns)
    counts = {"d_items": sio.write_csv_gz(root / "icu" / "d_items.csv.gz", {
        c: (items[c].astype("Int64") if c in ("lownormalvalue", "highnormalvalue") else items[c]) for c in columns})}
    labs = pd.DataFrame(D_LABITEMS, columns=["itemid", "label", "fluid", "category"])
    counts["d_labitems"] = sio.write_csv_gz(root / "hosp" / "d_labitems.csv.gz", {c: labs[c] for c in labs.columns})
    return counts

