"""Dagster assets over the vla_pipeline library."""

import warnings

import dagster as dg

# Partitioned asset checks and backfill policies are marked preview/beta in this Dagster
# release; they are used on purpose (per-episode checks, one run per batch).
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
warnings.filterwarnings("ignore", category=dg.BetaWarning)
