"""Training and evaluation: the engine that trains, evaluates and checkpoints vertebra models.

``Trainer(TrainConfig(...)).fit()`` trains (:mod:`.train`); :mod:`.tasks` says what detection and
classification each need; :func:`load_model` rebuilds the model of a checkpoint."""

from .models import load_model

__all__ = ["load_model"]
