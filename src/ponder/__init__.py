"""ponder: train language models to reason with reinforcement learning from verifiable rewards."""

import os

# torch's CPU build runs its thread pool on GNU OpenMP, whose idle threads spin for about 300,000 turns
# before they sleep. Tiny models run thousands of small parallel regions; on shared cores (two busy
# processes on two cores) the spinning threads take the time slices the working ones need: `ponder eval`
# of tiny-base took 51.3 s instead of 11.2 s. Spinning 10,000 turns: 10.4 s alone, 26.3 s shared
# (bench/README.md, "CPU under contention"). Set before torch loads OpenMP; a user's own setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
