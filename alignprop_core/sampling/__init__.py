"""Sampling: the noise schedule and its update, batched conditionings, and the differentiable
sampler with its gradient window; `flow_schedule.py` holds the rectified-flow
(SD3/FLUX) noise levels and Euler step."""
