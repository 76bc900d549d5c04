"""`litllm serve`: load a model folder as `litllm generate` does and serve it over HTTP (OpenAI API)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Optional

from litllm.engine import PREFILL_CHUNK
from litllm.errors import LitLLMError
from litllm.flags import with_flags
from litllm.inference import LoadArgs, load_decoder

# seconds uvicorn still waits, past --shutdown_timeout, for the aborted requests' last bytes to go out
SHUTDOWN_FLUSH_S = 5
# without --max_seq_length, the KV cache may take at most this share of the memory left after loading
KV_MEMORY_SHARE = 0.5


@with_flags("load", LoadArgs)
def serve(
    checkpoint_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 16,
    max_seq_length: Optional[int] = None,
    max_queue: int = 64,
    prefill_chunk: int = PREFILL_CHUNK,
    prefix_caching: bool = False,
    api_key: Optional[str] = None,
    prompt_style: Optional[str] = None,
    max_request_bytes: int = 4 * 2**20,
    read_timeout: float = 30.0,
    shutdown_timeout: float = 20.0,
    model_name: Optional[str] = None,
    compile: Optional[bool] = None,
    draft_model: Optional[Path] = None,
    num_speculative_tokens: int = 4,
    load: dict,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, batching concurrent requests (continuous batching).

    Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

    Args:
        checkpoint_dir: A model folder `litllm generate` takes (converted, merged LoRA or adapter folder);
            its name is the model id clients send.
        host: Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: TCP port (0: any free port; the URL printed once ready tells which).
        max_batch_size: Requests decoded together; each holds one KV-cache slot of max_seq_length positions.
        max_seq_length: Positions per slot (prompt + answer); default: the model's context window, reduced
            (with a note) when the KV cache would not fit in half the free memory.
        max_queue: Requests that may wait for a free slot; beyond that, new ones get 503 with Retry-After.
        prefill_chunk: Prompt tokens prefilled per engine step; a longer prompt is prefilled over several
            steps, so the running requests wait at most one chunk's forward pass between their tokens.
        prefix_caching: Reuse the KV of a prompt's first tokens when a KV-cache slot holds them from an earlier
            request (a shared system prompt is prefilled once); held prefixes use no memory beyond the slots and
            give way to any new request.
        api_key: Require `Authorization: Bearer <api_key>` on /v1 routes (default: the LITLLM_API_KEY
            environment variable; unset: no key needed).
        prompt_style: A prompt style name for chat requests (default: the checkpoint's style or chat template).
        max_request_bytes: Largest request body accepted; a larger one gets 413 (default 4 MiB, far more than any
            prompt that fits a context window).
        read_timeout: Seconds a client has to send a request's headers, and then its body; past them the
            connection is closed (headers) or the request answered 408 (body).
        shutdown_timeout: Seconds in-flight requests get to finish after SIGINT/SIGTERM; then each still
            running ends with a 503 error (a stream: an error event, then `data: [DONE]`).
        model_name: The model id clients send and /v1/models lists (default: the folder's name, or for a
            training run's `final/` folder, the run's: `out/finetune/lora/final` -> `lora`).
        compile: Compile the decode step with `torch.compile` before serving, its kernels cached in
            ~/.cache/litllm/torch_compile (default: yes, unless $LITLLM_COMPILE says 0; false: never); with
            --draft_model on the CPU also the draft's step and the model's check of its proposals.
        draft_model: Speculative decoding: a small converted model folder with the same tokenizer that proposes
            tokens for the model to check, in the steps where every running request decodes plainly (no
            logprobs, no grammar, none waiting); the same output; the acceptance rate is in /metrics.
        num_speculative_tokens: Tokens the draft model proposes per step (with --draft_model).
    """
    from litllm.model_folder import check_model_folder

    _check_flags(max_batch_size=max_batch_size, prefill_chunk=prefill_chunk, max_queue=max_queue,
                 max_seq_length=max_seq_length, max_request_bytes=max_request_bytes, read_timeout=read_timeout,
                 shutdown_timeout=shutdown_timeout, model_name=model_name)
    if draft_model is not None:  # (any several devices: the batched draft runs on one)
        from litllm.generate import check_draft_flags

        draft_model = check_draft_flags(draft_model, num_speculative_tokens, load["devices"] * load["num_nodes"] > 1)
    checkpoint_dir = check_model_folder(checkpoint_dir)
    _check_installed()
    _follow_rank_0_if_worker(checkpoint_dir, prompt_style, load)
    sock = bind_socket(host, port)  # before the slow part: a taken port fails at once
    loaded = load_decoder(checkpoint_dir, prompt_style, LoadArgs(**load))  # as `generate` loads
    engine, max_seq_length = _start_engine(loaded, draft_model, load["precision"], max_batch_size, max_seq_length,
                                           compile, num_speculative_tokens, prefill_chunk=prefill_chunk,
                                           prefix_caching=prefix_caching)
    _serve_engine(engine, loaded, sock, host, model_name or default_model_name(checkpoint_dir), max_seq_length,
                  capacity=max_batch_size + max_queue, api_key=api_key or os.environ.get("LITLLM_API_KEY") or None,
                  max_request_bytes=max_request_bytes, read_timeout=read_timeout, shutdown_timeout=shutdown_timeout)


