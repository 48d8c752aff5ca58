"""Dagster assets over the vla_pipeline library."""
