"""Fused inference kernels for CPU: convolution + bias + ReLU (+ residual add) in one oneDNN call.

After BatchNorm is folded into a convolution (``fold_batchnorm``), ``conv -> relu`` and
``relu(conv(x) + shortcut)`` run as a single oneDNN primitive with post-ops, which saves a
full pass over the activation memory per layer. A float32 3x3 stride-1 convolution may run as a Winograd
convolution instead (:mod:`.winograd`), where that is faster for its input shape (timed once per shape).
Used only by the inference path (``vertebra.inference.optimize_for_inference``) and only on CPU; elsewhere
(CUDA, export, a build without oneDNN) the same module falls back to the plain ops with identical results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .winograd import TILES, WinogradConv, choose, winograd_conv, winograd_eligible

#: below this many multiply-adds a 1x1 convolution runs as ATen's call (see FusedConv._tiny)
_TINY_MACS = 1_000_000
#: batch sizes a FusedConv / FusedLinear keeps a packed weight for
_PACKED_SHAPES = 4
#: a FusedLinear packs its weight for products of at least this many rows (fewer: F.linear, see its docstring)
_PACKED_MIN_ROWS = 4
#: Winograd is tried for a 3x3 convolution of at least this many C_in x C_out pairs (below, the transforms cost more
#: than they save)
_WINOGRAD_MIN_PAIRS = 64 * 64
#: what FusedConv.winograd may be: True (F(2x2) or F(4x4), whichever is fastest), "precise" (F(2x2) only: rounding as
#: the direct convolution's), False (never)
WINOGRAD_MODES = (True, "precise", False)


def check_winograd_mode(mode) -> None:
    """ValueError unless ``mode`` is one of :data:`WINOGRAD_MODES`."""
    if mode not in WINOGRAD_MODES:
        raise ValueError(f"winograd must be True, 'precise' or False, got {mode!r}")


def _weight_key(w: Tensor) -> tuple:
    """What a packed copy of ``w`` depends on: its dtype, storage and version (an inference tensor, made under
    ``torch.inference_mode``, has no version counter and cannot be changed in place outside it)."""
    return w.dtype, w.data_ptr(), 0 if w.is_inference() else w._version


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _capturing() -> bool:
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_exporting() or torch.compiler.is_compiling())


class FusedConv(nn.Module):
    """A (BN-folded) convolution with an optional fused ReLU, weights kept channels_last."""

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FusedConv needs explicit zero padding")
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.relu = relu
        self.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        self.winograd: bool | str = True
        self._packed: dict[tuple, Tensor] = {}
        self._winograd = WinogradConv()

    def _onednn(self, x: Tensor) -> bool:
        # plain ops whenever a graph is being captured (torch.jit.trace / the TorchScript ONNX exporter,
        # torch.export / the dynamo ONNX exporter, torch.compile): the oneDNN op must not reach a graph
        return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not _capturing() \
            and onednn_available() and not self._tiny(x)

    def _tiny(self, x: Tensor) -> bool:
        """A 1x1 convolution of under a million multiply-adds: a oneDNN call costs about 40 us on its own on this
        project's CPU, ATen's matrix product 13-20 us (ShuffleNet V2 0.5x at batch 1 is made of them)."""
        if self.groups != 1 or tuple(self.weight.shape[2:]) != (1, 1) or x.dim() != 4:
            return False
        pixels = x.shape[0] * (x.shape[2] // self.stride[0]) * (x.shape[3] // self.stride[1])
        return pixels * self.weight.shape[0] * self.weight.shape[1] < _TINY_MACS

    def _packed_weight(self, x: Tensor) -> Tensor:
        """The weight reordered once into oneDNN's blocked layout (the dense weight is otherwise reordered on
        every call: at batch 1 that costs up to a third of a late layer's time). The layout oneDNN picks depends
        on the batch size (a weight packed at batch 1 runs MobileNet v1 at batch 8 at half speed) but not on the
        spatial size (a detector's head runs one convolution on five levels: measured the same speed as one
        packed per level), so it is packed per batch size, for the latest few. Cached per weight dtype, storage
        and version too, so a cast or an in-place change of the weight repacks; the dense weight where oneDNN
        cannot pack it."""
        key = (x.shape[0], *_weight_key(self.weight))
        packed = self._packed.get(key)
        if packed is None:
            try:
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    self.weight.detach(), self.padding, self.stride, self.dilation, self.groups, list(x.shape))
            except (RuntimeError, AttributeError):
                packed = self.weight
            self._packed = {k: v for k, v in self._packed.items() if k[1:] == key[1:]}  # drop stale weights
            if len(self._packed) >= _PACKED_SHAPES:
                self._packed.pop(next(iter(self._packed)))
            self._packed[key] = packed
        return packed

    def __getstate__(self):  # copy.deepcopy / pickle: oneDNN's opaque tensors have no storage to copy
        state = dict(self.__dict__)
        state["_packed"] = {}
        state["_winograd"] = WinogradConv()  # rebuilt from the weight on first use
        return state

    def _call(self, x: Tensor, other: Tensor | None, relu: bool) -> Tensor:
        """``conv(x) (+ other) (then ReLU)`` in one call on the oneDNN path: as a Winograd convolution where
        :meth:`_tile` chose one for this input shape, else oneDNN's direct one with its post-ops."""
        m = self._tile(x, other, relu)
        return self._winograd_call(x, m, other, relu) if m else self._direct(x, other, relu)

    def _tile(self, x: Tensor, other: Tensor | None, relu: bool) -> int:
        """0 (oneDNN's direct convolution) or the Winograd tile size this input shape runs fastest with
        (:func:`.winograd.choose`, once per shape); 0 for what Winograd does not do (not 3x3 stride 1, not float32,
        not channels_last, few channels) and with ``winograd=False``."""
        if not self.winograd or self.in_channels * self.out_channels < _WINOGRAD_MIN_PAIRS \
                or not winograd_eligible(x, self.weight, self.stride, self.dilation, self.groups) \
                or not x.is_contiguous(memory_format=torch.channels_last):
            return 0
        candidates = {0: lambda: self._direct(x, other, relu)}
        candidates.update({m: (lambda m=m: self._winograd_call(x, m, other, relu)) for m in TILES})
        return choose(x, self.out_channels, self.padding, candidates, precise=self.winograd == "precise")

    def _winograd_call(self, x: Tensor, m: int, other: Tensor | None, relu: bool) -> Tensor:
        u = self._winograd.weights(self.weight, _weight_key(self.weight), m)
        return winograd_conv(x, u, m, self.padding, self.bias, relu=relu, residual=other)

    def _direct(self, x: Tensor, other: Tensor | None, relu: bool) -> Tensor:
        if other is not None:
            unary, algorithm = ("relu", "") if relu else (None, None)
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other.contiguous(memory_format=torch.channels_last), self._packed_weight(x), self.bias,
                self.padding, self.stride, self.dilation, self.groups, "add", 1.0, unary, [], algorithm)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed_weight(x), self.bias, self.padding, self.stride, self.dilation, self.groups,
            "relu" if relu else "none", [], "")

    def forward(self, x: Tensor) -> Tensor:
        if self._onednn(x):
            return self._call(x, None, self.relu)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.relu(y) if self.relu else y

    @torch.no_grad()
    def absorb_bn(self, bn: nn.Module, relu: bool = False) -> bool:
        """Fold a fixed-statistics BatchNorm that follows this convolution (and the ReLU after it, ``relu``) into
        it, in place; False (and nothing changed) where ``bn`` is not one (``conv_bn.bn_affine``)."""
        from .conv_bn import bn_affine

        affine = bn_affine(bn)
        if affine is None or self.relu:
            return False
        scale, shift = affine
        bias = self.bias if self.bias is not None else torch.zeros_like(shift)
        self.weight = nn.Parameter((self.weight * scale.reshape(-1, 1, 1, 1)).contiguous(
            memory_format=torch.channels_last), requires_grad=False)
        self.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
        self.relu = relu
        self._packed = {}
        return True

    def add(self, x: Tensor, other: Tensor) -> Tensor:
        """``conv(x) + other`` (a pre-activation unit's tail: no ReLU after the addition), in one call."""
        if self.relu:
            raise RuntimeError("add needs a convolution without its own ReLU")
        if self._onednn(x) and other.shape[1] == self.weight.shape[0]:
            return self._call(x, other, relu=False)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups) + other

    def add_relu(self, x: Tensor, other: Tensor) -> Tensor:
        """``relu(conv(x) + other)``: the tail of a residual block, in one call."""
        if self.relu:
            raise RuntimeError("add_relu needs a convolution without its own ReLU")
        if self._onednn(x) and other.shape[1] == self.weight.shape[0]:
            return self._call(x, other, relu=True)
        return F.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
                      + other)


