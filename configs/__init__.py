"""Run configuration: the schema (``configs.schema``) and ready-made TOML files beside it."""
from .schema import RunConfig, config_dir, load_config, read_config_values, save_config

__all__ = ["RunConfig", "config_dir", "load_config", "read_config_values", "save_config"]