def _follow_rank_0_if_worker(checkpoint_dir: Path, prompt_style: Optional[str], load: dict) -> None:
    """A tensor-parallel rank > 0 started by torchrun/srun runs rank 0's engine steps and never returns; rank 0
    alone binds the port."""
    from litllm.parallel.launch import is_launched_worker

    if is_launched_worker() and load["devices"] * load["num_nodes"] > 1:
        load_decoder(checkpoint_dir, prompt_style, LoadArgs(**load))


def _serve_engine(engine, loaded, sock, host: str, name: str, max_seq_length: int, *, capacity: int,
                  api_key: Optional[str], max_request_bytes: int, read_timeout: float, shutdown_timeout: float) -> None:
    """Run the HTTP server over `engine` on the bound `sock` until SIGINT/SIGTERM."""
    from litllm.serve.app import ServedModel, build_app
    from litllm.serve.bridge import EngineLoop

    served = ServedModel(
        name=name, tokenizer=loaded.tokenizer, prompt_style=loaded.prompt_style, max_seq_length=max_seq_length,
        completion_stops=loaded.stops(chat=False), chat_stops=loaded.stops(), vocab_size=loaded.model.config.vocab_size,
    )
    bridge = EngineLoop(engine, capacity=capacity)
    app = build_app(served, bridge, api_key, max_request_bytes=max_request_bytes, read_timeout=read_timeout)
    ready_line = (f"Serving {name} at http://{_url_host(host)}:{sock.getsockname()[1]}/v1 "
                  f"({loaded.prompt_style.name} prompt style for chat)")
    _run_uvicorn(app, sock, ready_line, bridge, read_timeout, shutdown_timeout)


def _start_engine(loaded, draft_model: Optional[Path], precision, max_batch_size: int, max_seq_length: Optional[int],
                  compile: Optional[bool], num_speculative_tokens: int, **engine_args):
    """`(engine, max_seq_length)`: the server's engine over the loaded model, compiled where it pays
    (`decode_engine`), or speculating with the draft model when one is given; its KV-cache size said."""
    from litllm.generate import decode_engine, load_draft

    model, tokenizer, threads = loaded.model, loaded.tokenizer, loaded.threads
    draft = draft_model and load_draft(model, tokenizer, draft_model, precision)
    tokenizer.processor = GILFreeEncoder(tokenizer.processor)
    max_seq_length = resolve_max_seq_length(model, max_batch_size, max_seq_length)
    if draft:
        from litllm.speculative import SpeculativeBatchEngine

        from litllm.compile_ledger import should_compile

        # compiled as the draftless server's step is (by default: a long-lived engine): the batched step, and the
        # rounds' draft and verify steps per slot
        engine = SpeculativeBatchEngine(model, draft, tokenizer, max_batch_size, max_seq_length, threads=threads,
                                        num_speculative_tokens=num_speculative_tokens,
                                        compile=should_compile(compile, model.wte.weight.device, None), **engine_args)
    else:
        # compiled steps of fewer rows too: a few clients decode on a step of their rows, not of every slot
        engine = decode_engine(model, tokenizer, max_batch_size, max_seq_length, threads, compile, exact_length=True,
                               row_steps=True, **engine_args)
    _print_kv_cache_size(model, max_batch_size, max_seq_length)
    return engine, max_seq_length


def _check_installed() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LitLLMError(f"litllm serve needs FastAPI and uvicorn ({e}): pip install 'litllm[serve]'") from None


def _print_kv_cache_size(model, max_batch_size: int, max_seq_length: int) -> None:
    per_slot = kv_cache_bytes(model, max_seq_length)
    print(f"KV cache: {max_batch_size} slot(s) x {max_seq_length} positions, {per_slot / 2**20:.1f} MiB per slot,"
          f" {max_batch_size * per_slot / 2**30:.2f} GiB in all", file=sys.stderr)


def _check_flags(*, max_seq_length: Optional[int], read_timeout: float, shutdown_timeout: float,
                 model_name: Optional[str], **at_least: int):
    """One error line for a flag out of range."""
    if model_name is not None and not model_name.strip():
        raise LitLLMError("--model_name must not be empty")
    lowest = {"max_batch_size": 1, "prefill_chunk": 1, "max_queue": 0, "max_request_bytes": 1}
    for flag, value in at_least.items():
        if value < lowest[flag]:
            raise LitLLMError(f"--{flag} must be >= {lowest[flag]}, got {value}")
    if max_seq_length is not None and max_seq_length < 2:
        raise LitLLMError(f"--max_seq_length must be >= 2, got {max_seq_length}")
    for flag, seconds in (("read_timeout", read_timeout), ("shutdown_timeout", shutdown_timeout)):
        if not 0 < seconds < float("inf"):
            raise LitLLMError(f"--{flag} must be a positive number of seconds, got {seconds}")


