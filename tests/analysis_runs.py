"""Run directories (metrics.json + predictions.parquet, as ehrcxr.train.cell.run_cell writes them) with
predictions the analysis tests choose, so every statistic can be checked against an independent computation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

SETS = ("val", "paired_test", "partial_test")


def write_run(root: Path, task: str, model: str, missing: str, seed: int, labels: list[str],
              sets: dict[str, dict]) -> Path:
    """Write one run under ``root/runs/{task}/{model}/{missing}/seed{seed}``.

    ``sets``: eval_set -> {'stay_id': (N,), 'y': (N, L), 'p': (N, L), optional 'p_nocxr', 'p_noehr' (default
    'p'), 'has_cxr' (N,) (default 1 on paired_test, else alternating)}. Returns the run directory."""
    run = Path(root) / "runs" / task / model / missing / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    frames = []
    for eval_set, arrays in sets.items():
        stay_id = np.asarray(arrays["stay_id"], dtype=np.int64)
        n = stay_id.size
        default_cxr = np.ones(n) if eval_set == "paired_test" else np.arange(n) % 2
        frame = pd.DataFrame({"stay_id": stay_id, "eval_set": eval_set,
                              "has_cxr": np.asarray(arrays.get("has_cxr", default_cxr)).astype(np.int8)})
        y = np.asarray(arrays["y"]).reshape(n, len(labels))
        for j, label in enumerate(labels):
            frame[f"y_{label}"] = y[:, j].astype(np.int8)
        for prefix in ("p", "p_nocxr", "p_noehr"):
            p = np.asarray(arrays.get(prefix, arrays["p"]), dtype=np.float64).reshape(n, len(labels))
            for j, label in enumerate(labels):
                frame[f"{prefix}_{label}"] = p[:, j]
        frames.append(frame)
    pd.concat(frames, ignore_index=True).to_parquet(run / "predictions.parquet", index=False)
    (run / "metrics.json").write_text(json.dumps({
        "task": task, "model": model, "missing": missing, "seed": seed, "labels": labels,
        "selection_metric": "val_auprc", "best_epoch": 1}))
    return run


def noisy_scores(rng: np.random.Generator, y: np.ndarray, signal: float) -> np.ndarray:
    """Scores in (0, 1) that separate the classes of ``y`` by ``signal`` standard deviations."""
    return 1.0 / (1.0 + np.exp(-(signal * (np.asarray(y) - 0.5) + rng.standard_normal(np.shape(y)))))
