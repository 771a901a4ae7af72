"""Seeds derived from several integer keys, one rule for every random draw of gpual.

A seed for (config seed, stream, round, ...) is hashed by NumPy's ``SeedSequence``, so
distinct key tuples give unrelated seeds; a sum such as ``seed + round`` would make
(seed 0, round 1) and (seed 1, round 0) draw the same numbers.
"""
from __future__ import annotations

import numpy as np

# Streams: which draw a seed is for, so that two draws with the same other keys differ.
SELECT = 1  # the random strategy (and round 0's initial draw)
MC_DROPOUT = 2  # BALD's Monte-Carlo dropout masks, per global batch
TRAIN = 3  # weight initialisation, dropout, shuffling and augmentation, per epoch
KMEANS_GROUP = 4  # two-level KMeans: each group's clustering, per group

_WORD = 1 << 64


def derive_seed(*keys: int) -> int:
    """A seed in [0, 2**32) from integer keys (negative keys allowed: taken modulo 2**64).

    >>> derive_seed(0, SELECT, 1) == derive_seed(1, SELECT, 0)
    False
    """
    return int(np.random.SeedSequence([int(k) % _WORD for k in keys]).generate_state(1, dtype=np.uint32)[0])
