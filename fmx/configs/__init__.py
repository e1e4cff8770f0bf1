"""Experiment configs: one module per family, variants through the config argument."""
