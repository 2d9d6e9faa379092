"""megatron_longact: LongAct long-context RL post-training on megatron-core."""

__version__ = "0.1.0"
