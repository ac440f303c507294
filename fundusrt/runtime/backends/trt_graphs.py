"""Device-free bookkeeping of the TensorRT decoder: which KV buffers a session uses, which graphs may be replayed.

Kept apart from the CUDA calls so that slot reuse across forks and the graph cache's keying and
lifetime are tested without a GPU.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class KvSlots(Generic[T]):
    """KV cache slots (each a double-buffered set of device buffers) shared by a decoder and its forks.

    `acquire` hands out a free slot, making a new one only when none is free; `release` returns it.
    Slots are never freed while the family lives, so a graph captured on a slot stays valid for
    whichever session holds the slot next.

    Args:
        allocate: makes the buffers of a new slot.
    """

    def __init__(self, allocate: Callable[[], T]) -> None:
        self._allocate = allocate
        self._slots: list[T] = []
        self._free: list[int] = []

    def acquire(self) -> int:
        """A free slot's id (the lowest, so that forks keep landing on slots whose graphs exist)."""
        if self._free:
            slot = min(self._free)
            self._free.remove(slot)
            return slot
        self._slots.append(self._allocate())
        return len(self._slots) - 1

    def lease(self, owner: object) -> int:
        """Acquire a slot for `owner`, released when `owner` is garbage (a dropped fork gives its slot back)."""
        slot = self.acquire()
        weakref.finalize(owner, self.release, slot)
        return slot

    def release(self, slot: int) -> None:
        """Give `slot` back; the next acquire may return it."""
        if slot in self._free or not 0 <= slot < len(self._slots):
            raise ValueError(f"KV slot {slot} is not held")
        self._free.append(slot)

    def buffers(self, slot: int) -> T:
        """The buffers of `slot`."""
        return self._slots[slot]

    def __len__(self) -> int:
        return len(self._slots)


class GraphCache:
    """Instantiated CUDA graphs by key, least recently used first out, each destroyed when it leaves.

    Args:
        capacity: most graphs kept (each holds a few hundred kB of driver memory).
        destroy: frees one graph executable (cuGraphExecDestroy).
    """

    def __init__(self, capacity: int, destroy: Callable[[Any], None]) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity, self._destroy = capacity, destroy
        self._graphs: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        """The graph for `key`, marked as just used, or None."""
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
        return graph

    def put(self, key: Hashable, graph: Any) -> None:
        """Keep `graph` for `key`, destroying the least recently used one past capacity."""
        if key in self._graphs:
            self._destroy(self._graphs.pop(key))
        self._graphs[key] = graph
        if len(self._graphs) > self._capacity:
            _, oldest = self._graphs.popitem(last=False)
            self._destroy(oldest)

    def clear(self) -> None:
        """Destroy every graph (the family is going away)."""
        while self._graphs:
            _, graph = self._graphs.popitem(last=False)
            self._destroy(graph)

    def __len__(self) -> int:
        return len(self._graphs)
