"""AlignProp core: reward backpropagation through a checkpointed DDIM chain, LoRA only.

Standalone: nothing here imports ComfyUI. Start at `trainer.train` (the loop), `sampler` (the
differentiable chain), `rewards.REWARDS` (the rewards) and `lora_io` (LoRA files).
"""
__version__ = "0.1.0"
