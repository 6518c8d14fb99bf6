"""Winograd convolution for inference on CPU: 3x3, stride 1, float32, as matrix products.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016, arXiv 1509.09308): an m x m output
tile of a 3x3 convolution is ``A^T [(G w G^T) * (B^T d B)] A`` for the (m + 2) x (m + 2) input tile ``d``, so the
convolution's multiply-adds per output pixel drop from 9 C_in to (m + 2)^2 / m^2 C_in: 4 C_in for F(2x2, 3x3),
2.25 C_in for F(4x4, 3x3). Over a whole layer the elementwise products become (m + 2)^2 matrix products
``[tiles, C_in] @ [C_in, C_out]``, which run at the machine's GEMM speed; the transforms are matrix products with
the Kronecker products ``B^T (x) B^T`` and ``A^T (x) A^T`` (small, constant). oneDNN computes these layers directly
(9 C_in per pixel), so where the layer is compute-bound (many channels) this is faster (a RetinaNet head's
256-channel convolutions: ``benchmarks/RESULTS.md``, retinanet_vs_torchvision).

Rounding: F(2x2, 3x3) uses the points 0, +-1 and is as exact as the direct convolution (measured: its float32 error
against float64 is below oneDNN's); F(4x4, 3x3) uses 0, +-1, +-2 and its float32 error is several times the direct
one's (about 1e-5 of the output's scale). :class:`WinogradConv` holds the transformed weights of both and
:func:`choose` decides per input shape, once, by timing (the choice is kept for the process): the direct
convolution, F(2x2) or F(4x4) if it is faster by a margin. ``precise=True`` leaves F(4x4) out.

Used by :class:`~vertebra.layers.fused.FusedConv` for its 3x3 stride-1 convolutions (``optimize_for_inference``),
and in float32 training on CPU by :class:`WinogradConv2d` (forward and data gradient; ``layers.gemm_conv``'s
training mode sends it the layers :func:`winograd_trainable` admits).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["TILES", "WinogradConv", "WinogradConv2d", "choose", "transform_weight", "winograd_conv",
           "winograd_eligible", "winograd_trainable"]

# the transforms (Lavin & Gray, Sec. 4.1 and 4.2): B^T (input), G (filter), A^T (output)
_BT2 = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
_G2 = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
_AT2 = [[1, 1, 1, 0], [0, 1, -1, -1]]
_BT4 = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1]]
_G4 = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
       [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT4 = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]

#: output tile size m -> (B^T, G, A^T)
TILES = {2: (_BT2, _G2, _AT2), 4: (_BT4, _G4, _AT4)}
#: a block of tile rows holds about this many input-transform elements (stays in a core's cache), but never fewer
#: tiles than the layer has output channels: each block reads the whole transformed weight ((m + 2)^2 C_in C_out
#: elements, 38 MB for 512 channels in F(4x4)), so small blocks of a small, wide layer would be bound by that read
_BLOCK_ELEMENTS = 1 << 19
#: a Winograd variant is chosen over the direct convolution only if it is at least this much faster
_MARGIN = 0.9


class _Transforms:
    """The Kronecker products of one tile size: ``kb`` [a^2, a^2] (input tile -> transformed tile), ``ka``
    [m^2, a^2] (product -> output tile) and ``kg`` [a^2, 9] (3x3 filter -> transformed filter), per dtype."""

    def __init__(self, m: int):
        bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in TILES[m])
        self.m, self.a = m, m + 2
        self._k = {torch.float64: tuple(torch.kron(t, t).contiguous() for t in (bt, at, g))}

    def __call__(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        k = self._k.get(dtype)
        if k is None:
            k = self._k[dtype] = tuple(t.to(dtype) for t in self._k[torch.float64])
        return k


_TRANSFORMS = {m: _Transforms(m) for m in TILES}


def transform_weight(weight: Tensor, m: int, compute: torch.dtype = torch.float64) -> Tensor:
    """``G w G^T`` of every (C_out, C_in) pair as ``[(m + 2)^2, C_in, C_out]`` in ``weight``'s dtype: one matrix
    product ``(G (x) G) vec(w)``, computed in ``compute`` (float64 for the inference path's weights, made once;
    the weight's own dtype in training, which transforms after every optimizer step)."""
    co, ci = weight.shape[:2]
    kg = _TRANSFORMS[m](compute)[2].to(weight.device)
    u = kg @ weight.detach().to(compute).reshape(co * ci, 9).t()
    return u.view((m + 2) ** 2, co, ci).transpose(1, 2).to(weight.dtype).contiguous()


def winograd_eligible(x: Tensor, weight: Tensor, stride, dilation, groups: int) -> bool:
    """A 3x3, stride-1, undilated, ungrouped float32 convolution of a 4-D CPU input (what the inference path sends
    here; :func:`winograd_conv` itself also computes float64)."""
    return (x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and tuple(weight.shape[2:]) == (3, 3) and groups == 1 and tuple(stride) == (1, 1)
            and tuple(dilation) == (1, 1))


def winograd_conv(x: Tensor, u: Tensor, m: int, padding, bias: Tensor | None = None, relu: bool = False,
                  residual: Tensor | None = None) -> Tensor:
    """The 3x3 stride-1 convolution of ``x`` (NCHW, any layout; channels_last is the fast one) with the transformed
    weight ``u`` (:func:`transform_weight`) as F(m x m, 3x3), ``+ bias``, ``+ residual``, then ReLU if ``relu``.
    Returns a channels_last tensor."""
    t = _TRANSFORMS[m]
    kb, ka, _ = t(x.dtype)
    a, aa = t.a, t.a * t.a
    n, c, h, w = x.shape
    co = u.shape[2]
    ph, pw = padding
    ho, wo = h + 2 * ph - 2, w + 2 * pw - 2
    th, tw = -(-ho // m), -(-wo // m)
    # NHWC, padded so that th x tw tiles of a x a fit (the tiles overlap by 2)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, tw * m + 2 - w - pw, ph, th * m + 2 - h - ph))
    s = xp.stride()
    exact = ho == th * m and wo == tw * m
    out = torch.empty((n, co, ho, wo) if exact else (n, co, th * m, tw * m), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    oh = out.permute(0, 2, 3, 1)  # NHWC view of the output
    res = None if residual is None else residual.permute(0, 2, 3, 1)
    if res is not None and not exact:
        res = F.pad(res, (0, 0, 0, tw * m - wo, 0, th * m - ho))
    per_row = n * tw  # tiles in one row of tiles over the batch
    tiles_wanted = max(co, _BLOCK_ELEMENTS // max(1, aa * max(c, co)))
    rows = max(1, min(th, -(-tiles_wanted // per_row)))
    bias_row = None
    for r0 in range(0, th, rows):
        tb = min(rows, th - r0)
        tiles = n * tb * tw
        d = xp.as_strided((a, a, n, tb, tw, c), (s[1], s[2], s[0], m * s[1], m * s[2], s[3]),
                          xp.storage_offset() + r0 * m * s[1]).reshape(aa, tiles * c)
        v = torch.mm(kb, d).view(aa, tiles, c)
        prod = torch.bmm(v, u).view(aa, tiles * co)
        if bias is not None:
            if bias_row is None or bias_row.shape[1] != tiles * co:
                bias_row = bias.repeat(tiles).view(1, -1)
            y = torch.addmm(bias_row, ka, prod)
        else:
            y = torch.mm(ka, prod)
        y = y.view(m, m, n, tb, tw, co).permute(2, 3, 0, 4, 1, 5)  # [N, tb, m, tw, m, Co]
        dst = oh[:, r0 * m:(r0 + tb) * m].view(n, tb, m, tw, m, co)
        if res is not None:
            torch.add(y, res[:, r0 * m:(r0 + tb) * m].reshape(n, tb, m, tw, m, co), out=dst)
            if relu:
                dst.clamp_min_(0)
        elif relu:
            torch.clamp_min(y, 0, out=dst)
        else:
            dst.copy_(y)
    if not exact:
        out = out[:, :, :ho, :wo].contiguous(memory_format=torch.channels_last)
    return out


class WinogradConv:
    """The transformed weights of one convolution for F(2x2) and F(4x4), rebuilt when the weight changes."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._u: dict[int, Tensor] = {}

    def weights(self, weight: Tensor, key: tuple, m: int) -> Tensor:
        if key != self._key:
            self._key, self._u = key, {}
        u = self._u.get(m)
        if u is None:
            u = self._u[m] = transform_weight(weight, m)
        return u


#: (input shape, C_out, padding, threads, precise) -> 0 (direct) or the tile size m; decided once per process
_CHOICES: dict[tuple, int] = {}


def _time(fn: Callable[[], Tensor]) -> float:
    """Seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _fastest_times(candidates: dict[int, Callable[[], Tensor]], rounds: int = 3) -> dict[int, float]:
    """The fastest of ``rounds`` timed calls of each candidate, after one untimed call of each (packed weights,
    transformed weights, allocations); the candidates take turns, so a disturbance falls on all of them alike."""
    for fn in candidates.values():
        fn()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for k, fn in candidates.items():
            best[k] = min(best[k], _time(fn))
    return best


def choose(x: Tensor, co: int, padding, candidates: dict[int, Callable[[], Tensor]], precise: bool = False) -> int:
    """0 (``candidates[0]``, the direct convolution) or the tile size whose candidate runs this input shape fastest,
    timed once per process and shape (a Winograd variant must beat the direct one by 10 %)."""
    key = (tuple(x.shape), co, tuple(padding), torch.get_num_threads(), precise)
    choice = _CHOICES.get(key)
    if choice is None:
        with torch.inference_mode():
            times = _fastest_times({k: fn for k, fn in candidates.items() if not (precise and k == 4)})
        best = min(times, key=times.get)
        choice = best if best == 0 or times[best] < _MARGIN * times[0] else 0
        _CHOICES[key] = choice
    return choice


# -- training ------------------------------------------------------------------------------------------------------

#: the smallest layer (C_in x C_out pairs, output pixels over the batch) whose training convolution runs as F(4x4):
#: below, the transforms cost more than the products save (``benchmarks/RESULTS.md``, "engine thresholds")
_TRAIN_MIN_PAIRS = 128 * 128
_TRAIN_MIN_PIXELS = 8192


def winograd_trainable(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    """A float32 3x3 stride-1 convolution of a channels_last CPU input with at least 128 x 128 channel pairs and
    8192 output pixels over the batch (a RetinaNet head's towers at 512 px and above, VGG's early 128- and
    256-channel layers), padding at most 2. A rule, not a timing: a resumed run makes the same choices."""
    if not winograd_eligible(x, weight, stride, dilation, groups) or isinstance(padding, str):
        return False
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if not (0 <= ph <= 2 and 0 <= pw <= 2) or weight.shape[0] * weight.shape[1] < _TRAIN_MIN_PAIRS:
        return False
    pixels = x.shape[0] * (x.shape[2] + 2 * ph - 2) * (x.shape[3] + 2 * pw - 2)
    return pixels >= _TRAIN_MIN_PIXELS and x.is_contiguous(memory_format=torch.channels_last)


class WinogradConv2d(torch.autograd.Function):
    """A trainable F(4x4, 3x3) convolution: forward and the data gradient (the convolution of the output gradient
    with the flipped, transposed weight, padding 2 - p) as :func:`winograd_conv`; the weight and bias gradients as
    oneDNN's ``convolution_backward``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return winograd_conv(x, transform_weight(weight, 4, weight.dtype), 4, padding, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        ph, pw = ctx.padding
        grad = grad.contiguous(memory_format=torch.channels_last)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3).transpose(0, 1)
            gx = winograd_conv(grad, transform_weight(flipped, 4, flipped.dtype), 4, (2 - ph, 2 - pw))
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [ph, pw], [1, 1], False,
                [0, 0], 1, [False, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]])
        return gx, gw, gb, None
