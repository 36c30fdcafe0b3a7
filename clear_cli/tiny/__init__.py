"""The tiny FLUX teacher: procedural scenes (`scenes`), its training (`train`) and its checks (`checks`).

Scene seeds, the one rule for what is held out: everything that trains draws scene seeds below `TRAIN_SEEDS` (the
teacher's batches, and recipes/tiny_prompts.txt, seeds 0-511); held-out scenes start at `HELD_OUT_SEED`, above all
of them. Checks, tiny eval prompts, the demo and the gain script use held-out seeds only (`scenes.held_out_prompts`).
Kept here, free of imports, so that the CLI can show them without loading numpy.
"""

TRAIN_SEEDS = 10**9  # training draws scene seeds in [0, TRAIN_SEEDS)
HELD_OUT_SEED = TRAIN_SEEDS + 7  # the first held-out scene seed (another disjoint set: 2,000,000,000 on)
