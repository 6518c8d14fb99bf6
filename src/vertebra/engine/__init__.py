"""Training and evaluation: the engine that trains, evaluates and checkpoints vertebra models."""