def mkl_packed_linear_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class FusedLinear(nn.Module):
    """A linear layer whose float32 weight is packed once by MKL for the batch size it is called with, from 4 rows
    on, where the packed product is the faster; below, where the product is a memory-bound matrix-vector one, the
    packed call is the slower (``benchmarks/RESULTS.md``, "engine thresholds"), so 1-3 rows go to ``F.linear`` as
    do other dtypes and devices, a graph being captured and a build without MKL."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self._packed: dict[tuple, Tensor] = {}

    def __getstate__(self):  # copy.deepcopy / pickle: the packed weights are rebuilt on first use
        state = dict(self.__dict__)
        state["_packed"] = {}
        return state

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32 \
                or _capturing() or not mkl_packed_linear_available():
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        rows = x.numel() // max(self.in_features, 1)
        if rows < _PACKED_MIN_ROWS:
            return F.linear(x, self.weight, self.bias)
        key = (rows, *_weight_key(self.weight))
        packed = self._packed.get(key)
        if packed is None:
            try:
                packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), rows)
            except RuntimeError:
                return F.linear(x, self.weight, self.bias)
            if len(self._packed) >= _PACKED_SHAPES:
                self._packed.pop(next(iter(self._packed)))
            self._packed[key] = packed
        out = torch.ops.mkl._mkl_linear(x.reshape(rows, self.in_features).contiguous(), packed, self.weight,
                                        self.bias, rows)
        return out.reshape(*lead, self.out_features)


class PreActClamp(nn.Module):
    """``clamp(x, lo, hi)`` per channel: what remains of a pre-activation ``relu(bn(x))`` once its scale and shift
    are folded into the 1x1 convolutions that read it (:func:`fold_preact`)."""

    def __init__(self, lo: Tensor, hi: Tensor) -> None:
        super().__init__()
        self.register_buffer("lo", lo.reshape(1, -1, 1, 1))
        self.register_buffer("hi", hi.reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        lo, hi = self.lo.to(x.dtype), self.hi.to(x.dtype)
        if _capturing():  # ONNX's Clip takes scalar bounds only: Max / Min broadcast
            return torch.maximum(torch.minimum(x, hi), lo)
        return torch.clamp(x, lo, hi)


class PreActConv(nn.Module):
    """``conv(relu(bn(x)))`` of a pre-activation unit, for a 1x1 convolution without padding, as
    ``conv'(clamp(x, lo, hi))`` (:func:`fold_preact`): one elementwise pass over the input instead of the
    BatchNorm's and the ReLU's. Build it with :func:`preact_conv`."""

    def __init__(self, clamp: PreActClamp, conv: FusedConv) -> None:
        super().__init__()
        self.clamp = clamp
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.clamp(x))


@torch.no_grad()
def fold_preact(bn: nn.Module, convs: list[nn.Module]) -> PreActClamp | None:
    """``relu(bn(x))`` read by the 1x1 unpadded convolutions ``convs`` as a :class:`PreActClamp` whose output they
    read instead, their weights and biases changed in place; None (and nothing changed) where that is not exact:
    ``bn`` without fixed statistics, a convolution that is not a 1x1 unpadded :class:`FusedConv` (a padded one
    would see the clamped input's zero padding where the original sees relu(bn(0))).

    Per channel ``relu(a * x + b) == a * clamp(x) + b'`` with ``t = -b / a``: ``clamp = max(x, t)``, ``b' = b`` for
    ``a > 0``; ``min(x, t)``, ``b' = b`` for ``a < 0``; ``clamp = 0``, ``b' = relu(b)`` for ``a == 0``. The scale
    ``a`` goes into each convolution's input channels, and ``conv(b')`` (a constant: the kernel is 1x1 and
    unpadded) into its bias."""
    from .conv_bn import bn_affine

    affine = bn_affine(bn)
    if affine is None or not convs or any(
            not isinstance(c, FusedConv) or tuple(c.weight.shape[2:]) != (1, 1) or any(c.padding)
            or c.weight.shape[1] * c.groups != affine[0].numel() for c in convs):
        return None
    a, b = affine
    t = torch.where(a != 0, -b / torch.where(a != 0, a, 1), 0)
    inf = torch.full_like(t, float("inf"))
    lo = torch.where(a > 0, t, torch.where(a < 0, -inf, 0))
    hi = torch.where(a < 0, t, torch.where(a > 0, inf, 0))
    const = torch.where(a != 0, b, b.clamp_min(0))
    for conv in convs:
        w = conv.weight
        bias = F.conv2d(const.reshape(1, -1, 1, 1).to(w.dtype), w, None, groups=conv.groups).flatten()
        if conv.bias is not None:
            bias = bias + conv.bias
        cin = w.shape[1]
        scale = a.reshape(conv.groups, 1, cin).expand(conv.groups, w.shape[0] // conv.groups, cin) \
            .reshape(w.shape[0], cin)
        conv.weight = nn.Parameter((w * scale[:, :, None, None]).contiguous(memory_format=torch.channels_last),
                                   requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        conv._packed = {}
    return PreActClamp(lo, hi)


def preact_conv(bn: nn.Module, conv: nn.Module) -> PreActConv | None:
    """``bn -> relu -> conv`` as a :class:`PreActConv`, or None where :func:`fold_preact` says it is not exact."""
    clamp = fold_preact(bn, [conv])
    return None if clamp is None else PreActConv(clamp, conv)


class FusableTail:
    """A residual block whose tail ``relu(conv(x) + shortcut)`` can run as one :meth:`FusedConv.add_relu`.

    The block names its tail convolution (:meth:`tail_conv`) and reads ``fused_tail`` in its forward;
    :func:`fuse_conv_act` calls :meth:`fuse_for_inference` on every such block.
    """

    fused_tail: bool = False

    def tail_conv(self) -> nn.Module:
        raise NotImplementedError

    def fuse_for_inference(self) -> None:
        conv = self.tail_conv()
        self.fused_tail = isinstance(conv, FusedConv) and not conv.relu


def _plain_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and not isinstance(m.padding, str) and m.padding_mode == "zeros"


def fuse_conv_act(model: nn.Module) -> nn.Module:
    """For inference, in place, after BatchNorm folding: every plain ``nn.Conv2d`` becomes a :class:`FusedConv`
    (its weight packed once for oneDNN) and every ``nn.Linear`` a :class:`FusedLinear` (packed once for MKL).
    Inside an ``nn.Sequential``: the ReLU that follows a convolution (after Identities: a folded BatchNorm) is
    fused into it (``ConvBnAct``, the detector's head towers), and a pre-activation ``BatchNorm -> ReLU -> 1x1
    conv`` becomes a :class:`PreActConv`; the modules fused away become Identities.

    Then every module with a ``fuse_for_inference()`` method does its own fusions, where its forward combines
    modules outside a Sequential (:class:`FusableTail`'s residual tails, SqueezeNet's Fire, DenseNet's layer).
    """
    seqs = [m for m in model.modules() if isinstance(m, nn.Sequential)]
    for seq in seqs:
        names = list(seq._modules)
        for i, name in enumerate(names):
            if not _plain_conv(seq._modules[name]):
                continue
            j = i + 1
            while j < len(names) and isinstance(seq._modules[names[j]], nn.Identity):
                j += 1
            relu = j < len(names) and type(seq._modules[names[j]]) is nn.ReLU
            seq._modules[name] = FusedConv(seq._modules[name], relu)
            if relu:
                seq._modules[names[j]] = nn.Identity()
        for bn, act, conv in zip(names, names[1:], names[2:]):
            if type(seq._modules[act]) is nn.ReLU and (pre := preact_conv(seq._modules[bn], seq._modules[conv])):
                seq._modules[bn], seq._modules[act], seq._modules[conv] = nn.Identity(), nn.Identity(), pre
    for parent in list(model.modules()):
        for name, child in parent._modules.items():
            if child is not None and _plain_conv(child):
                parent._modules[name] = FusedConv(child, relu=False)
            elif type(child) is nn.Linear:
                parent._modules[name] = FusedLinear(child)
    for module in list(model.modules()):
        hook = getattr(module, "fuse_for_inference", None)
        if callable(hook) and not isinstance(module, (FusedConv, FusedLinear, PreActConv)):
            hook()
    return model


def set_winograd(model: nn.Module, mode: bool | str) -> nn.Module:
    """Every :class:`FusedConv` of ``model`` with ``winograd = mode`` (one of :data:`WINOGRAD_MODES`)."""
    check_winograd_mode(mode)
    for m in model.modules():
        if isinstance(m, FusedConv):
            m.winograd = mode
    return model
