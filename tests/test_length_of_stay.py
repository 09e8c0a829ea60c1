"""The third task, length of stay: CareBench's 7 classes, a softmax head with cross-entropy, and its metrics
(accuracy, macro-F1, linear-weighted kappa) under shared bootstrap resamples, checked against scikit-learn."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from ehrcxr.data.tasks import LOS_LABELS, is_multiclass, length_of_stay_classes, task_stays, tensor_task
from ehrcxr.evaluate.bootstrap import resample_counts
from ehrcxr.evaluate.multiclass import multiclass_resample_stats
from ehrcxr.train.cell import run_cell
from ehrcxr.train.loop import label_loss, label_probabilities
from test_train import IMAGE, _train_params, settings, stay_plan, write_cell_files


def test_classes_follow_carebench_day_bins():
    hours = pd.Series([47.9, 48.0, 71.99, 72.0, 120.0, 167.9, 168.0, 335.9, 336.0, 2000.0])
    classes = length_of_stay_classes(hours)
    assert list(classes.columns) == LOS_LABELS
    expected = [None, 0, 0, 1, 3, 4, 5, 5, 6, 6]  # [2,3) [3,4) [4,5) [5,6) [6,7) [7,14) >=14 days
    for row, k in enumerate(expected):
        assert classes.iloc[row].sum() == (0 if k is None else 1)
        if k is not None:
            assert classes.iloc[row, k] == 1
    stays = pd.DataFrame({"stay_id": [3, 1, 2], "in_mortality_task": [True, True, False],
                          "los_hours": [50.0, 47.5, 10.0]})
    # mortality_min_hours below 2 days: the 47.5-h stay is in the mortality task but has no length-of-stay class
    assert task_stays(stays, "length_of_stay")["stay_id"].tolist() == [3]
    assert task_stays(stays, "mortality")["stay_id"].tolist() == [1, 3]
    assert is_multiclass("length_of_stay") and not is_multiclass("phenotyping")
    assert tensor_task("length_of_stay") == "mortality"


def test_multiclass_metrics_equal_sklearn_on_every_resample():
    rng = np.random.default_rng(0)
    n, k = 300, 7
    true = rng.choice(k, size=n, p=[0.3, 0.2, 0.15, 0.1, 0.05, 0.15, 0.05])
    y = np.eye(k, dtype=np.int8)[true]
    p_by_seed = [rng.dirichlet(np.ones(k), size=n) + 0.8 * np.eye(k)[true] * rng.random((n, 1)) for _ in range(2)]
    weights = np.vstack([np.ones((1, n)), resample_counts(n, 40, rng)])
    values = multiclass_resample_stats(y, p_by_seed, weights)
    for b, row in enumerate(weights):
        index = np.repeat(np.arange(n), row.astype(int))
        expected = {"accuracy": [], "macro_f1": [], "kappa_linear": []}
        for p in p_by_seed:
            predicted = p.argmax(axis=1)
            expected["accuracy"].append(accuracy_score(true[index], predicted[index]))
            expected["macro_f1"].append(f1_score(true[index], predicted[index], average="macro", zero_division=0))
            expected["kappa_linear"].append(cohen_kappa_score(true[index], predicted[index], labels=np.arange(k),
                                                              weights="linear"))
        for metric, seed_values in expected.items():
            assert values[metric][b] == pytest.approx(np.mean(seed_values), abs=1e-12), (metric, b)


def test_softmax_head_and_cross_entropy_for_one_hot_classes():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    expected = -(torch.log_softmax(logits, dim=1) * labels).sum(dim=1).mean()
    assert label_loss(logits, labels, multiclass=True).item() == pytest.approx(expected.item())
    assert label_loss(logits, labels).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, labels).item())
    torch.testing.assert_close(label_probabilities(logits, multiclass=True).sum(dim=1), torch.ones(2))


def test_length_of_stay_cell_trains_a_softmax_classifier(tmp_path):
    files = write_cell_files(tmp_path)
    values = files["values"]
    # the class is the decile band of the first EHR value at hour 0, so the tiny model can learn it
    edges = np.quantile(values[:, 0, 0], [0.3, 0.5, 0.65, 0.75, 0.8, 0.95])
    true = np.searchsorted(edges, values[:, 0, 0])
    plan = stay_plan()
    stays = pd.read_parquet(files["stays"])
    stays["los_hours"] = 48.0 + 24.0 * true
    stays.loc[true == 6, "los_hours"] = 400.0
    stays[LOS_LABELS] = np.eye(7, dtype=np.int8)[true]
    stays.to_parquet(files["stays"])
    inputs = {key: files[key] for key in ("stays", "ehr", "cxr_index", "cxr_images")}
    summary = run_cell(inputs, tmp_path / "run", "length_of_stay", "tiny_test_model", "natural", 1,
                       settings(["ehr", "cxr"], {"dropout": 0.0}, cxr={"image_size": IMAGE},
                                train=_train_params(epochs=30, lr=0.05, patience=30)))
    predictions = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    test = predictions[predictions["eval_set"] == "partial_test"]
    p = test[[f"p_{label}" for label in LOS_LABELS]].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)  # softmax over the classes
    y = test[[f"y_{label}" for label in LOS_LABELS]].to_numpy()
    assert (y.sum(axis=1) == 1).all() and len(test) == (plan["in_mortality_task"] & (plan["split"] == "test")).sum()
    true_test, predicted = y.argmax(axis=1), p.argmax(axis=1)
    assert accuracy_score(true_test, predicted) > np.bincount(true_test).max() / len(true_test)  # > majority class
    assert cohen_kappa_score(true_test, predicted, weights="linear") > 0.5  # ordered bands: mostly adjacent errors
    assert summary["metrics"]["partial_test"]["auroc"] == pytest.approx(
        np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(7) if 0 < y[:, j].sum() < len(y)]))
