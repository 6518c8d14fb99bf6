"""Training techniques of the Inception line, ready for the training engine.

From Szegedy et al., "Going Deeper with Convolutions" (GoogLeNet, arXiv 1409.4842) and
"Rethinking the Inception Architecture for Computer Vision" (Inception-v2/v3, arXiv 1512.00567):

- :func:`aux_loss`: the auxiliary-classifier loss weighting. GoogLeNet adds the losses of its
  two auxiliary classifiers with weight 0.3 (Sec. 5) and discards them at inference. The
  Rethinking paper keeps one BN-auxiliary classifier but gives no weight; TF-slim's training
  script (``train_image_classifier.py``), which trained the released Inception-v3, weights it
  0.4: :data:`GOOGLENET_AUX_WEIGHT`, :data:`INCEPTION_V3_AUX_WEIGHT`.
  :func:`default_aux_weight` picks the weight of a network's own paper.
- :func:`label_smoothing_cross_entropy`: label-smoothing regularisation (Sec. 7): the target
  becomes ``(1 - eps) * onehot + eps / K`` (the uniform prior u(k) = 1/K), eps = 0.1 for ImageNet.
- RMSProp as in Sec. 8 ("RMSProp with decay of 0.9 and eps = 1.0 ... a learning rate of 0.045,
  decayed every two epochs using an exponential rate of 0.94") is the engine's ``--optimizer
  rmsprop`` (:class:`vertebra.engine.optim.RMSpropTF`, TensorFlow's update) with the named
  ``"inception"`` schedule (:func:`vertebra.engine.optim.lr_factor`).
- :func:`clip_gradients`: gradient clipping with threshold 2.0 (Sec. 8), on the global norm
  (Pascanu et al., the paper's reference [14]; TF-slim's ``clip_gradient_norm``).
- :class:`ModelEma`: "model evaluations are performed using a running average of the
  parameters computed over time" (Sec. 8): an exponential moving average of the weights (and
  of the BatchNorm statistics, as TF-slim's ``moving_average_decay`` averages all model
  variables), with ``update``, an ``applied_to`` context that evaluates with the averaged
  weights, ``copy`` for a standalone averaged model, and ``state_dict`` for checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GOOGLENET_AUX_WEIGHT",
    "INCEPTION_V3_AUX_WEIGHT",
    "ModelEma",
    "aux_loss",
    "clip_gradients",
    "default_aux_weight",
    "label_smoothing_cross_entropy",
]

#: GoogLeNet (Sec. 5): "their loss is added to the total loss of the network with a discount weight" 0.3
GOOGLENET_AUX_WEIGHT = 0.3
#: Inception-v3: not in the paper; TF-slim's train_image_classifier.py uses 0.4
INCEPTION_V3_AUX_WEIGHT = 0.4
#: the auxiliary-loss weight of each paper (by arXiv id) that trains auxiliary classifiers
AUX_WEIGHT_BY_PAPER = {"1409.4842": GOOGLENET_AUX_WEIGHT, "1512.00567": INCEPTION_V3_AUX_WEIGHT}


def default_aux_weight(spec) -> float:
    """The auxiliary-loss weight a network's paper trained with (a :class:`~vertebra.registry.BackboneSpec`):
    Inception-v3's 0.4, else GoogLeNet's 0.3."""
    return AUX_WEIGHT_BY_PAPER.get(spec.arxiv or "", GOOGLENET_AUX_WEIGHT)


# -- auxiliary classifiers -----------------------------------------------------------------


def aux_loss(outputs, target: Tensor, weights: float | Sequence[float] = GOOGLENET_AUX_WEIGHT,
             criterion=F.cross_entropy) -> Tensor:
    """The training loss of a net with auxiliary classifiers.

    ``outputs`` is what ``model(x)`` returns: ``(logits, aux_1, ..., aux_n)`` in train mode with
    ``aux_logits=True``, or the logits alone (eval mode, no aux heads), in which case this is
    ``criterion(logits, target)``. Returns ``criterion(logits) + sum_i w_i * criterion(aux_i)``;
    ``weights`` is one weight for every auxiliary output or one per output.
    """
    if isinstance(outputs, Tensor):
        return criterion(outputs, target)
    logits, *aux = outputs
    ws = [float(weights)] * len(aux) if isinstance(weights, (int, float)) else [float(w) for w in weights]
    if len(ws) != len(aux):
        raise ValueError(f"{len(aux)} auxiliary outputs but {len(ws)} weights")
    loss = criterion(logits, target)
    for w, a in zip(ws, aux):
        loss = loss + w * criterion(a, target)
    return loss


# -- label smoothing -----------------------------------------------------------------------


def label_smoothing_cross_entropy(logits: Tensor, target: Tensor, smoothing: float = 0.1,
                                  reduction: str = "mean") -> Tensor:
    """Cross-entropy against ``(1 - smoothing) * onehot(target) + smoothing / K``.

    ``target`` holds class indices (N,) or is already a distribution (N, K).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    logp = F.log_softmax(logits.float(), dim=-1)
    k = logits.shape[-1]
    if target.dtype.is_floating_point:
        q = target.float() * (1.0 - smoothing) + smoothing / k
        loss = -(q * logp).sum(-1)
    else:
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        loss = (1.0 - smoothing) * nll - smoothing * logp.mean(-1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# -- gradient clipping ---------------------------------------------------------------------


def clip_gradients(params: nn.Module | Iterable[Tensor], max_norm: float = 2.0) -> Tensor:
    """Rescale the gradients so that their global L2 norm is at most ``max_norm`` (the paper's
    threshold 2.0); returns the norm before clipping. Call between ``backward`` and ``step``."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


# -- running average of the parameters -----------------------------------------------------


class ModelEma:
    """An exponential moving average of a model's weights, for evaluation.

    ``shadow = decay * shadow + (1 - decay) * current`` over every floating-point entry of the
    model's state_dict (parameters and BatchNorm running statistics); integer buffers are
    copied. With ``warmup=True`` the decay of update n is ``min(decay, (1 + n) / (10 + n))``,
    as TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` does, so early averages are
    not dominated by the random initialisation.

    Usage::

        ema = ModelEma(model, decay=0.9999)
        for x, y in loader:
            ...; opt.step(); ema.update(model)
        with ema.applied_to(model):      # evaluate with the averaged weights
            evaluate(model)
        averaged = ema.copy(model)       # or a standalone averaged model
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        state = model.state_dict()
        if state.keys() != self.shadow.keys():
            raise ValueError("ModelEma.update: the model's state_dict keys differ from the averaged model's")
        floats_s, floats_v = [], []
        for k, v in state.items():
            s = self.shadow[k]
            if s.dtype.is_floating_point:
                floats_s.append(s)
                floats_v.append(v.detach().to(s.dtype))
            else:
                s.copy_(v)
        if floats_s:  # one fused multi-tensor kernel instead of a Python loop of lerps
            torch._foreach_lerp_(floats_s, floats_v, 1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Load the averaged weights into ``model`` for the ``with`` block, then restore its own."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(backup)

    def copy(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` holding the averaged weights, in eval mode."""
        out = copy.deepcopy(model)
        out.load_state_dict(self.shadow)
        return out.eval()

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = {"decay", "warmup", "num_updates", "shadow"} - set(state)
        if missing:
            raise ValueError(f"ModelEma.load_state_dict: missing {', '.join(sorted(missing))}")
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("ModelEma.load_state_dict: the averaged weights do not match this model")
        self.decay, self.warmup, self.num_updates = float(state["decay"]), bool(state["warmup"]), \
            int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
