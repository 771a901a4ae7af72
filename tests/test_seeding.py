"""Seed derivation: distinct key tuples give distinct seeds, the same tuple the same seed."""
from __future__ import annotations

import itertools

from gpual.seeding import MC_DROPOUT, SELECT, TRAIN, derive_seed


def test_same_keys_same_seed_and_in_range() -> None:
    assert derive_seed(3, SELECT, 2) == derive_seed(3, SELECT, 2)
    assert 0 <= derive_seed(2**40, TRAIN, -1, -1) < 2**32


def test_shifted_seed_and_round_do_not_collide() -> None:
    # The rule it replaces, seed + round, gave (0, 1) and (1, 0) the same draw.
    seeds = {derive_seed(s, SELECT, r) for s, r in itertools.product(range(10), range(10))}
    assert len(seeds) == 100


def test_streams_and_negative_keys_are_distinct() -> None:
    keys = [(0, stream, tag, epoch) for stream in (SELECT, MC_DROPOUT, TRAIN) for tag in (-1, 0, 1) for epoch in (-1, 0, 1)]
    assert len({derive_seed(*k) for k in keys}) == len(keys)
