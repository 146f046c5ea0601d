"""The torch Philox port against Triton's own generator.

Without CUDA the reference kernels run in Triton's CPU interpreter on CPU tensors; with CUDA (and
TRITON_INTERPRET unset, as tests/conftest.py arranges) they run compiled on the GPU.
"""

import os

import torch

# Triton picks interpreter or compiler when a kernel is decorated: decide before it is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bio_transformations.kernels import philox  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

M32 = 0xFFFFFFFF
SEEDS = [0, 1, 12345, 2**31 + 7, 2**62 + 12345, philox.stream_key(2024, 3, 1)]
# Counters 0..3071 plus words near the 31/32-bit boundaries (the int64 ones also use the high
# counter word, which Triton takes from bits 32..63 of a 64-bit offset).
SMALL = list(range(3072))
LARGE64 = [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62 + 17, 2**63 - 1]
LARGE32 = [2**31 - 1, -(2**31), -1, -12345]  # bit patterns of uint32 2**31 .. 2**32 - 1
MAX_NORMAL_ULP = 16  # numpy (interpreter) and torch may round log/cos/sin differently


def _offsets(dtype: torch.dtype) -> torch.Tensor:
    extra = LARGE64 if dtype == torch.int64 else LARGE32
    return torch.tensor(SMALL + extra, dtype=dtype)


def _words(x: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns stored in an int32 tensor, as int64 values in [0, 2**32)."""
    return x.to(torch.int64) & M32


def _triton_device() -> str:
    """Where the reference kernels run: CPU in the interpreter, else the GPU."""
    if INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")


def _ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 units in the last place (same-sign values)."""
    ia = a.view(torch.int32).to(torch.int64)
    ib = b.view(torch.int32).to(torch.int64)
    # Map the sign-magnitude float bit patterns to a monotone integer line.
    ia = torch.where(ia < 0, -(2**31) - ia, ia)
    ib = torch.where(ib < 0, -(2**31) - ib, ib)
    return int((ia - ib).abs().max())


# ---------------------------------------------------------------------------------------------
# Triton reference kernels
# ---------------------------------------------------------------------------------------------

_kernels = {}


def _triton_kernels():
    """Build the jitted reference kernels once (triton imported lazily, so the file collects
    and the non-Triton tests run where triton is missing)."""
    if _kernels:
        return _kernels
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def all_streams(
        seed, off_ptr, ints_ptr, floats_ptr, n, ROUNDS: tl.constexpr, BLOCK: tl.constexpr
    ):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        off = tl.load(off_ptr + idx, mask=mask, other=0)
        i0, i1, i2, i3 = tl.randint4x(seed, off, ROUNDS)
        tl.store(ints_ptr + 0 * n + idx, i0.to(tl.int32, bitcast=True), mask=mask)
        tl.store(ints_ptr + 1 * n + idx, i1.to(tl.int32, bitcast=True), mask=mask)
        tl.store(ints_ptr + 2 * n + idx, i2.to(tl.int32, bitcast=True), mask=mask)
        tl.store(ints_ptr + 3 * n + idx, i3.to(tl.int32, bitcast=True), mask=mask)
        r = tl.randint(seed, off, ROUNDS)
        tl.store(ints_ptr + 4 * n + idx, r.to(tl.int32, bitcast=True), mask=mask)
        tl.store(floats_ptr + 0 * n + idx, tl.rand(seed, off, ROUNDS), mask=mask)
        tl.store(floats_ptr + 1 * n + idx, tl.randn(seed, off, ROUNDS), mask=mask)
        u0, u1, u2, u3 = tl.rand4x(seed, off, ROUNDS)
        tl.store(floats_ptr + 2 * n + idx, u0, mask=mask)
        tl.store(floats_ptr + 3 * n + idx, u1, mask=mask)
        tl.store(floats_ptr + 4 * n + idx, u2, mask=mask)
        tl.store(floats_ptr + 5 * n + idx, u3, mask=mask)
        z0, z1, z2, z3 = tl.randn4x(seed, off, ROUNDS)
        tl.store(floats_ptr + 6 * n + idx, z0, mask=mask)
        tl.store(floats_ptr + 7 * n + idx, z1, mask=mask)
        tl.store(floats_ptr + 8 * n + idx, z2, mask=mask)
        tl.store(floats_ptr + 9 * n + idx, z3, mask=mask)

    @triton.jit
    def word_to_float(x_ptr, u_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        x = tl.load(x_ptr + idx, mask=mask, other=0).to(tl.uint32, bitcast=True)
        tl.store(u_ptr + idx, tl.uint_to_uniform_float(x), mask=mask)

    _kernels["all_streams"] = all_streams
    _kernels["word_to_float"] = word_to_float
    return _kernels


_triton_cache = {}


def _block(n: int) -> int:
    """Interpreter: one program covers everything (its cost is per program, not per element)."""
    return 1 << max(n - 1, 1).bit_length() if INTERPRET else 1024


def _check_normals(ours: torch.Tensor, theirs: torch.Tensor) -> int:
    """Assert Triton's and our normals agree; return the max ulp difference."""
    ulp = _ulp_diff(ours, theirs)
    if INTERPRET:
        assert ulp <= MAX_NORMAL_ULP, f"max ulp difference {ulp}"
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-6)
    else:  # compiled GPU code may use approximate log/sin/cos: compare absolutely
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-5)
    return ulp


