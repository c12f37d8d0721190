"""Run configuration: the schema (``configs.schema``) and ready-made TOML files beside it."""
from .schema import RunConfig, load_config, save_config, config_dir

__all__ = ["RunConfig", "load_config", "save_config", "config_dir"]