def _run_uvicorn(app, sock: socket.socket, ready_line: str, bridge, read_timeout: float, shutdown_timeout: float):
    import uvicorn

    from litllm.serve.connection import h11_with_read_timeout

    config = uvicorn.Config(app, log_level="info", lifespan="on", http=h11_with_read_timeout(read_timeout),
                            timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_FLUSH_S)
    server = uvicorn.Server(config)
    # uvicorn catches SIGINT/SIGTERM, shuts down gracefully, then raises the signal again for the
    # previous handler: a no-op handler makes that graceful stop exit with status 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    asyncio.run(_run(server, sock, ready_line, bridge, shutdown_timeout))


def default_model_name(folder: Path) -> str:
    """The model id of a folder: its name, or its parent's for a training run's `final/` (`out/finetune/lora/final` -> `lora`)."""
    folder = folder.resolve()
    return folder.parent.name if folder.name == "final" and folder.parent.name else folder.name


async def _run(server, sock: socket.socket, ready_line: str, bridge, shutdown_timeout: float) -> None:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(ready_line, flush=True)
    cutoff = asyncio.create_task(_abort_after_grace(server, bridge, shutdown_timeout))
    try:
        await serving
    finally:
        cutoff.cancel()


async def _abort_after_grace(server, bridge, shutdown_timeout: float) -> None:
    """Once uvicorn is shutting down, give in-flight requests `shutdown_timeout` s, then abort them: each
    handler answers its error (a stream: an error event and [DONE]) and ends, before uvicorn's own
    deadline (SHUTDOWN_FLUSH_S later) would cancel it mid-body."""
    while not server.should_exit:
        await asyncio.sleep(0.1)
    await asyncio.sleep(shutdown_timeout)
    if bridge.num_in_flight:
        print(f"Aborting {bridge.num_in_flight} request(s) still running after --shutdown_timeout "
              f"{shutdown_timeout:g} s", file=sys.stderr, flush=True)
    bridge.abort_all()


class GILFreeEncoder:
    """A `tokenizers.Tokenizer` whose `encode` lets go of the GIL while it runs (`encode_batch` does, `encode`
    doesn't): the server tokenizes in a worker thread, and a prompt of megabytes (seconds of work) must not
    stall the event loop that serves every other stream. The same ids; everything else passes through."""

    def __init__(self, processor) -> None:
        self._processor = processor

    def encode(self, text: str, add_special_tokens: bool = True):
        return self._processor.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def __getattr__(self, name: str):
        return getattr(self._processor, name)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn listens on it), or one clear error."""
    if not 0 <= port <= 65535:
        raise LitLLMError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise LitLLMError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart needn't wait for TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LitLLMError(f"--port {port}: {host}:{port} is already in use (another server?); "
                              "stop it or pick another --port") from None
        raise LitLLMError(f"--host {host} --port {port}: can't listen there ({e.strerror})") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def kv_cache_bytes(model, positions: int) -> int:
    """Bytes of one KV-cache slot: keys and values of every layer (MLA: its latent and rotary key) for `positions`
    tokens, in the dtype of the model's activations (its embedding's; quantized weights don't change it). The
    first block's config: a tensor-parallel rank's (`--devices`) holds n_query_groups / N heads."""
    values = model.blocks[0].attn.config.kv_cache_values_per_token()
    return values * positions * model.wte.weight.element_size()


def resolve_max_seq_length(model, max_batch_size: int, max_seq_length: Optional[int]) -> int:
    """--max_seq_length, checked against the model; by default the model's window, shrunk (with a note)
    until max_batch_size slots take at most KV_MEMORY_SHARE of the memory left after loading."""
    window = model.config.block_size
    if max_seq_length is not None:
        if max_seq_length > window:
            raise LitLLMError(f"--max_seq_length {max_seq_length} exceeds the model's context window ({window} tokens)")
        return max_seq_length
    budget = KV_MEMORY_SHARE * free_memory(model.wte.weight.device)
    fits = int(budget // max(1, max_batch_size * kv_cache_bytes(model, 1)))
    if fits >= window:
        return window
    length = max(256, fits // 256 * 256) if fits >= 256 else max(2, fits)
    print(f"note: --max_seq_length {length} (not the model's {window}) so that {max_batch_size} KV-cache slots fit "
          f"in memory; set --max_seq_length or --max_batch_size to choose", file=sys.stderr)
    return min(length, window)


def free_memory(device) -> int:
    """Bytes still free for tensors on `device` (CUDA: the driver's count; CPU: MemAvailable)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
