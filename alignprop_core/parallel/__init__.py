"""Data-parallel training on torch.distributed: which rows of a global batch a rank draws
(`shard`), and the process group with the few collectives the trainer needs (`world`)."""
from .shard import Shard
from .world import DistConfig, RankLost, World, init_world, single_process

__all__ = ["DistConfig", "RankLost", "Shard", "World", "init_world", "single_process"]
