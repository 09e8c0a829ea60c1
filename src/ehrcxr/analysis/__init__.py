"""Analyses of the grid's predictions: fusion gain, modality imbalance, ranking, robustness, fairness, calibration."""
