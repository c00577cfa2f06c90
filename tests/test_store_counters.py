"""Durable counters (stock held and sold), the same on every store."""

from __future__ import annotations

import threading


def test_counter_starts_at_zero_and_adjusts(store):
    assert store.get_counter("stock:a") == 0
    assert store.adjust_counter("stock:a", 3) == 3
    assert store.adjust_counter("stock:a", -1) == 2
    assert store.get_counter("stock:a") == 2


def test_counter_refuses_to_pass_its_bounds(store):
    assert store.adjust_counter("stock:a", 2, maximum=2) == 2
    assert store.adjust_counter("stock:a", 1, maximum=2) is None
    assert store.adjust_counter("stock:a", -3) is None
    assert store.get_counter("stock:a") == 2
    assert store.adjust_counter("stock:a", 5) == 7  # no maximum: a sale that already happened


def test_counters_are_independent(store):
    store.adjust_counter("stock:a", 1)
    assert store.get_counter("stock:b") == 0


def test_concurrent_buyers_never_pass_the_maximum(store):
    granted = []
    barrier = threading.Barrier(20)

    def buy():
        barrier.wait()
        if store.adjust_counter("stock:seats", 1, maximum=7) is not None:
            granted.append(1)

    threads = [threading.Thread(target=buy) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 7
    assert store.get_counter("stock:seats") == 7
