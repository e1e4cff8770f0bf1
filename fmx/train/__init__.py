"""Trainers (train_step, eval, loops) and the losses, metrics, sharding and checkpointing they use."""
