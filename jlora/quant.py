"""Blockwise 4-bit and 8-bit weight quantization, bit-compatible with bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, §3) stores a frozen weight as
4-bit NormalFloat (NF4) codes with one absmax scale per block of 64 values,
and double-quantizes those scales (§3, "Double Quantization"):

* **Blocks.** The weight is read in PyTorch's ``(out, in)`` order, flattened
  row-major and cut into blocks of ``block_size`` values, i.e. blocks run along
  the *contracting* axis within each output column (a jlora kernel ``K`` of
  shape ``(in, out)`` is quantized as ``Kᵀ``). The last block may be partial.
* **Codes.** ``absmax_j = max |w|`` over block ``j``;
  ``q = argmin_k |code_k − clip(w/absmax_j, −1, 1)|``, ties to the lower
  index (bitsandbytes buckets by the midpoints of the sorted codebook).
  4-bit codes are packed two per ``uint8``, the first value in the high nibble.
* **Double quantization.** ``c = mean(absmax)``; ``absmax − c`` is quantized
  blockwise (256 scales a block) with bitsandbytes' signed 8-bit dynamic map
  (Dettmers 2016, arXiv 1511.04561): ``uint8`` codes and one float32 scale per
  256 blocks. Storage is ``4 + 8/64 + 32/(64·256) ≈ 4.127`` bits a parameter.
* **Dequantization.** ``w = code[q]·absmax_j`` in float32, then the compute
  dtype; with double quantization ``absmax_j = code8[q2_j]·absmax2_{⌊j/256⌋} + c``.

``quant`` is ``"nf4"`` (the NF4 codebook: the 16 values of bitsandbytes'
``get_4bit_type("nf4")``), ``"fp4"`` (bitsandbytes' FP4, E2M1, codes in its
bit-pattern order) or ``"int8"`` (per-block absmax, ``q = round(127·w/absmax)``,
one signed byte a value).

Example::

    >>> import jax, jax.numpy as jnp, jlora
    >>> k = jax.random.normal(jax.random.key(0), (128, 32))   # (in, out)
    >>> q = jlora.quantize(k)                                 # NF4, blocks of 64, DQ
    >>> q.codes.shape, q.codes.dtype                          # (out, in/2) packed
    ((32, 64), dtype('uint8'))
    >>> err = jnp.abs(jlora.dequantize(q) - k).max() / jnp.abs(k).max()
    >>> bool(err < 0.2), round(q.nbytes / k.size, 3)
    (True, 0.518)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._validate import boolean, choice, floating_dtype, int_tuple, positive_int

Array = jax.Array

QUANTS = ("nf4", "fp4", "int8")
DQ_BLOCK = 256  # scales per double-quantization block (bitsandbytes)

#: The NF4 codebook, bitsandbytes ``get_4bit_type("nf4")`` (QLoRA §3, Eq. 4):
#: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

#: bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern
#: order, normalised by its largest magnitude 12.
FP4 = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3],
                dtype=np.float32) / np.float32(12.0)).astype(np.float32)


def _linspace_f32(start: float, stop: float, n: int) -> np.ndarray:
    """``torch.linspace(start, stop, n)`` in float32: each half from its own end,
    ``start + step·i`` (resp. ``stop − step·(n−1−i)``) with one rounding."""
    s, e = np.float32(start), np.float32(stop)
    step = np.float64((e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    lo = (np.float64(s) + step * i).astype(np.float32)
    hi = (np.float64(e) - step * (n - 1 - i)).astype(np.float32)
    return np.where(np.arange(n) < n // 2, lo, hi)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), sorted.

    For exponent ``i = 0…6``: the midpoints of ``2^i + 1`` points evenly spaced in
    ``[0.1, 1]``, times ``10^(i−6)``, with both signs; plus 0 and 1 (256 values).
    """
    data: list[float] = []
    for i in range(7):
        b = _linspace_f32(0.1, 1.0, 2 ** i + 1)
        mid = ((b[:-1] + b[1:]) / np.float32(2.0)).astype(np.float32)
        v = (np.float32(10.0 ** (i - 6)) * mid).astype(np.float32)
        data += v.tolist() + (-v).tolist()
    data += [0.0, 1.0]
    return np.sort(np.asarray(data, dtype=np.float32))


DYNAMIC = dynamic_map()


def codebook(quant: str) -> np.ndarray:
    """The float32 codebook of a 4-bit ``quant`` (index = stored code)."""
    return {"nf4": NF4, "fp4": FP4}[quant]


