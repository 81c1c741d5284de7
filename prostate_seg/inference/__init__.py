"""Inference stage: a checkpoint on whole volumes (predictor), per-patient scores of held-out
patients (evaluate, metrics) and masks of new scans (predict)."""
