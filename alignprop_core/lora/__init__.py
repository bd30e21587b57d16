"""LoRA: injection through peft, key names per model family, the safetensors file, shape and value
checks, and mixing."""
