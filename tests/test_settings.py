"""Per-model settings: shared sections, a model's own overrides, and the published block."""
from __future__ import annotations

import pytest

from ehrcxr.settings import model_settings

CONFIG = {
    "train": {"epochs": 50, "lr": 1e-4, "optimiser": "adamw", "selection": "val_auprc"},
    "cxr": {"depth": 34, "frozen_stages": 0, "augment": None},
    "models": {
        "ehr_lstm": {"modalities": ["ehr"], "params": {"hidden": 256}, "train": {"lr": 5e-4},
                     "published": {"train": {"optimiser": "adam"}}},
        "medfuse": {"modalities": ["ehr", "cxr"], "pretrained": ["ehr", "cxr"], "params": {"hidden": 256},
                    "cxr": {"depth": 18},
                    "published": {"train": {"optimiser": "adam", "selection": "val_auroc", "lr": 7e-5},
                                  "cxr": {"depth": 50}, "params": {"dropout": 0.3}, "pretrained": ["cxr"]}},
    },
}


def test_harmonised_settings_are_the_shared_sections_plus_own_overrides():
    medfuse = model_settings(CONFIG, "medfuse")
    assert medfuse == {"modalities": ["ehr", "cxr"], "pretrained": ["ehr", "cxr"], "params": {"hidden": 256},
                       "train": {"epochs": 50, "lr": 1e-4, "optimiser": "adamw", "selection": "val_auprc"},
                       "cxr": {"depth": 18, "frozen_stages": 0, "augment": None}}
    lstm = model_settings(CONFIG, "ehr_lstm")
    assert lstm["train"]["lr"] == 5e-4 and lstm["cxr"] == {} and lstm["pretrained"] == []
    assert CONFIG["train"]["lr"] == 1e-4  # the shared section is not modified


def test_published_settings_override_last():
    published = dict(CONFIG, settings="published")
    medfuse = model_settings(published, "medfuse")
    assert medfuse["train"] == {"epochs": 50, "lr": 7e-5, "optimiser": "adam", "selection": "val_auroc"}
    assert medfuse["cxr"]["depth"] == 50 and medfuse["params"] == {"hidden": 256, "dropout": 0.3}
    assert medfuse["pretrained"] == ["cxr"]
    assert model_settings(published, "ehr_lstm")["train"] == {**CONFIG["train"], "lr": 5e-4, "optimiser": "adam"}


def test_bad_declarations_are_refused():
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        model_settings(CONFIG, "nope")
    with pytest.raises(ValueError, match="settings must be one of harmonised, published; got 'paper'"):
        model_settings(dict(CONFIG, settings="paper"), "medfuse")
    bad = {**CONFIG, "models": {"ehr_lstm": {"modalities": ["ehr"], "pretrained": ["cxr"]}}}
    with pytest.raises(ValueError, match=r"model 'ehr_lstm': pretrained must list parts of its modalities"):
        model_settings(bad, "ehr_lstm")
