"""Typed configs (plain data) and the YAML + dotted-override loader."""

from megatron_longact.config.loader import ConfigError, load_config
from megatron_longact.config.schema import JobConfig

__all__ = ["ConfigError", "JobConfig", "load_config"]
