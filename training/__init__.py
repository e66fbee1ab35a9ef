"""Training machinery behind train.py: optimizer, checkpoints, the loop."""
