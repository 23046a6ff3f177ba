"""ponder: train language models to reason with reinforcement learning from verifiable rewards."""

__version__ = "0.1.0"
