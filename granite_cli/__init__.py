"""granite: benchmark, size and convert IBM Granite 4.0 hybrid models.

This module stays light: `granite --help` imports it, so torch is loaded only when a model is.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "load_config"]


def load_model(*args, **kwargs):
    """Build a model from a profile name, a config.json or a checkpoint folder.
    See `granite_cli.model.loading.load_model`."""
    from granite_cli.model.loading import load_model as _load_model

    return _load_model(*args, **kwargs)


def load_config(spec):
    """Resolve a profile name, config.json path or checkpoint folder to a `ModelConfig`."""
    from granite_cli.config import load_config as _load_config

    return _load_config(spec)
