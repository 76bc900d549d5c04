"""Fabric setup shared by pretraining and finetuning: devices, strategy, precision, model preparation.

Strategies (`--strategy`):
  auto    one device -> single-device; more -> fsdp
  single  one device, no process group
  ddp     replicate the model, all-reduce gradients
  fsdp    FSDP2 (`torch.distributed.fsdp.fully_shard`) through Fabric's `ModelParallelStrategy`, one
          shard unit per transformer Block plus the root (embedding, final norm, head). It runs on
          GPUs with NCCL and on CPUs with gloo, so the code tested here is the code that runs on nodes.

Multi-node: `--num_nodes N`; under SLURM (`srun`) Fabric reads the rank layout from the environment
and the processes are created by srun, not by Fabric; `--devices`/`--num_nodes` must then match the
allocation (checked here; `config_hub/slurm/litllm.sbatch` fills them). `fabric.print` prints on
global rank 0 only, so a multi-node log reads as one job. Fabric is the standalone `lightning_fabric` package
(pyproject's `lightning-fabric`): `lightning.fabric` would run `lightning/__init__`, which imports
`lightning.pytorch` and so torchmetrics (and scipy, transformers, matplotlib through it): a process that makes a
Fabric took 6.6 CPU-s, 3.3 now (benchmarks/startup.py). Of that, ~1.4 s is torch._dynamo, which Fabric imports at
the top of `lightning_fabric/wrappers.py` (`from torch._dynamo import OptimizedModule`, reached from
`lightning_fabric/__init__` through `fabric.py`), but which a training process pays without Fabric too: torch's
`Optimizer.add_param_group` (wrapped in `torch._disable_dynamo`) imports it when the first optimizer is built, so
hiding it from Fabric (a stand-in `torch._dynamo` module, against Lightning's isinstance checks) would only move
it; Fabric adds ~0.3 s to a process that builds an optimizer (the `optimizer` and `fabric+optimizer` cases). The
import happens here, inside functions: the inference commands never pay it (tests/test_imports.py).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Literal, Optional, Union

import torch
import torch.nn as nn

from litllm.errors import LitLLMError
from litllm.precision import PRECISIONS

Strategy = Literal["auto", "single", "ddp", "fsdp"]


def default_precision(accelerator: str) -> str:
    """bf16 mixed precision on GPUs that support it, fp32 elsewhere (bf16 matmuls are slow on CPUs)."""
    if accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def make_fabric(
    devices: Union[int, str] = "auto",
    num_nodes: int = 1,
    strategy: Strategy = "auto",
    precision: Optional[str] = None,
    accelerator: str = "auto",
    loggers=None,
):
    """A `lightning_fabric.Fabric` for these settings (not launched yet: call `fabric.launch()`)."""
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "gpu":
        accelerator = "cuda"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise LitLLMError("--accelerator cuda: no GPU is visible (check CUDA_VISIBLE_DEVICES)")
    slurm_tasks = slurm_layout()  # under srun: (tasks per node, nodes); the allocation decides
    if devices == "auto":
        devices = slurm_tasks[0] if slurm_tasks else torch.cuda.device_count() if accelerator == "cuda" else 1
    devices = int(devices)
    if slurm_tasks and (devices, num_nodes) != slurm_tasks:
        raise LitLLMError(
            f"--devices {devices} --num_nodes {num_nodes} disagree with the Slurm allocation ({slurm_tasks[0]} tasks "
            f"per node x {slurm_tasks[1]} nodes): under srun, --devices is the tasks per node and --num_nodes the "
            f"node count (config_hub/slurm/litllm.sbatch fills both)"
        )
    if devices < 1 or num_nodes < 1:
        raise LitLLMError(f"--devices and --num_nodes must be >= 1, got {devices} and {num_nodes}")
    if accelerator == "cuda" and devices > torch.cuda.device_count():
        raise LitLLMError(f"--devices {devices}: only {torch.cuda.device_count()} GPU(s) visible")
    if accelerator == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain
    precision = precision or default_precision(accelerator)
    if precision not in PRECISIONS:
        raise LitLLMError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    world_size = devices * num_nodes
    if strategy == "auto":
        strategy = "single" if world_size == 1 else "fsdp"
    if strategy == "single":
        if world_size != 1:
            raise LitLLMError(f"--strategy single runs on one device, not {devices} x {num_nodes} nodes")
        device = torch.device("cuda", 0) if accelerator == "cuda" else torch.device("cpu")
        strat = SingleDeviceStrategy(device=device)
    elif strategy == "ddp":
        strat = DDPStrategy(process_group_backend="nccl" if accelerator == "cuda" else "gloo")
    elif strategy == "fsdp":
        strat = ModelParallelStrategy(
            parallelize_fn=_fsdp_parallelize(precision),
            data_parallel_size=world_size,
            tensor_parallel_size=1,
        )
    else:
        raise LitLLMError(f"--strategy: expected auto, single, ddp or fsdp, got {strategy!r}")
    fabric = Fabric(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strat, precision=precision,
        loggers=loggers,
    )
    fabric.print = functools.partial(print_once, fabric)  # status lines once per job, not once per node
    return fabric


@contextlib.contextmanager
def clear_out_of_memory(where: str) -> Iterator[None]:
    """Out of device (or CPU) memory -> one clear line saying `where` and the knobs that lower memory."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise LitLLMError(
            f"out of memory {where}: lower --train.micro_batch_size or --train.max_seq_length, or use "
            f"--activation_checkpointing, --strategy fsdp on more devices, or --quantize (finetuning)"
        ) from None