def _bucketize(scaled: Array, code: np.ndarray) -> Array:
    """Nearest code of each value, ties to the lower index (bitsandbytes'
    ``bucketize`` over the midpoints of the sorted codebook)."""
    order = np.argsort(code, kind="stable")
    srt = code[order]
    bounds = jnp.asarray(((srt[:-1] + srt[1:]) / np.float32(2.0)).astype(np.float32))
    if len(code) <= 16:
        idx = jnp.sum(scaled[..., None] > bounds, axis=-1)
    else:
        idx = jnp.searchsorted(bounds, scaled, side="left")
    if not np.array_equal(order, np.arange(len(code))):
        idx = jnp.asarray(order)[idx]
    return idx.astype(jnp.uint8)


def _blocks(flat: Array, block_size: int):
    """``(blocks (nb, block_size) zero-padded, absmax (nb,), n)`` of a flat float32 array."""
    n = flat.shape[0]
    nb = -(-n // block_size)
    padded = jnp.pad(flat, (0, nb * block_size - n)).reshape(nb, block_size)
    return padded, jnp.max(jnp.abs(padded), axis=1), n


def _scaled(padded: Array, absmax: Array, n: int, block_size: int) -> Array:
    """``clip(w/absmax, −1, 1)`` the way bitsandbytes computes it in float32:
    times the reciprocal in full blocks, divided in the partial last block.

    An all-zero block scales to exact zeros (its absmax is replaced by 1, not by
    a tiny number: XLA:CPU flushes subnormals, which would make it ``0·∞``). A
    block whose reciprocal would be subnormal (absmax at or above 2¹²⁶) is first
    scaled by 2⁻⁶⁴, values and absmax alike (exact, powers of two), since XLA
    may turn a division back into a multiplication by the reciprocal.
    """
    safe = jnp.where(absmax > 0, absmax, np.float32(1.0))[:, None]
    huge = safe >= np.float32(2.0 ** 126)
    padded = jnp.where(huge, padded * np.float32(2.0 ** -64), padded)
    safe = jnp.where(huge, safe * np.float32(2.0 ** -64), safe)
    scaled = padded * (np.float32(1.0) / safe)
    if n % block_size:
        scaled = scaled.at[-1].set(padded[-1] / safe[-1])
    return jnp.clip(scaled, -1.0, 1.0)


def quantize_blockwise(flat: Array, code: np.ndarray, block_size: int, *, even: bool = False):
    """Blockwise absmax quantization of a flat array to indices into ``code``.

    Returns ``(q uint8 (n,), absmax float32 (ceil(n/block_size),))``; with
    ``even``, an odd ``n`` keeps one more code, the one for the padding value
    0.0, as bitsandbytes packs an odd count (pad the values, then quantize).
    """
    padded, absmax, n = _blocks(flat.astype(jnp.float32), block_size)
    q = _bucketize(_scaled(padded, absmax, n, block_size), code)
    return q.reshape(-1)[:n + (n % 2 if even else 0)], absmax


def dequantize_blockwise(q: Array, absmax: Array, code: np.ndarray, block_size: int) -> Array:
    """``code[q]·absmax[block]`` in float32 (flat)."""
    n = q.shape[0]
    vals = jnp.asarray(code)[q.astype(jnp.int32)]
    scale = jnp.repeat(absmax.astype(jnp.float32), block_size, total_repeat_length=
                       absmax.shape[0] * block_size)[:n]
    return vals * scale


def pack(q: Array) -> Array:
    """Two 4-bit codes a byte, the first in the high nibble (odd length: zero-padded)."""
    q = q.astype(jnp.uint8)
    if q.shape[0] % 2:
        q = jnp.pad(q, (0, 1))
    return (q[0::2] << 4) | q[1::2]


def unpack(packed: Array, n: int) -> Array:
    """Inverse of :func:`pack`: ``n`` codes."""
    packed = packed.reshape(-1)
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:n]


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A quantized array: codes and block scales, with the layout as static metadata.

    Fields (arrays): ``codes`` (``uint8`` packed 4-bit codes or ``int8``),
    ``absmax`` (float32 block scales, or their ``uint8`` codes when
    double-quantized), ``absmax2`` (float32, one per 256 blocks) and ``offset``
    (float32 scalar) for double quantization, else ``None``.

    Layout: ``jnp.transpose(x, perm)`` flattened row-major is what is cut into
    blocks; ``perm`` puts the contracting (input) axes last, so blocks run along
    them as bitsandbytes' do for the ``(out, in)`` weight. When the contracting
    size is a multiple of ``block_size``, ``codes`` has the stored shape with its
    last axis halved (4-bit) and ``absmax`` the stored shape with its last axis
    divided by ``block_size``; otherwise both are flat.
    """

    codes: Array
    absmax: Array
    absmax2: Array | None = None
    offset: Array | None = None
    quant: str = "nf4"
    block_size: int = 64
    shape: tuple[int, ...] = ()
    perm: tuple[int, ...] = ()
    dtype: str = "float32"
    n_stack: int = 0

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of ``transpose(x, perm)``: the array as its blocks read it."""
        return tuple(self.shape[i] for i in self.perm)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (codes, scales, double-quantization state)."""
        return sum(int(x.size) * jnp.dtype(x.dtype).itemsize
                   for x in (self.codes, self.absmax, self.absmax2, self.offset)
                   if x is not None)

    def _per_slice(self, fn):
        """``fn(codes, absmax, absmax2, offset)`` of one slice, mapped over the
        ``n_stack`` leading stacked axes."""
        for _ in range(self.n_stack):
            fn = jax.vmap(fn)
        return fn(self.codes, self.absmax, self.absmax2, self.offset)

    def scales(self) -> Array:
        """The float32 block absmax values (double quantization undone), flat per slice."""
        def one(codes, absmax, absmax2, offset):
            absmax = absmax.reshape(-1)
            if absmax2 is None:
                return absmax.astype(jnp.float32)
            return dequantize_blockwise(absmax, absmax2, DYNAMIC, DQ_BLOCK) + offset
        return self._per_slice(one)

    def stored(self, dtype: Any = jnp.float32) -> Array:
        """The dequantized array in stored order (``transpose(x, perm)``)."""
        slice_shape = self.stored_shape[self.n_stack:]
        n = math.prod(slice_shape)
        code = None if self.quant == "int8" else codebook(self.quant)
        bs = self.block_size

        def one(codes, absmax, absmax2, offset):
            scales = QuantizedArray.scales(dataclasses.replace(
                self, codes=codes, absmax=absmax, absmax2=absmax2, offset=offset, n_stack=0))
            if code is None:
                q = codes.reshape(-1).astype(jnp.float32) / np.float32(127.0)
                flat = q * jnp.repeat(scales, bs, total_repeat_length=scales.size * bs)[:n]
            else:
                flat = dequantize_blockwise(unpack(codes, n), scales, code, bs)
            return flat.astype(dtype).reshape(slice_shape)
        return self._per_slice(one)

    def slice_view(self) -> "QuantizedArray":
        """The array of one slice, for arrays whose leading stacked axis a map
        (``nn.scan``, ``vmap``) has already removed."""
        if not self.n_stack:
            raise ValueError("QuantizedArray.slice_view: the array is not stacked")
        axis = self.perm[0]
        shape = self.shape[:axis] + self.shape[axis + 1:]
        perm = tuple(p - (p > axis) for p in self.perm[1:])
        return dataclasses.replace(self, shape=shape, perm=perm, n_stack=self.n_stack - 1)

    def dequantize(self, dtype: Any = None) -> Array:
        """The dequantized array in its own shape; ``dtype`` defaults to the original."""
        dtype = self.dtype if dtype is None else dtype
        return jnp.transpose(self.stored(dtype), np.argsort(self.perm))


jax.tree_util.register_dataclass(
    QuantizedArray, data_fields=["codes", "absmax", "absmax2", "offset"],
    meta_fields=["quant", "block_size", "shape", "perm", "dtype", "n_stack"])


def _storage_perm(ndim: int, in_axes: tuple[int, ...] | None,
                  stack_axes: tuple[int, ...]) -> tuple[int, ...]:
    if ndim == 0:
        raise ValueError("jlora.quantize: needs an array with at least one dimension")
    in_axes = None if in_axes is None else int_tuple("jlora.quantize", "in_axes", in_axes)
    stack_axes = int_tuple("jlora.quantize", "stack_axes", stack_axes)
    bad = [a for a in (*(in_axes or ()), *stack_axes) if not -ndim <= a < ndim]
    if bad:
        raise ValueError(f"jlora.quantize: axes {bad} out of range for {ndim} dimensions")
    stack = sorted(a % ndim for a in stack_axes)
    if len(set(stack)) != len(stack):
        raise ValueError(f"jlora.quantize: stack_axes {stack_axes} repeat an axis")
    if in_axes is None:
        in_axes = (0,) if ndim == 1 else tuple(a for a in range(ndim - 1) if a not in stack)
    axes = sorted(a % ndim for a in in_axes)
    if not axes or set(axes) & set(stack) or len(set(axes)) != len(axes):
        raise ValueError(f"jlora.quantize: in_axes {in_axes} and stack_axes {stack_axes} "
                         "must be distinct axes, with at least one input axis")
    rest = [a for a in range(ndim) if a not in axes and a not in stack]
    return tuple(stack + rest + axes)


def quantize(x: Array, quant: str = "nf4", block_size: int = 64, double_quant: bool = True,
             *, in_axes: tuple[int, ...] | None = None,
             stack_axes: tuple[int, ...] = ()) -> QuantizedArray:
    """Quantize ``x`` blockwise (bitsandbytes' ``quantize_4bit`` layout).

    Args:
      x: a float array, read as a kernel: ``in_axes`` contract (default all but
        the last axis, excluding ``stack_axes``), the others are outputs.
      quant: ``"nf4"``, ``"fp4"`` or ``"int8"``.
      block_size: values a block, along the contracting axes (bitsandbytes: 64).
      double_quant: 8-bit codes for the block scales (QLoRA's double quantization).
      in_axes: the contracting axes; blocks run along them.
      stack_axes: axes of stacked kernels (experts, scanned layers): each slice is
        quantized as its own bitsandbytes weight (its own double-quantization
        offset and scales), stacked along leading axes of every field.

    Returns:
      a :class:`QuantizedArray` (a pytree; :func:`dequantize` inverts it).
    """
    choice("jlora.quantize", "quant", quant, QUANTS)
    positive_int("jlora.quantize", "block_size", block_size, minimum=2)
    if block_size % 2:
        raise ValueError(f"jlora.quantize: block_size must be even, got {block_size}")
    boolean("jlora.quantize", "double_quant", double_quant)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"jlora.quantize: needs a floating-point array, got dtype {x.dtype}")
    perm = _storage_perm(x.ndim, in_axes, stack_axes)
    n_stack = len(int_tuple("jlora.quantize", "stack_axes", stack_axes))
    fn = functools.partial(_quantize_stored, quant=quant, block_size=block_size,
                           double_quant=double_quant)
    for _ in range(n_stack):
        fn = jax.vmap(fn)
    codes, absmax, absmax2, offset = fn(jnp.transpose(x, perm))
    return QuantizedArray(codes=codes, absmax=absmax, absmax2=absmax2, offset=offset,
                          quant=quant, block_size=block_size, shape=tuple(x.shape),
                          perm=perm, dtype=jnp.dtype(x.dtype).name, n_stack=n_stack)


@functools.partial(jax.jit, static_argnames=("quant", "block_size", "double_quant"))
def _quantize_stored(stored: Array, *, quant: str, block_size: int, double_quant: bool):
    """Codes and scales of an array already in stored order (one compiled program,
    so eager and jitted callers get the same bits)."""
    flat = stored.reshape(-1)
    if quant == "int8":
        padded, absmax, n = _blocks(flat.astype(jnp.float32), block_size)
        q = jnp.round(_scaled(padded, absmax, n, block_size) * 127.0)
        codes = q.astype(jnp.int8).reshape(-1)[:n]
    else:
        q, absmax = quantize_blockwise(flat, codebook(quant), block_size, even=True)
        codes = pack(q)
    absmax2 = offset = None
    if double_quant:
        offset = jnp.mean(absmax)
        absmax, absmax2 = quantize_blockwise(absmax - offset, DYNAMIC, DQ_BLOCK)
    fan = stored.shape[-1]
    if stored.ndim >= 2 and fan % block_size == 0:
        per = 1 if quant == "int8" else 2
        codes = codes.reshape(stored.shape[:-1] + (fan // per,))
        absmax = absmax.reshape(stored.shape[:-1] + (fan // block_size,))
    return codes, absmax, absmax2, offset


def dequantize(q: QuantizedArray, dtype: Any = None) -> Array:
    """Inverse of :func:`quantize` (up to the quantization error), in ``dtype``
    (default: the quantized array's original dtype)."""
    if not isinstance(q, QuantizedArray):
        raise ValueError(f"jlora.dequantize: expected a QuantizedArray, got {type(q).__name__}")
    if dtype is not None:
        floating_dtype("jlora.dequantize", "dtype", dtype)
    return q.dequantize(dtype)


def quantize_tree(params: Any, quant: str = "nf4", block_size: int = 64,
                  double_quant: bool = True, *, min_size: int = 4096) -> Any:
    """Quantize every float leaf with at least 2 dims and ``min_size`` values.

    A quantized frozen model without adapters: serve it with
    ``dequantize_tree(q)`` inside the jitted forward (each kernel is dequantized
    where it is used; only codes and scales are stored).
    """
    def one(x):
        if (hasattr(x, "ndim") and x.ndim >= 2 and x.size >= min_size
                and jnp.issubdtype(x.dtype, jnp.floating)):
            return quantize(x, quant, block_size, double_quant)
        return x
    return jax.tree.map(one, params)


def dequantize_tree(tree: Any, dtype: Any = None) -> Any:
    """Dequantize every :class:`QuantizedArray` of a tree."""
    is_q = lambda x: isinstance(x, QuantizedArray)
    return jax.tree.map(lambda x: x.dequantize(dtype) if is_q(x) else x, tree, is_leaf=is_q)
