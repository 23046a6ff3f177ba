"""Kernels and model-family descriptions shared by the fast engine (ponder.rollout) and the packed training pass
(ponder.rl): the layer below both, so neither reaches into the other."""
