"""Bytes on disk and batches in memory: raw sources, TFDS builders, synthetic data, batching."""
