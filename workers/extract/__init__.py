"""Extraction: the per-rank loop, its setup, the shard pipeline, window presets and batched inference."""
