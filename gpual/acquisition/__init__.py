"""``gpual select``: one acquisition round, stage by stage, in pipeline order.

:mod:`.forward` (round N-1's teacher over the pool) -> :mod:`.pooling` (per-superpixel
statistics, torch scatter ops) -> :mod:`.reduction` (UMAP of the region embeddings, fitted
on the memory bank) -> :mod:`.clustering` (KMeans) -> :mod:`.ranking` (scores to an order)
-> :mod:`.strategies` (the registry of strategies that combine them) -> :mod:`.select`
(the round end to end: candidates, budget, the query file).
"""