def _triton_streams(seed: int, offsets: torch.Tensor, n_rounds: int = philox.N_ROUNDS):
    """(ints [5, n] as int64 words, floats [10, n]) from one Triton launch, cached per case."""
    key = (seed, offsets.dtype, offsets.numel(), n_rounds)
    if key not in _triton_cache:
        kernel = _triton_kernels()["all_streams"]
        n = offsets.numel()
        dev = _triton_device()
        ints = torch.zeros(5 * n, dtype=torch.int32, device=dev)
        floats = torch.zeros(10 * n, dtype=torch.float32, device=dev)
        block = _block(n)
        grid = ((n + block - 1) // block,)
        kernel[grid](seed, offsets.to(dev), ints, floats, n, n_rounds, block)
        _triton_cache[key] = (_words(ints.cpu()).view(5, n), floats.cpu().view(10, n))
    return _triton_cache[key]


# ---------------------------------------------------------------------------------------------
# Bit-exact agreement with Triton
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("seed", SEEDS)
def test_integers_and_uniforms_match_triton(seed, dtype):
    offsets = _offsets(dtype)
    ints, floats = _triton_streams(seed, offsets)
    ours = torch.stack(philox.randint4x(seed, offsets))
    assert ours.dtype == torch.int64
    assert int(ours.min()) >= 0 and int(ours.max()) <= M32
    assert torch.equal(ours, ints[:4])
    assert torch.equal(philox.randint(seed, offsets), ints[4])
    # Uniforms: bit for bit.
    assert torch.equal(philox.rand(seed, offsets).view(torch.int32), floats[0].view(torch.int32))
    ours_u = torch.stack(philox.rand4x(seed, offsets))
    assert torch.equal(ours_u.view(torch.int32), floats[2:6].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("seed", SEEDS)
def test_normals_match_triton(seed, dtype):
    offsets = _offsets(dtype)
    _, floats = _triton_streams(seed, offsets)
    ours = torch.cat(
        [philox.randn(seed, offsets)[None], torch.stack(philox.randn4x(seed, offsets))]
    )
    theirs = torch.cat([floats[1:2], floats[6:10]])
    assert ours.dtype == torch.float32
    ulp = _check_normals(ours, theirs)
    print(f"seed={seed} dtype={dtype}: max normal ulp difference {ulp}")


def test_fewer_rounds_match_triton():
    offsets = _offsets(torch.int64)
    ints, floats = _triton_streams(12345, offsets, n_rounds=7)
    assert torch.equal(torch.stack(philox.randint4x(12345, offsets, n_rounds=7)), ints[:4])
    assert not torch.equal(torch.stack(philox.randint4x(12345, offsets)), ints[:4])


def test_uint32_to_uniform_matches_triton():
    words = [
        0,
        1,
        2,
        2**23,
        2**24 + 1,
        2**31 - 2,
        2**31 - 1,
        2**31,
        2**31 + 1,
        2**32 - 2,
        2**32 - 1,
    ]
    gen = torch.Generator().manual_seed(0)
    words += torch.randint(0, 2**32, (4000,), generator=gen, dtype=torch.int64).tolist()
    x = torch.tensor(words, dtype=torch.int64)
    x32 = torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)
    dev = _triton_device()
    theirs = torch.zeros(len(words), dtype=torch.float32, device=dev)
    block = _block(len(words))
    grid = ((len(words) + block - 1) // block,)
    _triton_kernels()["word_to_float"][grid](x32.to(dev), theirs, len(words), block)
    theirs = theirs.cpu()
    ours = philox.uint32_to_uniform(x)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    assert torch.equal(philox.uint32_to_uniform(x32), ours)  # int32 bit patterns accepted too
    assert float(ours.min()) == 0.0 and float(ours.max()) < 1.0


def test_pair_uniform_to_normal_matches_randn():
    offsets = torch.arange(5000)
    u1, u2, _, _ = philox.rand4x(7, offsets)
    n1, n2 = philox.pair_uniform_to_normal(u1, u2)
    z1, z2, _, _ = philox.randn4x(7, offsets)
    assert torch.equal(n1, z1) and torch.equal(n2, z2)
    assert torch.equal(philox.randn(7, offsets), z1)
    # The 1e-7 clamp keeps u1 = 0 finite.
    zero = torch.zeros(1)
    a, b = philox.pair_uniform_to_normal(zero, zero)
    assert torch.isfinite(a).all() and float(b) == 0.0


def test_per_element_seeds_match_separate_launches():
    offsets = _offsets(torch.int64)
    s_even, s_odd = 2**62 + 12345, 12345  # both in SEEDS: the two launches are cached
    is_even = torch.arange(offsets.numel()) % 2 == 0
    seeds = torch.where(is_even, s_even, s_odd)
    even_ints, even_f = _triton_streams(s_even, offsets)
    odd_ints, odd_f = _triton_streams(s_odd, offsets)
    want_ints = torch.where(is_even, even_ints[:4], odd_ints[:4])
    assert torch.equal(torch.stack(philox.randint4x(seeds, offsets)), want_ints)
    want_u = torch.where(is_even, even_f[2:6], odd_f[2:6])
    got_u = torch.stack(philox.rand4x(seeds, offsets))
    assert torch.equal(got_u.view(torch.int32), want_u.view(torch.int32))
    want_n = torch.where(is_even, even_f[6:10], odd_f[6:10])
    got_n = torch.stack(philox.randn4x(seeds, offsets))
    _check_normals(got_n, want_n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_cpu():
    offsets = _offsets(torch.int64)
    seeds = torch.where(torch.arange(offsets.numel()) % 3 == 0, 7, 2**62 + 12345)
    for seed in (12345, seeds):
        cuda_seed = seed.cuda() if isinstance(seed, torch.Tensor) else seed
        cpu_ints = torch.stack(philox.randint4x(seed, offsets))
        assert torch.equal(torch.stack(philox.randint4x(cuda_seed, offsets.cuda())).cpu(), cpu_ints)
        cpu_u = torch.stack(philox.rand4x(seed, offsets))
        assert torch.equal(torch.stack(philox.rand4x(cuda_seed, offsets.cuda())).cpu(), cpu_u)
        cpu_n = torch.stack(philox.randn4x(seed, offsets))
        cuda_n = torch.stack(philox.randn4x(cuda_seed, offsets.cuda())).cpu()
        assert _ulp_diff(cuda_n, cpu_n) <= MAX_NORMAL_ULP


# ---------------------------------------------------------------------------------------------
# Torch-only properties (no Triton needed)
# ---------------------------------------------------------------------------------------------


def test_seed_tensor_broadcasts_against_offsets():
    offsets = torch.arange(300)
    seeds = torch.tensor([[5], [2**40 + 9]], dtype=torch.int64)
    out = philox.randint4x(seeds, offsets)
    assert all(o.shape == (2, 300) for o in out)
    for row, s in enumerate([5, 2**40 + 9]):
        ref = philox.randint4x(s, offsets)
        assert all(torch.equal(o[row], r) for o, r in zip(out, ref))


def test_shapes_chunks_and_noncontiguous_offsets(monkeypatch):
    offsets = torch.arange(10_000).view(100, 100).t()  # non-contiguous
    ref = philox.randint4x(99, offsets.contiguous())
    monkeypatch.setattr(philox, "_CPU_CHUNK", 777)  # many ragged blocks
    got = philox.randint4x(99, offsets)
    assert all(g.shape == (100, 100) and torch.equal(g, r) for g, r in zip(got, ref))
    empty = philox.randint4x(99, torch.zeros(0, 3, dtype=torch.int64))
    assert all(e.shape == (0, 3) for e in empty)
    assert philox.rand(3, torch.tensor(5)).shape == ()


def test_overflow_free_multiply_fallback_agrees(monkeypatch):
    offsets = torch.cat([torch.arange(4096), torch.tensor(LARGE64)])
    ref = philox.randint4x(2**62 + 12345, offsets)
    monkeypatch.setattr(philox, "_wraps", {"cpu": False})
    got = philox.randint4x(2**62 + 12345, offsets)
    assert all(torch.equal(g, r) for g, r in zip(got, ref))


def test_invalid_inputs():
    with pytest.raises(TypeError):
        philox.randint4x(1, torch.arange(4, dtype=torch.float32))
    with pytest.raises(TypeError):
        philox.randint4x(torch.tensor([1.0]), torch.arange(4))
    with pytest.raises(ValueError):
        philox.randint4x(2**64, torch.arange(4))
    with pytest.raises(ValueError):
        philox.randint4x(1, torch.arange(4), n_rounds=0)


def test_uniform_and_normal_distributions():
    stats = pytest.importorskip("scipy.stats")
    offsets = torch.arange(100_000)
    key = philox.stream_key(11, 0, 0)
    u = philox.rand(key, offsets)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert stats.kstest(u.double().numpy(), "uniform").pvalue > 1e-3
    u4 = torch.cat(philox.rand4x(key + 1, torch.arange(25_000)))
    assert stats.kstest(u4.double().numpy(), "uniform").pvalue > 1e-3
    z = philox.randn(key, offsets)
    assert stats.kstest(z.double().numpy(), "norm").pvalue > 1e-3
    z4 = torch.cat(philox.randn4x(key + 2, torch.arange(25_000)))
    assert stats.kstest(z4.double().numpy(), "norm").pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# Host-side keys and layer seeds
# ---------------------------------------------------------------------------------------------

# Pinned values: the hash must not depend on the process (no hash()), and any change to it (which
# would silently change every draw of every saved model) must be deliberate.
_PINNED = {
    (0, 0, 0): 1279368494785126216,
    (12345, 7, 3): 892388732261198766,
    (2**62 + 1, 2**40, 11): 8993721553379565819,
}


def test_stream_key_pinned_values():
    for args, want in _PINNED.items():
        assert philox.stream_key(*args) == want


def test_stream_key_range_and_distinctness():
    keys = set()
    for layer_seed in (0, 1, 12345, 2**62 + 1, 2**63 - 1):
        for step in range(64):
            for op_id in range(16):
                k = philox.stream_key(layer_seed, step, op_id)
                assert isinstance(k, int) and 0 <= k < 2**63
                keys.add(k)
    assert len(keys) == 5 * 64 * 16
    # Usable as a seed directly.
    assert philox.randint4x(philox.stream_key(2**63 - 1, 10**6, 99), torch.arange(3))[0].shape == (
        3,
    )


def test_stream_key_streams_unrelated():
    offsets = torch.arange(50_000)
    base = philox.rand(philox.stream_key(5, 0, 0), offsets).double()
    for step, op_id in [(1, 0), (0, 1), (1, 1), (2**31, 0)]:
        other = philox.rand(philox.stream_key(5, step, op_id), offsets).double()
        corr = torch.corrcoef(torch.stack([base, other]))[0, 1]
        assert abs(float(corr)) < 0.02
        assert float((base == other).double().mean()) < 1e-3


def test_new_layer_seed_follows_torch_manual_seed():
    torch.manual_seed(123)
    a = [philox.new_layer_seed() for _ in range(4)]
    torch.manual_seed(123)
    b = [philox.new_layer_seed() for _ in range(4)]
    assert a == b and len(set(a)) == 4
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in a)
    gen = torch.Generator().manual_seed(5)
    c = philox.new_layer_seed(gen)
    assert c == philox.new_layer_seed(torch.Generator().manual_seed(5))
    assert 0 <= c < 2**63


def test_stream_key_values_are_pinned():
    """The keys of (layer seed, step, op) are part of the documented random streams: a change
    of these values changes every draw of every checkpointed run."""
    cases = [(0, 0, 0), (1, 2, 3), (2**63 - 1, 2**40 + 5, 7), (12345, 999, 1)]
    want = [1279368494785126216, 7510213797696614745, 7168542582542666945, 5169819939566142805]
    assert [philox.stream_key(*c) for c in cases] == want
    assert [philox.stream_key(*c) for c in cases] == want  # the cached seed round too


@pytest.mark.parametrize("n", [3, philox._VECTOR_KEYS_FROM, 200])
def test_stream_keys_equal_stream_key(n):
    """The many-layer path (int64 tensor ops) hashes exactly like the per-layer one."""
    gen = torch.Generator().manual_seed(n)
    seeds = [philox.new_layer_seed(gen) for _ in range(n)]
    seeds[0], seeds[-1] = 0, 2**63 - 1
    steps = torch.randint(0, 2**62, (n,), generator=gen).tolist()
    steps[0], steps[-1] = 0, 2**64 - 1  # the step enters as its low 64 bits
    for op in (0, 1, 7):
        want = [philox.stream_key(s, k, op) for s, k in zip(seeds, steps)]
        assert philox.stream_keys(seeds, steps, op) == want


def test_draw_keys_advances_a_shared_counter_once_per_use():
    """The same counter twice in one call: the second use takes the next key (as two calls)."""
    from bio_transformations import ops

    shared, other = torch.zeros((), dtype=torch.int64), torch.full((), 5, dtype=torch.int64)
    keys = ops.draw_keys([shared, other, shared], [11, 12, 11], "volume")
    op = ops.OP_IDS["volume"]
    assert keys == [philox.stream_key(11, 0, op), philox.stream_key(12, 5, op),
                    philox.stream_key(11, 1, op)]  # fmt: skip
    assert int(shared) == 2 and int(other) == 6
