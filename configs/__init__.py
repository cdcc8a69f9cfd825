"""Experiment configs: one `get_config(arg=None) -> ConfigDict` per module."""
