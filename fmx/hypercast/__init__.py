"""HyperCast: the infrastructure around the models (logging tier, snapshots, stream replay)."""
