"""The ``capturable`` mode's random-stream keys: derived on the device, from per-layer device
step counters the same launch advances, so every CUDA graph replay draws fresh numbers.

Eagerly (the default) the host turns each layer's CPU step counter into a key
(``ops.draw_keys``: ``philox.stream_key(seed, step, op)``, then ``step += 1``) and sends the
keys to the device. A CUDA graph replays no host code: it would reuse the captured keys and
draw the same noise every replay. With ``settings.capturable`` (``BIO_CAPTURABLE=1`` or
``settings.override(capturable=True)``), like ``torch.optim``'s ``capturable=True``:

* every layer gets ONE device counter (an int64 scalar on its device, :func:`device_step`),
  started from its CPU counter the first time it is needed (that must happen eagerly, before
  capture: a warm-up call does it);
* each launch that draws first runs :data:`_derive_keys` (one small launch for the whole
  group): ``key = stream_key(seed, step, op)`` exactly as the host computes it, and
  ``step += 1``, on the device. Captured, that launch advances the counters at every replay.

So ``k`` capturable calls draw what ``k`` eager calls draw from the same starting counters.
The CPU counters do not move meanwhile (nothing on the host runs in a replay):
:func:`sync_steps` copies the device counters back (a device read: call it before saving a
checkpoint or going back to eager draws). Only the Triton backend's volume scaling
(``bio_step``/``volume_dependent_lr``) draws this way; the other random ops keep host keys.
"""

from __future__ import annotations

import weakref
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from .launch import CaptureError, Plan, _int64s, capturing

Tensor = torch.Tensor

_BLOCK = 128

# One device counter per CPU step counter (a layer's ``_rng_step``), for any grouping of
# layers: every launch of that layer advances the same counter.
_device_steps: "weakref.WeakKeyDictionary[Tensor, Tensor]" = weakref.WeakKeyDictionary()


def device_step(step: Tensor, device: torch.device) -> Tensor:
    """The device counter of the layer whose CPU step counter is ``step`` (made on first use
    from the CPU counter's value; never while a CUDA graph is being captured)."""
    counter = _device_steps.get(step)
    if counter is None or counter.device != device:
        if capturing(device):
            raise CaptureError(
                "capturable mode: a layer's device step counter would be created during CUDA "
                "graph capture; run the same call once eagerly before capturing"
            )
        counter = _device_steps[step] = torch.tensor(int(step), dtype=torch.int64).to(device)
    return counter


def sync_steps(steps: Sequence[Tensor]) -> None:
    """Copy the device counters of these CPU step counters back to them (a device read)."""
    for step in steps:
        counter = _device_steps.get(step)
        if counter is not None:
            step.copy_(counter.cpu())


@triton.jit
def _mix(z):
    """One splitmix64 step on uint64 (``philox._splitmix64``)."""
    z = z + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _derive_keys(rows, keys, n, op_id, BLOCK: tl.constexpr):
    """Per row ``t`` of ``rows`` (``[counter address, seed, counter offset]``): ``keys[2t] =
    stream_key(seed, step, op_id)``, ``keys[2t+1] = offset``, then ``step += 1``."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = t < n
    counter = tl.load(rows + 3 * t, mask=m, other=0).to(tl.pointer_type(tl.int64))
    seed = tl.load(rows + 3 * t + 1, mask=m, other=0).to(tl.uint64, bitcast=True)
    offset = tl.load(rows + 3 * t + 2, mask=m, other=0)
    step = tl.load(counter, mask=m, other=0)
    h = _mix(seed)
    h = _mix(h ^ step.to(tl.uint64, bitcast=True))
    h = _mix(h ^ op_id.to(tl.uint64))
    tl.store(keys + 2 * t, (h >> 1).to(tl.int64, bitcast=True), mask=m)
    tl.store(keys + 2 * t + 1, offset, mask=m)
    tl.store(counter, step + 1, mask=m)


class DeviceKeys:
    """Keys for one launch, derived on the device (see the module docstring): what the
    Triton backend takes in place of a list of host keys in ``capturable`` mode."""

    __slots__ = ("steps", "seeds", "op_id", "_tag")

    def __init__(self, steps: Sequence[Tensor], seeds: Sequence[int], op_id: int):
        self.steps, self.seeds, self.op_id = list(steps), list(seeds), int(op_id)
        self._tag = tuple(map(id, self.steps))

    def __len__(self) -> int:
        return len(self.steps)

    def derive(self, plan: Plan, index: List[int], offsets=None) -> Tensor:
        """The ``(key, offset)`` pairs of ``plan``'s rows (tensors ``index`` of the call) in
        the plan's keys buffer, written and the counters advanced by one launch."""
        name = ("derive", self._tag, tuple(index))
        rows = plan.buffers.get(name)
        if rows is None:
            if capturing(plan.device):
                raise CaptureError(
                    "capturable mode: a key table would be built during CUDA graph capture; "
                    "run the same call once eagerly before capturing"
                )
            values = []
            for i in index:
                counter = device_step(self.steps[i], plan.device)
                values += [counter.data_ptr(), self.seeds[i], offsets[i] if offsets else 0]
            rows = plan.buffers[name] = _int64s(values).to(plan.device)
            # The table points at the counters: they live at least as long as the plan.
            plan.keep.extend(device_step(self.steps[i], plan.device) for i in index)
        keys = plan.buffer("keys", 2 * len(index), torch.int64)
        plan.use()
        n = len(index)
        _derive_keys[(triton.cdiv(n, _BLOCK),)](rows, keys, n, self.op_id, BLOCK=_BLOCK)
        return keys
