"""Torch re-implementation of Triton's counter-based Philox generator.

The functions here produce, bit for bit, the streams of ``tl.randint4x``, ``tl.rand``,
``tl.rand4x``, ``tl.randn`` and ``tl.randn4x`` (``triton/language/random.py``) for a given seed and
element offset, using only vectorised torch integer and float ops. They work on CPU and CUDA
tensors alike, which lets the torch backend in ``BIO_RNG=philox`` mode draw exactly the masks and
values a Triton kernel would (see the docs page "Randomness").

Conventions mirrored from Triton (checked against triton 3.6.0, 3.7.0 and 3.8.0, whose generators
are identical; the only textual difference is that 3.8 folds negative int32 draws with ``~x`` where
3.6/3.7 write ``-x - 1``, which is the same two's-complement value, INT32_MIN included):

* Philox-4x32 with ``N_ROUNDS = 10`` rounds; multipliers 0xD2511F53 / 0xCD9E8D57, Weyl key
  increments 0x9E3779B9 / 0xBB67AE85.
* The 64-bit seed is split into key words ``k0 = seed & 0xFFFFFFFF`` and ``k1 = seed >> 32``.
* The counter is ``(offset_lo, offset_hi, 0, 0)``; ``offset_hi`` is the upper 32 bits of a 64-bit
  offset and 0 for offsets of 32 bits or fewer.
* uint32 -> float32: the word is read as int32, negative values are complemented (``~x``), and the
  resulting value in ``[0, 2**31)`` is rounded to float32 and scaled by float32(4.6566127342e-10).
* Normals: Box-Muller on a pair of uniforms, the first clamped below at float32(1e-7); angle
  float32(2*pi) * u2; ``r = sqrt(-2 log u1)``; outputs ``r cos`` and ``r sin``.

**The element map the kernels draw with** (docs: "Randomness", "The counter -> element map";
its one device-side implementation is ``kernels/triton/draws.py``): element ``i`` of a layer
(its global row-major index) reads word ``i % 4`` of the call at counter
``(lo32(i // 4), hi32(i // 4), stream, 0)``: :func:`element_words`, :func:`element_uniforms`,
and :func:`element_normals`, whose lanes 0, 1 are the cos and sin outputs of Box-Muller on words
``(w0, w1)`` and lanes 2, 3 those of ``(w2, w3)``, with the angle
``float32(int32(b)) * float32(pi * 2**-31)`` in [-pi, pi] (:func:`box_muller_pair`). One
Philox call thus serves four elements, and each uniform pair two normals.

Unsigned 32-bit words are carried in int64 tensors (values in ``[0, 2**32)``). Integers and
uniforms are exact; normals go through log/sqrt/cos/sin, whose float32 results differ between math
libraries (torch vs numpy in Triton's interpreter, or a GPU's libdevice) by a few ulp.
"""

from __future__ import annotations

import functools
import math
import operator
import struct
from typing import Callable, List, Union

import torch
from torch import Tensor

__all__ = [
    "N_ROUNDS",
    "randint4x",
    "randint",
    "uint32_to_uniform",
    "rand",
    "rand4x",
    "pair_uniform_to_normal",
    "randn",
    "randn4x",
    "stream_key",
    "new_layer_seed",
    "GROUP",
    "element_words",
    "element_uniforms",
    "element_normals",
    "signed_angle",
    "box_muller_pair",
]

N_ROUNDS: int = 10

_M16 = 0xFFFF
_M32 = 0xFFFFFFFF
_M63 = (1 << 63) - 1
_M64 = (1 << 64) - 1

