"""The GPU backends' bookkeeping that runs without a GPU: thread affinity of the device context, KV slots and
the CUDA-graph cache shared by a decoder's forks. Nothing here imitates CUDA or TensorRT: the units under
test are the backend-neutral seam (`base.bind_context`) and the keying/lifetime logic the TensorRT backend
drives with real driver handles (`KvSlots`, `GraphCache`), exercised with plain Python values.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from fundusrt.runtime.backends.base import PackageSessions, bind_context, continuation_logits_by_forks
from fundusrt.runtime.backends.trt_graphs import GraphCache, KvSlots


class ThreadBoundContext:
    """A context that, like a CUDA context, is current per thread: `activate` makes it current on the caller."""

    def __init__(self) -> None:
        self._local = threading.local()

    def activate(self) -> None:
        self._local.current = True

    def require_current(self, what: str) -> None:
        if not getattr(self._local, "current", False):
            raise RuntimeError(f"{what}: invalid context on thread {threading.current_thread().name}")


class Component:
    """A session that works only where its context is current (what a CUDA call demands)."""

    def __init__(self, context: ThreadBoundContext, name: str) -> None:
        self.context, self.name = context, name

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.context.require_current(self.name)
        return {"out": next(iter(inputs.values()))}


class Decoder:
    def __init__(self, context: ThreadBoundContext, seq_len: int = 0) -> None:
        self.context, self.seq_len, self.max_seq_len = context, seq_len, 16

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        self.context.require_current("prefill")
        self.seq_len += inputs_embeds.shape[1]
        return np.zeros(4, np.float32)

    def decode(self, token_id: int) -> np.ndarray:
        self.context.require_current("decode")
        self.seq_len += 1
        return np.zeros(4, np.float32)

    def reset(self) -> None:
        self.context.require_current("reset")
        self.seq_len = 0

    def fork(self) -> Decoder:
        self.context.require_current("fork")
        return Decoder(self.context, self.seq_len)

    def continuation_logits(self, continuations: list[list[int]]) -> list[np.ndarray]:
        self.context.require_current("continuation_logits")
        return continuation_logits_by_forks(self, continuations)


def open_on_this_thread(context: ThreadBoundContext) -> PackageSessions:
    context.activate()  # what the backend does while loading engines
    return PackageSessions(vision=Component(context, "vision"), connector=Component(context, "connector"),
                           embed=Component(context, "embed"), decoder=Decoder(context), backend="test")


def study_on_worker(sessions: PackageSessions) -> BaseException | None:
    """What the node's worker thread does with a package its main thread opened."""
    failure: list[BaseException] = []

    def work() -> None:
        try:
            for component in (sessions.vision, sessions.connector, sessions.embed):
                component.run({"x": np.zeros(2)})
            sessions.decoder.reset()
            sessions.decoder.prefill(np.zeros((1, 3, 2)))
            fork = sessions.decoder.fork()
            fork.decode(1)
            assert (fork.seq_len, sessions.decoder.seq_len) == (4, 3)
            assert [len(rows) for rows in sessions.decoder.continuation_logits([[1], [2, 3]])] == [1, 2]
        except BaseException as exc:  # handed to the test thread
            failure.append(exc)

    worker = threading.Thread(target=work, name="study-worker")
    worker.start()
    worker.join()
    return failure[0] if failure else None


def test_context_is_made_current_on_the_thread_that_runs_the_study() -> None:
    context = ThreadBoundContext()
    assert "invalid context" in str(study_on_worker(open_on_this_thread(context)))  # the bug, without the seam
    assert study_on_worker(bind_context(open_on_this_thread(context), context)) is None


# -- KV slots and graphs across forks ---------------------------------------------------------------


class Fork:
    """Stands for a TrtDecoderSession: holds a leased slot until it is dropped."""

    def __init__(self, slots: KvSlots) -> None:
        self.slot = slots.lease(self)


def ask_many(slots: KvSlots, graphs: GraphCache, root: Fork, prefix: int, suffixes: list[int], new_tokens: int,
             captured: list[tuple]) -> int:
    """The decode-step keys of Pipeline.ask_many's pattern: one fork per question from a shared prefix, each
    fork dropped when the next one replaces it; returns how many decode steps replayed a graph."""
    replayed = 0
    parity = 1  # the shared prefix was prefilled once from parity 0
    fork = None
    for suffix in suffixes:
        fork = Fork(slots)  # the previous fork is still referenced while this one is made, as in ask_many
        seq_len, step_parity = prefix + suffix, 1 - parity  # the question's own prefill flipped the parity
        for _ in range(new_tokens):
            key = (fork.slot, seq_len, step_parity)
            if graphs.get(key) is None:
                graph = f"graph{len(captured)}"
                captured.append(key)
                graphs.put(key, graph)
            else:
                replayed += 1
            seq_len, step_parity = seq_len + 1, 1 - step_parity
    del fork
    gc.collect()
    assert root.slot == 0
    return replayed


def test_forks_reuse_slots_and_replay_each_others_graphs() -> None:
    allocated: list[int] = []
    slots: KvSlots[int] = KvSlots(lambda: allocated.append(len(allocated)) or len(allocated))
    destroyed: list[str] = []
    graphs = GraphCache(capacity=256, destroy=destroyed.append)
    root = Fork(slots)
    captured: list[tuple] = []
    questions = [5, 5, 7, 5, 5]
    first = ask_many(slots, graphs, root, prefix=40, suffixes=questions, new_tokens=6, captured=captured)
    # two fork slots in all: a dropped fork's buffers (and the graphs bound to them) serve the next-but-one
    assert len(slots) == 3 and len(allocated) == 3
    assert first > 0, "questions of equal length on the same slot must replay graphs"
    # the next study with the same prompt lengths captures nothing new: every decode step is a replay
    captured_before = len(captured)
    second = ask_many(slots, graphs, root, prefix=40, suffixes=questions, new_tokens=6, captured=captured)
    assert len(captured) == captured_before and second == len(questions) * 6
    assert destroyed == [] and len(slots) == 3


def test_graph_cache_destroys_what_it_drops() -> None:
    destroyed: list[str] = []
    graphs = GraphCache(capacity=2, destroy=destroyed.append)
    graphs.put((0, 10, 0), "a")
    graphs.put((0, 11, 1), "b")
    assert graphs.get((0, 10, 0)) == "a"  # now the most recently used
    graphs.put((1, 10, 0), "c")
    assert destroyed == ["b"] and graphs.get((0, 11, 1)) is None
    graphs.put((1, 10, 0), "c2")  # a re-capture replaces and frees the old executable
    assert destroyed == ["b", "c"]
    graphs.clear()
    assert sorted(destroyed) == ["a", "b", "c", "c2"] and len(graphs) == 0
    with pytest.raises(ValueError):
        GraphCache(capacity=0, destroy=destroyed.append)


def test_slots_are_leased_until_the_owner_is_dropped() -> None:
    slots: KvSlots[str] = KvSlots(lambda: "buffers")
    first, second = Fork(slots), Fork(slots)
    assert (first.slot, second.slot) == (0, 1)
    del first
    gc.collect()
    assert Fork(slots).slot == 0  # the lowest free slot comes back first
    with pytest.raises(ValueError, match="not held"):
        slots.release(7)
