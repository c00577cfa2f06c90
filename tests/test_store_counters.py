"""Durable counters (stock held and sold), the same on every store."""

from __future__ import annotations

import threading

import pytest


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


# Stock holds: units held for one owner (a payment), released or kept exactly once.


def test_a_hold_raises_the_counters_and_names_its_owner(store):
    assert store.hold_stock("pay-1", {"seat": 2, "vip": 1}, {"seat": 10, "vip": 1}) is None
    assert store.get_counter("stock:seat") == 2 and store.get_counter("stock:vip") == 1
    assert store.stock_holders() == ["pay-1"]


def test_a_hold_is_all_or_nothing_and_names_the_item_that_does_not_fit(store):
    store.hold_stock("pay-1", {"vip": 1}, {"vip": 1})
    assert store.hold_stock("pay-2", {"seat": 2, "vip": 1, "tee": 1}, {"seat": 10, "vip": 1, "tee": 0}) == "vip"
    assert store.get_counter("stock:seat") == 0 and store.get_counter("stock:tee") == 0
    assert store.stock_holders() == ["pay-1"]
    assert store.release_stock("pay-2") == {}


def test_an_owner_holds_once(store):
    store.hold_stock("pay-1", {"seat": 2}, {"seat": 10})
    with pytest.raises(ValueError, match="already holds"):
        store.hold_stock("pay-1", {"seat": 1, "vip": 1}, {"seat": 10, "vip": 1})
    assert store.get_counter("stock:seat") == 2 and store.get_counter("stock:vip") == 0
    assert store.release_stock("pay-1") == {"seat": 2}


def test_holding_nothing_records_nothing(store):
    assert store.hold_stock("pay-1", {}, {}) is None
    assert store.stock_holders() == []


@pytest.mark.parametrize(
    "owner, units, capacity",
    [
        ("", {"seat": 1}, {"seat": 1}),
        ("pay-1", {"seat": 0}, {"seat": 1}),
        ("pay-1", {"seat": -1}, {"seat": 1}),
        ("pay-1", {"seat": True}, {"seat": 1}),
        ("pay-1", {"seat": 1}, {}),
        ("pay-1", {"seat": 1}, {"seat": -1}),
    ],
)
def test_bad_holds_are_refused_before_anything_changes(store, owner, units, capacity):
    with pytest.raises(ValueError):
        store.hold_stock(owner, units, capacity)
    assert store.get_counter("stock:seat") == 0 and store.stock_holders() == []


def test_release_gives_the_units_back_once(store):
    store.hold_stock("pay-1", {"seat": 2, "vip": 1}, {"seat": 10, "vip": 1})
    store.hold_stock("pay-2", {"seat": 3}, {"seat": 10})
    assert store.release_stock("pay-1") == {"seat": 2, "vip": 1}
    assert store.get_counter("stock:seat") == 3 and store.get_counter("stock:vip") == 0
    assert store.release_stock("pay-1") == {}
    assert store.get_counter("stock:seat") == 3
    assert store.stock_holders() == ["pay-2"]


def test_keep_leaves_the_units_counted_and_ends_the_hold_once(store):
    store.hold_stock("pay-1", {"seat": 2}, {"seat": 10})
    assert store.keep_stock("pay-1") == {"seat": 2}
    assert store.keep_stock("pay-1") == {}
    assert store.release_stock("pay-1") == {}  # sold: nothing left to give back
    assert store.get_counter("stock:seat") == 2
    assert store.stock_holders() == []


def test_an_owner_may_hold_again_once_its_hold_ended(store):
    store.hold_stock("pay-1", {"seat": 2}, {"seat": 2})
    store.release_stock("pay-1")
    assert store.hold_stock("pay-1", {"seat": 2}, {"seat": 2}) is None
    assert store.get_counter("stock:seat") == 2


def test_a_release_never_takes_a_counter_below_zero(store):
    store.hold_stock("pay-1", {"seat": 3}, {"seat": 10})
    store.adjust_counter("stock:seat", -2)  # an operator corrected the counter by hand
    assert store.release_stock("pay-1") == {"seat": 3}
    assert store.get_counter("stock:seat") == 0


def test_holds_do_not_expire_with_the_records(backend):
    store = backend.open(retention=1)
    store.hold_stock("pay-1", {"seat": 2}, {"seat": 10})
    backend.elapse(1.5)
    assert store.stock_holders() == ["pay-1"]
    assert store.release_stock("pay-1") == {"seat": 2}


def test_holds_outlive_the_store_object(backend):
    if backend.kind == "memory":
        pytest.skip("the memory store lives as long as its object")
    backend.open().hold_stock("pay-1", {"seat": 2}, {"seat": 10})
    reopened = backend.open()
    assert reopened.stock_holders() == ["pay-1"]
    assert reopened.release_stock("pay-1") == {"seat": 2}
    assert reopened.get_counter("stock:seat") == 0


def race(count: int, work) -> list:
    """Run work(n) for n in range(count) on as many threads, all let go at once."""
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(n: int) -> None:
        barrier.wait()
        results[n] = work(n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_buyers_racing_for_the_last_units_never_pass_the_capacity(store):
    store.hold_stock("early", {"seat": 4}, {"seat": 10})
    refusals = race(20, lambda n: store.hold_stock(f"pay-{n}", {"seat": 2, "tee": 1}, {"seat": 10, "tee": 5}))
    held = [n for n, refused in enumerate(refusals) if refused is None]
    assert len(held) == 3  # seats 4 + 3 x 2 = 10
    assert set(refusals) == {None, "seat"}
    assert store.get_counter("stock:seat") == 10 and store.get_counter("stock:tee") == 3
    assert store.stock_holders() == sorted(["early", *(f"pay-{n}" for n in held)])


def test_racing_releases_and_keeps_end_a_hold_exactly_once(store):
    kept = 0
    for round_ in range(5):
        owner = f"pay-{round_}"
        store.hold_stock(owner, {"seat": 3}, {"seat": 100})
        ends = race(
            16,
            lambda n, owner=owner: (
                ("release", store.release_stock(owner)) if n % 2 else ("keep", store.keep_stock(owner))
            ),
        )
        winners = [(verb, units) for verb, units in ends if units]
        assert len(winners) == 1 and winners[0][1] == {"seat": 3}
        kept += winners[0][0] == "keep"
    assert store.get_counter("stock:seat") == 3 * kept
    assert store.stock_holders() == []


def test_holds_and_releases_from_many_threads_balance_to_zero(store):
    def buy_and_give_back(n: int) -> list[tuple[int, dict]]:
        seen = []
        for attempt in range(10):
            owner = f"pay-{n}-{attempt}"
            if store.hold_stock(owner, {"seat": 1}, {"seat": 5}) is None:
                seen.append((store.get_counter("stock:seat"), store.release_stock(owner)))
        return seen

    seen = [entry for per_thread in race(12, buy_and_give_back) for entry in per_thread]
    assert seen and all(counter <= 5 and released == {"seat": 1} for counter, released in seen)
    assert store.get_counter("stock:seat") == 0
    assert store.stock_holders() == []
