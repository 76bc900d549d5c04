"""Inference on more than one device: tensor parallelism (`--devices N`, `plan`, `loading`, `runtime`,
`launch`) and layer-sequential placement (`--strategy sequential`, `plan.layer_placement`)."""

from litllm.errors import LitLLMError


def load_sharded(checkpoint_dir, devices: int, num_nodes: int = 1, device=None, precision=None, quantize=None):
    """See `litllm.parallel.runtime.load_sharded`; checks the counts first."""
    if devices < 1 or num_nodes < 1:
        raise LitLLMError(f"--devices and --num_nodes must be >= 1, got --devices {devices} --num_nodes {num_nodes}")
    from litllm.parallel.runtime import load_sharded as load

    return load(checkpoint_dir, devices, num_nodes, device, precision, quantize)
