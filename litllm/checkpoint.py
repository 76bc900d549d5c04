"""Moved to `litllm.model_folder`; these names stay importable from here until every caller is repointed."""

from litllm.model_folder import (  # noqa: F401
    HFWeights, SafetensorsWriter, load_model_weights, model_state_dict, parse_dtype, read_tensor, save_model_weights,
)
