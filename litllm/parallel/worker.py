"""A tensor-parallel worker started by rank 0 (`litllm.parallel.launch.spawn_worker`): join the process group,
receive what to load from rank 0, load this rank's shard, then run rank 0's engine steps until told to exit."""

from litllm.errors import LitLLMError


def main() -> None:
    import os

    from litllm.parallel.launch import die_with_parent
    from litllm.parallel.runtime import load_sharded

    import signal

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process: rank 0 stops the run, then this one
    world = int(os.environ["WORLD_SIZE"])
    device = os.environ.get("LITLLM_TP_DEVICE", "cpu")
    try:
        load_sharded(None, world, 1, device)  # never returns on a worker: rank 0 says what to load
    except LitLLMError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
