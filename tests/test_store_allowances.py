"""Rate-limit allowances in every store: a fixed window, all or nothing, exact under concurrency."""

from __future__ import annotations

import threading

import pytest


def test_an_allowance_is_taken_until_it_runs_out(store, backend):
    first = store.take_allowance("ip:1", 1, limit=3, window=30)
    assert first.taken and first.left == 2
    assert first.resets_at == pytest.approx(backend.clock() + 30, abs=1)
    assert store.take_allowance("ip:1", 2, limit=3, window=30).left == 0
    refused = store.take_allowance("ip:1", 1, limit=3, window=30)
    assert (refused.taken, refused.left) == (False, 0)
    assert refused.resets_at == pytest.approx(first.resets_at, abs=1)  # the window does not move (30 s on)


def test_a_take_is_all_or_nothing_and_says_what_is_left(store):
    store.take_allowance("ip:1", 3, limit=5, window=30)
    too_much = store.take_allowance("ip:1", 3, limit=5, window=30)
    assert (too_much.taken, too_much.left) == (False, 2)
    assert store.take_allowance("ip:1", 2, limit=5, window=30).taken  # the 2 left were not burnt


def test_a_cost_of_nothing_only_looks(store):
    look = store.take_allowance("ip:1", 0, limit=4, window=30)
    assert (look.taken, look.left) == (True, 4)
    store.take_allowance("ip:1", 1, limit=4, window=30)
    assert store.take_allowance("ip:1", 0, limit=4, window=30).left == 3
    assert store.take_allowance("ip:1", 0, limit=4, window=30).left == 3


def test_the_allowance_comes_back_when_the_window_ends(store, backend):
    store.take_allowance("ip:1", 2, limit=2, window=0.3)
    assert not store.take_allowance("ip:1", 1, limit=2, window=0.3).taken
    backend.elapse(0.4)
    again = store.take_allowance("ip:1", 1, limit=2, window=0.3)
    assert (again.taken, again.left) == (True, 1)


def test_allowances_are_independent_and_apart_from_values(store):
    store.take_allowance("ip:1", 1, limit=1, window=30)
    assert store.take_allowance("ip:2", 1, limit=1, window=30).taken
    assert store.get_value("ip:1") is None
    assert store.add("ip:1", {"mine": True}, ttl=30)


def test_concurrent_takes_never_pass_the_limit(store):
    start = threading.Barrier(8)
    taken: list[bool] = []

    def client() -> None:
        start.wait()
        for _ in range(10):
            taken.append(store.take_allowance("ip:busy", 1, limit=25, window=30).taken)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert taken.count(True) == 25
    assert len(taken) == 80


@pytest.mark.parametrize(("cost", "limit", "window"), [(-1, 5, 30), (1, 0, 30), (1, 5, 0), (1.5, 5, 30)])
def test_bad_takes_are_refused(store, cost, limit, window):
    with pytest.raises(ValueError):
        store.take_allowance("ip:1", cost, limit=limit, window=window)
