"""Reinforcement learning from verifiable rewards: advantages, losses and the GRPO trainer."""
