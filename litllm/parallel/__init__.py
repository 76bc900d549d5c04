"""Inference on more than one device: tensor parallelism (`--devices N`: `plan`, `loading`, `runtime`, `launch`)
and layer-sequential placement (`--strategy sequential`: `sequential`)."""

from litllm.errors import LitLLMError

STRATEGIES = ("tensor", "sequential")


def uses_devices(devices: int, num_nodes: int) -> bool:
    """Whether the load flags ask for more than one device (or are out of range: `load_on_devices` says so)."""
    return devices * num_nodes != 1


def load_on_devices(checkpoint_dir, devices: int, num_nodes: int, strategy: str, device: str, dtype,
                    quantize=None):
    """The model on `devices` devices per node x `num_nodes` nodes (`device`: their kind, `dtype`: the weights'):
    (model, threads for the Engine). Tensor parallelism (`runtime.load_sharded`; a worker rank never returns) or
    sequential placement. `litllm.inference.LoadArgs.for_decoding` calls it with the resolved flags."""
    if devices < 1 or num_nodes < 1:
        raise LitLLMError(f"--devices and --num_nodes must be >= 1, got --devices {devices} --num_nodes {num_nodes}")
    if strategy not in STRATEGIES:
        raise LitLLMError(f"--strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "sequential":
        import torch

        from litllm.parallel.sequential import load_sequential

        if num_nodes > 1 or quantize is not None:
            raise LitLLMError("--strategy sequential runs in one process on one machine, without --quantize: "
                              "drop --num_nodes/--quantize or use --strategy tensor")
        return load_sequential(checkpoint_dir, devices, device, dtype), torch.get_num_threads()
    from litllm.parallel.runtime import load_sharded

    return load_sharded(checkpoint_dir, devices, num_nodes, device, dtype, quantize)