# Philox-4x32 constants (Salmon et al. 2011), as used by Triton.
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32 value (kept as a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


# Triton's float constants are float32 literals inside the kernel.
_UNIFORM_SCALE = _f32(4.6566127342e-10)  # largest scale with (2**31 - 1) * scale < 1 in fp32
_U1_FLOOR = _f32(1.0e-7)
_TWO_PI = _f32(6.283185307179586)

SeedLike = Union[int, Tensor]
Word = Union[int, Tensor]  # a uint32 word; tensors may carry junk above bit 31 until masked


def _split_seed(seed: SeedLike) -> tuple[Word, Word]:
    """Split a 64-bit seed into Philox key words (low, high), as Python ints or int64 tensors."""
    if isinstance(seed, Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed tensor must have an integer dtype, got {seed.dtype}")
        s = seed.to(torch.int64)
        return s & _M32, (s >> 32) & _M32
    s = operator.index(seed)
    if not -(1 << 63) <= s < (1 << 64):
        raise ValueError(f"seed must fit in 64 bits, got {s}")
    s &= _M64
    return s & _M32, s >> 32


def _check_offset(offset: Tensor) -> None:
    """Reject offsets that are not integer tensors."""
    if not isinstance(offset, Tensor):
        raise TypeError("offset must be an integer tensor")
    if offset.dtype.is_floating_point or offset.dtype.is_complex or offset.dtype == torch.bool:
        raise TypeError(f"offset tensor must have an integer dtype, got {offset.dtype}")


def _split_offset(offset: Tensor) -> tuple[Tensor, Tensor | None]:
    """Split offsets into Philox counter words (low, high); high is None for <=32-bit dtypes."""
    if offset.dtype.itemsize > 4:
        off = offset.to(torch.int64)
        return off & _M32, (off >> 32) & _M32
    # Triton bitcasts a <=32-bit offset to uint32 and uses 0 for the high counter word.
    return offset.to(torch.int64) & _M32, None


_CPU_CHUNK = 1 << 15  # elements per CPU block: keeps the ~10 live int64 temporaries in cache
_DEVICE_CHUNK = 1 << 22  # elements per block elsewhere: bounds temporary memory (~0.4 GB)
_wraps: dict[str, bool] = {}


def _int64_mul_wraps(device: torch.device) -> bool:
    """Whether int64 products on ``device`` wrap modulo 2**64 (checked once per device type)."""
    if device.type not in _wraps:
        xs = [(i * _KEY_A + 0x7F4A7C15) & _M32 for i in range(257)] + [_M32, 0]
        got = (torch.tensor(xs, dtype=torch.int64, device=device) * _ROUND_A).tolist()
        want = [(x * _ROUND_A + (1 << 63)) % (1 << 64) - (1 << 63) for x in xs]
        _wraps[device.type] = got == want
    return _wraps[device.type]


def _mul(const: int, x: Word, wraps: bool) -> tuple[Word, Word]:
    """(high, low) words of ``const * x`` for a clean uint32 ``x``; both valid in bits 0..31."""
    if not isinstance(x, Tensor):
        p = const * x
        return p >> 32, p & _M32
    if wraps:
        # Exact product modulo 2**64: bits 32..63 survive an arithmetic shift, bits 0..31 as is.
        p = x * const
        return p >> 32, p
    # Fallback without relying on wrap-around: 16-bit halves keep every product below 2**48.
    p_lo = x * (const & _M16)
    p_hi = x * (const >> 16)
    hi = (p_lo >> 16).add_(p_hi).bitwise_right_shift_(16)
    lo = p_hi.bitwise_and_(_M16).bitwise_left_shift_(16).add_(p_lo)
    return hi, lo


def _xor3(fresh: Word, a: Word, b: Word) -> Word:
    """``(fresh ^ a ^ b) & 0xFFFFFFFF``; ``fresh`` may be overwritten, ``a`` and ``b`` are not."""
    consts = 0
    tensors = []
    for v in (fresh, a, b):
        if isinstance(v, Tensor):
            tensors.append(v)
        else:
            consts ^= v
    consts &= _M32
    if not tensors:
        return consts
    if isinstance(fresh, Tensor):
        out, rest = fresh, tensors[1:]
    elif len(tensors) > 1:
        out, rest = torch.bitwise_xor(tensors[0], tensors[1]), tensors[2:]
    else:
        out, rest = tensors[0] ^ consts, []
        consts = 0
    for t in rest:
        out.bitwise_xor_(t)
    if consts:
        out.bitwise_xor_(consts)
    return out.bitwise_and_(_M32)


def _philox_block(
    c0: Tensor, c1: Word, k0: Word, k1: Word, n_rounds: int, wraps: bool, c2: Word = 0
) -> tuple[Word, Word, Word, Word]:
    """Philox-4x32 rounds on counter (c0, c1, c2, 0) and key (k0, k1); results may be
    unmasked."""
    x0: Word = c0
    c3: Word = 0
    for r in range(n_rounds):
        # Round keys advance by Weyl increments; tensor keys stay unmasked (masked after the xor).
        if r == 0:
            rk0, rk1 = k0, k1
        elif isinstance(k0, Tensor):
            rk0, rk1 = k0 + r * _KEY_A, k1 + r * _KEY_B
        else:
            rk0, rk1 = (k0 + r * _KEY_A) & _M32, (k1 + r * _KEY_B) & _M32
        hi_b, lo_b = _mul(_ROUND_B, c2, wraps)
        hi_a, lo_a = _mul(_ROUND_A, x0, wraps)
        x0 = _xor3(hi_b, c1, rk0)
        c2 = _xor3(hi_a, c3, rk1)
        c1, c3 = lo_b, lo_a
    return x0, c1, c2, c3


Fill = Callable[[List[Tensor], List[Tensor]], None]


def _generate(
    seed: SeedLike,
    offset: Tensor,
    n_rounds: int,
    n_out: int,
    dtype: torch.dtype,
    fill: Fill,
    stream: int = 0,
) -> tuple[Tensor, ...]:
    """Run Philox block by block and let ``fill`` turn each block's words into ``n_out`` outputs.

    ``fill(words, dsts)`` gets the four counter words of a block (int64, valid in bits 0..31, junk
    above) and writes the block's results into the 1-D slices ``dsts``. On CPU the blocks are small
    enough for all temporaries to stay in cache (and below torch's intra-op threading grain).
    ``stream`` is the third counter word (0 in Triton's own functions).
    """
    if n_rounds < 1:
        raise ValueError(f"n_rounds must be >= 1, got {n_rounds}")
    _check_offset(offset)
    k0, k1 = _split_seed(seed)
    device = offset.device
    shape = offset.shape
    if isinstance(k0, Tensor) and isinstance(k1, Tensor):
        shape = torch.broadcast_shapes(shape, k0.shape)
        k0 = k0.to(device).expand(shape).reshape(-1)
        k1 = k1.to(device).expand(shape).reshape(-1)
    outs = tuple(torch.empty(shape, dtype=dtype, device=device) for _ in range(n_out))
    n = outs[0].numel()
    flat_off = offset.expand(shape).reshape(-1)
    flat_outs = [o.view(-1) for o in outs]
    wraps = _int64_mul_wraps(device)
    chunk = _CPU_CHUNK if device.type == "cpu" else _DEVICE_CHUNK
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        lo, hi = _split_offset(flat_off[start:end])
        bk0 = k0[start:end] if isinstance(k0, Tensor) else k0
        bk1 = k1[start:end] if isinstance(k1, Tensor) else k1
        words = _philox_block(lo, 0 if hi is None else hi, bk0, bk1, n_rounds, wraps, stream)
        tensors = [w if isinstance(w, Tensor) else torch.full_like(lo, w & _M32) for w in words]
        fill(tensors, [o[start:end] for o in flat_outs])
    return outs


def _uniform_into(word: Tensor, dst: Tensor) -> Tensor:
    """Write the float32 uniform of each word's low 32 bits into ``dst``."""
    # Signed int32 view of the word (int64 -> int32 casts wrap), then Triton's fold of negative
    # values with ~x, i.e. x ^ (x >> 31): a value in [0, 2**31).
    x = word.to(torch.int32, copy=True)
    x.bitwise_xor_(x >> 31)
    return torch.mul(x.to(torch.float32), _UNIFORM_SCALE, out=dst)


def _normal_pair_into(u1: Tensor, u2: Tensor, dst1: Tensor, dst2: Tensor | None) -> None:
    """Box-Muller on float32 uniforms into ``dst1`` (cos branch) and ``dst2`` (sin branch)."""
    r = torch.clamp_min(u1, _U1_FLOOR).log_().mul_(-2.0).sqrt_()
    th = u2 * _TWO_PI
    if dst2 is not None:
        torch.sin(th, out=dst2).mul_(r)
    torch.cos(th, out=dst1).mul_(r)


def _fill_words(words: list[Tensor], dsts: list[Tensor]) -> None:
    for w, d in zip(words, dsts):
        torch.bitwise_and(w, _M32, out=d)


def _fill_uniforms(words: list[Tensor], dsts: list[Tensor]) -> None:
    for w, d in zip(words, dsts):
        _uniform_into(w, d)


def _fill_normal(words: list[Tensor], dsts: list[Tensor]) -> None:
    u1 = _uniform_into(words[0], torch.empty_like(dsts[0]))
    u2 = _uniform_into(words[1], torch.empty_like(dsts[0]))
    _normal_pair_into(u1, u2, dsts[0], None)


def _fill_normals(words: list[Tensor], dsts: list[Tensor]) -> None:
    u = [_uniform_into(w, torch.empty_like(dsts[0])) for w in words]
    _normal_pair_into(u[0], u[1], dsts[0], dsts[1])
    _normal_pair_into(u[2], u[3], dsts[2], dsts[3])


def randint4x(
    seed: SeedLike, offset: Tensor, n_rounds: int = N_ROUNDS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four uint32 Philox words (int64 tensors in [0, 2**32)) equal to ``tl.randint4x``."""
    return _generate(seed, offset, n_rounds, 4, torch.int64, _fill_words)  # type: ignore[return-value]


def randint(seed: SeedLike, offset: Tensor, n_rounds: int = N_ROUNDS) -> Tensor:
    """First Philox word (int64 tensor in [0, 2**32)), equal to ``tl.randint``."""
    return _generate(seed, offset, n_rounds, 1, torch.int64, _fill_words)[0]


def uint32_to_uniform(x: Tensor) -> Tensor:
    """Map uint32 words to float32 in [0, 1) exactly like Triton's ``uint_to_uniform_float``."""
    return _uniform_into(x, torch.empty(x.shape, dtype=torch.float32, device=x.device))


def rand(seed: SeedLike, offset: Tensor, n_rounds: int = N_ROUNDS) -> Tensor:
    """Uniform float32 in [0, 1), equal to ``tl.rand``."""
    return _generate(seed, offset, n_rounds, 1, torch.float32, _fill_uniforms)[0]


def rand4x(
    seed: SeedLike, offset: Tensor, n_rounds: int = N_ROUNDS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four uniform float32 tensors in [0, 1), equal to ``tl.rand4x``."""
    return _generate(seed, offset, n_rounds, 4, torch.float32, _fill_uniforms)  # type: ignore[return-value]


def pair_uniform_to_normal(u1: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
    """Box-Muller transform of two float32 uniforms, as Triton's ``pair_uniform_to_normal``."""
    u1, u2 = torch.broadcast_tensors(u1.to(torch.float32), u2.to(torch.float32))
    n1, n2 = torch.empty_like(u1), torch.empty_like(u1)
    _normal_pair_into(u1, u2, n1, n2)
    return n1, n2


def randn(seed: SeedLike, offset: Tensor, n_rounds: int = N_ROUNDS) -> Tensor:
    """Standard normal float32, equal to ``tl.randn``."""
    return _generate(seed, offset, n_rounds, 1, torch.float32, _fill_normal)[0]


def randn4x(
    seed: SeedLike, offset: Tensor, n_rounds: int = N_ROUNDS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four standard normal float32 tensors, equal to ``tl.randn4x``."""
    return _generate(seed, offset, n_rounds, 4, torch.float32, _fill_normals)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The element mapping the kernels draw with (docs: "Randomness", "The counter -> element map")
# ---------------------------------------------------------------------------------------------

#: Elements per Philox call: element ``i`` of a layer reads output word ``i % GROUP`` of the
#: call at counter ``(i // GROUP, stream, 0)`` (low and high words of ``i // GROUP`` first).
GROUP: int = 4
#: pi * 2**-31 in float32: a word read as int32, times this, is an angle in [-pi, pi].
_ANGLE_SCALE = _f32(math.pi * 2.0**-31)

Index = Union[Tensor, range]


def signed_angle(word: Tensor) -> Tensor:
    """The Box-Muller angle of uint32 words: ``float32(int32(word)) * float32(pi * 2**-31)``,
    in [-pi, pi] (fast sin/cos are accurate there, and it needs no fold of the sign)."""
    return word.to(torch.int32).to(torch.float32).mul_(_ANGLE_SCALE)


def _box_muller_into(a: Tensor, b: Tensor, dst_cos: Tensor, dst_sin: Tensor) -> None:
    """The two normals of words ``(a, b)``: ``r = sqrt(-2 ln max(U(a), 1e-7))``,
    ``theta = signed_angle(b)``, ``r cos(theta)`` and ``r sin(theta)``."""
    r = _uniform_into(a, torch.empty_like(dst_cos)).clamp_min_(_U1_FLOOR)
    r.log_().mul_(-2.0).sqrt_()
    th = signed_angle(b)
    torch.cos(th, out=dst_cos).mul_(r)
    torch.sin(th, out=dst_sin).mul_(r)


def box_muller_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The two normals the kernels make of one pair of uint32 words ``(a, b)``."""
    a, b = torch.broadcast_tensors(a, b)
    n1 = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    n2 = torch.empty_like(n1)
    _box_muller_into(a, b, n1, n2)
    return n1, n2


def _fill_group_normals(words: list[Tensor], dsts: list[Tensor]) -> None:
    # Both outputs of each pair: lanes 0, 1 from (w0, w1), lanes 2, 3 from (w2, w3).
    _box_muller_into(words[0], words[1], dsts[0], dsts[1])
    _box_muller_into(words[2], words[3], dsts[2], dsts[3])


def _per_element(
    seed: SeedLike, index: Index, device, stream: int, dtype: torch.dtype, fill: Fill
) -> Tensor:
    """Each element's lane of its group's four outputs (``fill`` makes the four per call)."""
    if isinstance(index, range):
        if index.step != 1:
            raise ValueError("a range index must have step 1")
        n = len(index)
        if n == 0:
            return torch.empty(0, dtype=dtype, device=device)
        first, last = index.start // GROUP, (index.stop - 1) // GROUP
        counters = torch.arange(first, last + 1, dtype=torch.int64, device=device)
        outs = _generate(seed, counters, N_ROUNDS, GROUP, dtype, fill, stream)
        skip = index.start - first * GROUP
        return torch.stack(outs, dim=1).view(-1)[skip : skip + n]
    _check_offset(index)
    idx = index.to(torch.int64)  # non-negative (global element indices)
    outs = _generate(seed, idx // GROUP, N_ROUNDS, GROUP, dtype, fill, stream)
    lane = (idx % GROUP).unsqueeze(-1)
    return torch.stack(outs, dim=-1).gather(-1, lane).squeeze(-1)


def element_words(seed: SeedLike, index: Index, device=None, stream: int = 0) -> Tensor:
    """The uint32 word (int64 in [0, 2**32)) element ``i`` reads: word ``i % 4`` of the call at
    counter ``(i // 4, stream)``. ``index``: global element indices (a tensor, or a ``range``
    with ``device``)."""
    return _per_element(seed, index, device, stream, torch.int64, _fill_words)


def element_uniforms(seed: SeedLike, index: Index, device=None, stream: int = 0) -> Tensor:
    """Float32 uniforms in [0, 1): ``uint32_to_uniform`` of :func:`element_words`."""
    return _per_element(seed, index, device, stream, torch.float32, _fill_uniforms)


def element_normals(seed: SeedLike, index: Index, device=None, stream: int = 0) -> Tensor:
    """Float32 standard normals: lanes 0 and 1 of a group are the cos and sin outputs of the
    Box-Muller pair of words ``(w0, w1)``, lanes 2 and 3 those of ``(w2, w3)``
    (:func:`box_muller_pair`)."""
    return _per_element(seed, index, device, stream, torch.float32, _fill_group_normals)


def _splitmix64(x: int) -> int:
    """One splitmix64 step (Steele et al.): a bijective 64-bit mixer of ``x``."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=1 << 14)
def _seed_hash(layer_seed: int) -> int:
    """The first splitmix64 round of :func:`stream_key` (per layer, not per step: cached; a
    third of the key's cost on the host, which hashes every layer's key every step)."""
    return _splitmix64(layer_seed & _M64)


def stream_key(layer_seed: int, step: int, op_id: int) -> int:
    """Hash (layer seed, step, op id) into a Philox seed in [0, 2**63), stable across processes."""
    h = _seed_hash(operator.index(layer_seed))
    h = _splitmix64(h ^ (operator.index(step) & _M64))
    h = _splitmix64(h ^ (operator.index(op_id) & _M64))
    return h >> 1


#: From this many layers on, :func:`stream_keys` hashes in int64 tensor ops (about 30 ops of
#: fixed cost) instead of one Python :func:`stream_key` per layer (about 1.3 µs each).
_VECTOR_KEYS_FROM = 48


def to_signed64(k: int) -> int:
    """A 64-bit pattern (its low 64 bits) as the int64 with the same bits (what an int64 tensor
    holds; Triton reads it back as uint64)."""
    k = int(k) & _M64
    return k - (1 << 64) if k >> 63 else k


def _splitmix64_(z: Tensor) -> Tensor:
    """:func:`_splitmix64` in place on int64 bit patterns (wrapping arithmetic; the right
    shifts are made logical by masking off the copied sign bits)."""
    z.add_(to_signed64(0x9E3779B97F4A7C15))
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z.bitwise_xor_((z >> shift).bitwise_and_((1 << (64 - shift)) - 1))
        z.mul_(to_signed64(multiplier))
    return z.bitwise_xor_((z >> 31).bitwise_and_((1 << 33) - 1))


def stream_keys(layer_seeds: List[int], steps: List[int], op_id: int) -> List[int]:
    """``[stream_key(seed, step, op_id) ...]`` for many layers at once (the same integers)."""
    if len(steps) < _VECTOR_KEYS_FROM:
        return [stream_key(seed, step, op_id) for seed, step in zip(layer_seeds, steps)]
    seed_rounds = [to_signed64(_seed_hash(operator.index(seed))) for seed in layer_seeds]
    h = torch.tensor(seed_rounds, dtype=torch.int64)
    h.bitwise_xor_(torch.tensor([to_signed64(n) for n in steps], dtype=torch.int64))
    h = _splitmix64_(_splitmix64_(h).bitwise_xor_(to_signed64(op_id)))
    return (h >> 1).bitwise_and_(_M63).tolist()


def new_layer_seed(generator: torch.Generator | None = None) -> int:
    """Draw a 63-bit layer seed from torch's default generator (or ``generator``)."""
    device = generator.device if generator is not None else torch.device("cpu")
    hi, lo = torch.randint(
        0, 1 << 32, (2,), generator=generator, dtype=torch.int64, device=device
    ).tolist()
    return ((hi << 32) | lo) & _M63
