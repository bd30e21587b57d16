"""AlignProp core: reward backpropagation through a checkpointed DDIM chain, LoRA only.

Standalone: nothing here imports ComfyUI. Start at `training.trainer.train` (the loop),
`sampling.sampler` (the differentiable chain), `rewards.REWARDS` (the rewards) and `lora`
(LoRA injection and files). The rooms: `sampling/` (schedule, sampler, conditioning), `models/` (the host adapter
and the models behind it), `lora/`, `rewards/`, `training/`, `files/` (output names, loading,
prompt lists), `toy/` (the demo's toy world); `cli`, `config`, `reporting`, `plots` and `run_log`
sit at the top.
"""
__version__ = "0.1.0"
