"""A static memory plan for a program that runs its steps in a fixed order: one arena, and every
buffer at a fixed offset in it.

Buffer b has a size s_b (bytes, rounded up to the alignment) and a lifetime [first_b, last_b]:
the step that writes it first and the step that reads it last. Two buffers may share bytes only
when their lifetimes are disjoint, so a plan is offsets o_b with

    [o_a, o_a + s_a) and [o_b, o_b + s_b) disjoint whenever the lifetimes of a and b overlap,

and its cost is the arena size  max_b (o_b + s_b).  No plan can beat the largest step footprint

    L = max_t  sum { s_b : first_b <= t <= last_b },

the lower bound reported beside every plan. Minimising the arena is NP-hard in general (dynamic
storage allocation); the plan here is *greedy by size* (Pisarchyk & Lee, "Efficient Memory
Management for Deep Neural Net Inference", 2020, the rule of TensorFlow Lite's arena planner):
buffers from the largest down, each at the lowest aligned offset where it overlaps no placed
buffer that is alive at the same time. It reaches L on chains and on the usual CNN graphs.

Written here rather than taken from TVM because TVM 0.27's ``StaticPlanBlockMemory`` plans
storage for its VM (storage objects allocated at run time), not offsets in one C array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Buffer:
    """A buffer of ``size`` bytes written first at step ``first`` and read last at ``last``."""

    name: str
    size: int
    first: int
    last: int

    def overlaps(self, other: Buffer) -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass(frozen=True)
class ArenaPlan:
    offsets: dict[str, int]
    size: int
    lower_bound: int
    total: int  # every buffer in its own bytes: what a plan without reuse would take


def aligned(size: int, alignment: int) -> int:
    return -(-size // alignment) * alignment


def plan_arena(buffers: Sequence[Buffer], alignment: int = 16) -> ArenaPlan:
    """Offsets of ``buffers`` in one arena, greedy by size; see the module docstring.

    Parameters
    ----------
    buffers : sequence of Buffer
        Names must be unique; sizes >= 0; ``first <= last``.
    alignment : int
        Every offset and every size is a multiple of this many bytes.

    Returns
    -------
    ArenaPlan
        The offsets, the arena size, the lower bound L and the size without reuse.
    """
    if len({b.name for b in buffers}) != len(buffers):
        raise ValueError("buffer names must be unique")
    for b in buffers:
        if b.size < 0 or b.first > b.last:
            raise ValueError(f"buffer {b.name}: size {b.size}, lifetime [{b.first}, {b.last}]")
    sizes = {b.name: aligned(b.size, alignment) for b in buffers}
    placed: list[tuple[int, Buffer]] = []
    for buffer in sorted(buffers, key=lambda b: (-sizes[b.name], b.first, b.name)):
        offset = 0
        for start, other in sorted((p for p in placed if p[1].overlaps(buffer)),
                                   key=lambda p: p[0]):
            if start - offset >= sizes[buffer.name]:
                break
            offset = max(offset, start + sizes[other.name])
        placed.append((offset, buffer))
    offsets = {b.name: offset for offset, b in placed}
    size = max((offsets[n] + sizes[n] for n in offsets), default=0)
    steps = {t for b in buffers for t in (b.first, b.last)}
    lower_bound = max((sum(sizes[b.name] for b in buffers if b.first <= t <= b.last)
                       for t in steps), default=0)
    return ArenaPlan(offsets, size, lower_bound, sum(sizes.values()))
