"""Sampling: the noise schedule and its update, batched conditionings, and the differentiable
sampler with its gradient window."""
