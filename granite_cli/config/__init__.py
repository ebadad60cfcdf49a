"""Model configuration: one frozen dataclass for every architecture the core runs.

- model: ModelConfig and its validation (what differs per family is in granite_cli.arch);
- hf: a Hugging Face config.json <-> ModelConfig;
- files: profiles, config.json files and checkpoint folders -> ModelConfig, and config.json out.
"""

from granite_cli.arch import ARCHITECTURES
from granite_cli.config.files import (
                                      MAX_CONFIG_BYTES,
                                      export_hf_config,
                                      from_profile_dict,
                                      load_config,
                                      load_profile_file,
                                      profile_names,
                                      profiles_dir,
                                      read_json_config,
)
from granite_cli.config.hf import from_hf_dict, to_hf_dict
from granite_cli.config.model import MAX_LAYERS, ModelConfig, check_layer_count, validate

__all__ = ["ARCHITECTURES", "MAX_CONFIG_BYTES", "MAX_LAYERS", "ModelConfig", "check_layer_count", "export_hf_config",
           "from_hf_dict", "from_profile_dict", "load_config", "load_profile_file", "profile_names", "profiles_dir",
           "read_json_config", "to_hf_dict", "validate"]