def print_once(fabric, *args, **kwargs) -> None:
    """`print` on global rank 0 only (Fabric's own `print` runs on every node's local rank 0)."""
    if fabric.global_rank == 0:
        print(*args, **kwargs)


def slurm_layout() -> Optional[tuple[int, int]]:
    """(tasks per node, nodes) when this process is a Slurm task that Fabric will detect, else None.

    Fabric takes ranks from Slurm's environment when SLURM_NTASKS is set and the job isn't named
    `bash` or `interactive`. `srun -n N` without --ntasks-per-node leaves SLURM_NTASKS_PER_NODE
    unset (Lightning then raises): with the same count on every node it is derived and set here.
    """
    import os

    env = os.environ
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    tasks = int(env["SLURM_NTASKS"])
    nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    if per_node is None:
        if tasks % nodes:
            raise LitLLMError(
                f"Slurm started {tasks} tasks on {nodes} nodes, not the same number on each: "
                f"use srun/sbatch --ntasks-per-node"
            )
        per_node = str(tasks // nodes)
        env["SLURM_NTASKS_PER_NODE"] = per_node
    if not per_node.isdigit():
        raise LitLLMError(f"SLURM_NTASKS_PER_NODE={per_node!r}: expected one number (use --ntasks-per-node)")
    return int(per_node), nodes


def uses_fsdp(fabric) -> bool:
    from lightning_fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


@contextlib.contextmanager
def whole_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Within: every FSDP2 unit of `module` holds its whole parameters (one all-gather each, on every rank at
    once), and forwards neither gather nor reshard, so each rank may run a different number of forwards (a
    rank's own decoding) without collectives. After: resharded, with each unit's own resharding rule back.
    A module without FSDP2 units is left as it is."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]  # the root first
    if units:
        # decoding calls the blocks, not the root's forward: make the root the root before a block's hook would
        # (FSDP2 crowns the first unit that runs forward; it has no public call for this)
        units[0]._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield module
    finally:
        for unit in units:
            # `_fsdp_parallelize`'s (FSDP2's default) rule: the blocks reshard after forward, the root keeps its
            # weights gathered (backward needs them first)
            unit.set_reshard_after_forward(unit is not units[0], recurse=False)
            unit.reshard()


def _fsdp_parallelize(precision: str):
    def parallelize(model: nn.Module, device_mesh) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = device_mesh["data_parallel"]
        kwargs = {"mesh": mesh}
        if precision == "bf16-mixed":
            # all-gather and compute in bf16, reduce gradients in fp32 (the optimizer keeps fp32 weights)
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # packed integer weights (a bitsandbytes-quantized frozen base, QLoRA) can't be sharded as
        # DTensors: every rank keeps them whole, FSDP shards everything else
        packed = {p for p in model.parameters() if not p.is_floating_point()}
        if packed:
            kwargs["ignored_params"] = packed
        for block in model.blocks:  # one shard unit per transformer block
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            device = _local_device(mesh)
            if device.type == "cuda":  # DTensor's RNG tracker gives every shard its own slice of the stream
                materialize(model, device)
            else:  # on CPU meshes each rank draws locally: offset the seed so shards differ
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(torch.initial_seed() + mesh.get_local_rank())
                    materialize(model, device)
        return model

    return parallelize


def _local_device(mesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device model on `device` and initialise it.

    Modules added by a method (LoRA, adapters) initialise themselves (`reset_parameters()`, children
    first); the GPT's own `reset_parameters()` then gives the GPT-NeoX/TinyLlama init to its layers.
    """
    model.to_empty(device=device)
    root_reset = getattr(model, "reset_parameters", None)
    for module in reversed(list(model.modules())):
        if module is model or isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            continue  # the root's reset covers these
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    if callable(root_reset):
        root_reset()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's wrapper (sharded in place under FSDP2)."""
    from lightning_fabric.wrappers import _unwrap_objects

    return _unwrap_objects(model)


def clean_name(name: str) -> str:
    """A parameter's name as its state dict spells it (without wrapper prefixes)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_forward_module.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name
