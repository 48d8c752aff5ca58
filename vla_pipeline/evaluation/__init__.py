"""Evaluation stage: direction metrics and baselines, the evaluation over validation episodes and
its report, and the MLflow registry with its promotion gate and policy lookup. Imports the
stages below it (data, policy, training)."""
