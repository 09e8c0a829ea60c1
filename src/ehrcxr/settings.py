"""Per-model settings: the config's shared (harmonised) ``train:``/``cxr:`` sections, overridden by a model
entry's own keys and, under ``settings: published``, by the entry's ``published:`` block (the paper's values).

A model entry in ``models:`` may hold::

    modalities: [ehr, cxr]          # what it reads
    architecture: ddl_cxr           # the registered model it builds (default: its own name), so that variants of one
                                    # method are entries of their own
    generator: full                 # DDL-CXR: the generator (config ddl_cxr.generators) whose latents it reads
    missing: [natural]              # only these of the grid's missingness settings (default: all)
    pretrained: [ehr, cxr]          # parts loaded from a pretraining stage before the cell trains
    params: {...}                   # constructor arguments
    train: {...}                    # train: keys it always overrides (optimiser, lr, scheduler, ...)
    cxr: {...}                      # cxr: keys it always overrides (depth, augment, ...)
    published: {train: {...}, cxr: {...}, params: {...}, pretrained: [...]}   # the paper's settings, used
                                                                               # with settings: published
"""
from __future__ import annotations

import copy

SETTINGS_MODES = ("harmonised", "published")
PRETRAINED_PARTS = ("ehr", "cxr")
OVERRIDABLE = ("train", "cxr", "params")


def model_settings(config: dict, model: str) -> dict:
    """{'modalities', 'pretrained', 'params', 'train', 'cxr'} of ``model`` under ``config``, plus 'architecture' and
    'generator' where the entry sets them.

    ``train``/``cxr`` start from the config's sections; the entry's own ``train``/``cxr`` keys override
    them; with ``config['settings'] == 'published'`` the entry's ``published`` block overrides last (its
    ``params`` and ``pretrained`` too). ``cxr`` is empty for a model that reads no X-ray, so its cells ignore CXR settings.
    """
    if model not in config["models"]:
        raise KeyError(f"unknown model {model!r}; configured: {', '.join(config['models'])}")
    mode = config.get("settings", "harmonised")
    if mode not in SETTINGS_MODES:
        raise ValueError(f"settings must be one of {', '.join(SETTINGS_MODES)}; got {mode!r}")
    entry = config["models"][model]
    modalities = list(entry["modalities"])
    published = entry.get("published") or {}
    pretrained = list(published.get("pretrained", entry.get("pretrained", [])) if mode == "published"
                      else entry.get("pretrained", []))
    unknown = sorted(set(pretrained) - set(PRETRAINED_PARTS))
    if unknown or not set(pretrained) <= set(modalities):
        raise ValueError(f"model {model!r}: pretrained must list parts of its modalities {modalities} "
                         f"(of {', '.join(PRETRAINED_PARTS)}); got {pretrained}")
    resolved = {"params": dict(entry.get("params") or {}), "train": dict(config["train"]),
                "cxr": dict(config["cxr"]) if "cxr" in modalities else {}}
    layers = [entry] + ([published] if mode == "published" else [])
    for layer in layers:
        for section in OVERRIDABLE:
            if section == "params" and layer is entry:
                continue
            if section == "cxr" and "cxr" not in modalities:
                continue
            resolved[section].update(copy.deepcopy(layer.get(section) or {}))
    optional = {key: entry[key] for key in ("architecture", "generator") if key in entry}  # absent: no rerun of cells
    return {"modalities": modalities, "pretrained": pretrained, **optional, **resolved}
