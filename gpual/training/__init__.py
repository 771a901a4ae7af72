"""Training on a round's sparse labels: :mod:`.loop` (the training step and the epoch loop
of rounds, final retrainings and the full reference), :mod:`.data` (the images with
labelled pixels and their targets) and :mod:`.checkpoints` (what a run writes and reads).
"""
