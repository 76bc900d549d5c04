"""One engine, N processes: rank 0 owns the requests, every rank runs the same engine step on its shard.

Rank 0 (the command: `generate`, `chat`, the HTTP server, `LLM`, `evaluate`) decodes with a
`ShardedEngine`, an `Engine` whose `add`/`abort` are queued and whose `step()` first broadcasts them to
the other ranks; each worker (`follow`) applies the same calls to its own `ShardedEngine` and steps too,
so all engines hold the same requests in the same rows and call the model's collectives in the same order.
The token each row picks is broadcast from rank 0 (one small tensor per step): sampling, seeded or not,
gives the same token on every rank. Model calls outside an engine (lm-eval's scoring, perplexity) are
broadcast one forward at a time. A decode step with no request added or aborted thus costs two small broadcasts
(the step, its tokens: `Channel.send`); besides them the only communication is the model's own all-reduces and
logit gather (`litllm.parallel.layers`). An engine made with `compile=True` is made so on every rank (its arguments
are broadcast): each rank compiles its own decode step, collectives inside (`litllm.compile_decode`), after laying
its shard's weights out as one device's are (`_load_rank`); on the CPU it is saved, and a later run's ranks each
load theirs in milliseconds. The ranks done first wait for the others at the process group's store
(`Channel.wait_for_peers`): compiles finish minutes apart under load, longer than a collective waits.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from litllm.engine import Engine, RequestError
from litllm.errors import LitLLMError

HEARTBEAT_S = 5.0  # rank 0 says "still here" this often while idle (the workers' wait has a timeout)


class Channel:
    """Rank 0's broadcasts to the other ranks. One lock: a broadcast and the engine step (or forward) it
    announces run together, so every rank sees the same sequence of collectives."""

    def __init__(self, ranks) -> None:
        self.ranks = ranks
        self.lock = threading.RLock()
        self.last = time.monotonic()
        self.closed = False
        self.local = threading.local()  # .announced: this thread runs a step/forward the workers run too

    @property
    def is_driver(self) -> bool:
        return self.ranks.rank == 0

    def send(self, message) -> None:
        """Every message starts with one small broadcast: a plain decode step (no requests added or aborted) is
        only that, its engine's key; anything else is -1 there, then the pickled message."""
        import torch.distributed as dist

        plain_step = message[0] == "step" and not message[2]
        dist.broadcast(self._header(message[1] if plain_step else -1), src=0)
        if not plain_step:
            dist.broadcast_object_list([_to_cpu(message)], src=0)
        self.last = time.monotonic()

    def recv(self):
        import torch.distributed as dist

        header = self._header(0)
        dist.broadcast(header, src=0)
        if (key := int(header)) >= 0:
            return ("step", key, [])
        box = [None]
        dist.broadcast_object_list(box, src=0)
        return _to_device(box[0], self.ranks.device)

    def _header(self, value: int) -> torch.Tensor:
        return torch.tensor([value], dtype=torch.long, device=self.ranks.device)

    def tokens(self, values: list[int]) -> list[int]:
        """Rank 0's `values` on every rank (the tokens a step picked)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.long)
        if self.ranks.device != "cpu":
            t = t.to(self.ranks.device)
        dist.broadcast(t, src=0)
        return t.tolist()

    @contextlib.contextmanager
    def fatal_on_lost_rank(self):
        """Rank 0: a broadcast or collective that fails because a rank is gone ends the run with one line (the
        process group can't be used again); any other error is raised as usual."""
        try:
            yield
        except Exception as e:
            if self.is_driver and _lost_a_rank(e, self.ranks):
                self.fail(e)
            raise

    def fail(self, error: Exception) -> None:
        from litllm.parallel.launch import fatal

        self.closed = True
        deadline = time.monotonic() + 2.0  # the connection broke: the kernel may not have reported the exit yet
        while not (dead := [(r, c) for r, c in enumerate(self.ranks.children, start=1) if c.poll() is not None]) \
                and self.ranks.children and time.monotonic() < deadline:
            time.sleep(0.1)
        if dead:
            r, child = dead[0]
            fatal(self.ranks, f"tensor-parallel rank {r} (pid {child.pid}) exited with code {child.returncode}")
        fatal(self.ranks, f"tensor-parallel rank 0 lost a peer ({_first_line(error)})")

    def wait_for_peers(self, name: str) -> None:
        """Wait (up to `litllm.parallel.launch.COMPILE_WAIT_S`) until every rank has reached the point called `name`:
        at the process group's store, not in a collective, whose timeout (`LITLLM_TP_TIMEOUT`) a rank still compiling
        its step would pass. The ranks then leave together, so the next broadcast or collective finds them all."""
        import torch.distributed as dist
        from datetime import timedelta

        from litllm.parallel.launch import COMPILE_WAIT_S

        store = dist.distributed_c10d._get_default_store()
        prefix = f"litllm/{name}/"
        store.set(f"{prefix}{self.ranks.rank}", "1")
        store.wait([f"{prefix}{r}" for r in range(self.ranks.world_size)], timedelta(seconds=COMPILE_WAIT_S))
        self.last = time.monotonic()  # (rank 0: the heartbeat counts its idle time from here)

    def start_heartbeat(self) -> None:
        def beat():
            while not self.closed:
                time.sleep(HEARTBEAT_S / 5)
                if time.monotonic() - self.last > HEARTBEAT_S and self.lock.acquire(blocking=False):
                    try:
                        if not self.closed:
                            self.send(("noop",))
                    except Exception:
                        return  # the run is ending; the watchdog or the next call reports why
                    finally:
                        self.lock.release()

        threading.Thread(target=beat, name="litllm-tp-heartbeat", daemon=True).start()

    def close(self) -> None:
        """Rank 0 at exit: tell the workers to leave, wait for the ones it started."""
        from litllm.parallel.launch import stop_children

        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.ranks.stopping = True
            try:
                self.send(("exit",))
            except Exception:
                pass
        stop_children(self.ranks, wait_s=10)
        _destroy()


def _first_line(error: Exception, limit: int = 160) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"


def _lost_a_rank(error: Exception, ranks) -> bool:
    """Did `error` come from a rank that is gone (a dead worker, a broken connection, a collective's timeout)?"""
    errors = list(getattr(error, "errors", {}).values()) + [error]  # RequestError: the failures it collected
    for e in errors:
        text = str(e).lower()
        if isinstance(e, getattr(torch.distributed, "DistError", ())) or any(
                word in text for word in ("gloo", "nccl", "connection", "timed out", "broken pipe")):
            return True
    deadline = time.monotonic() + 2.0  # a worker that just died: give the kernel time to report it
    while ranks.children and time.monotonic() < deadline:
        if any(child.poll() is not None for child in ranks.children):
            return True
        time.sleep(0.1)
    return False


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _to_device(obj, device: str):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _reduce_grammar(grammar):
    """Pickle a compiled grammar (`litllm.constrain.Grammar`, a request's `response_format`) for the workers: as
    xgrammar's own JSON of it and of its tokenizer info."""
    compiled = grammar._compiled
    return _rebuild_grammar, (compiled.serialize_json(), compiled.tokenizer_info.serialize_json())


_tokenizer_infos: dict[int, object] = {}  # a worker deserializes its tokenizer's info once


def _rebuild_grammar(compiled_json: str, info_json: str):
    import xgrammar as xgr

    from litllm.constrain import Grammar

    key = hash(info_json)
    if key not in _tokenizer_infos:
        _tokenizer_infos[key] = xgr.TokenizerInfo.deserialize_json(info_json)
    return Grammar(xgr, xgr.CompiledGrammar.deserialize_json(compiled_json, _tokenizer_infos[key]))


def _register_reducers() -> None:
    import copyreg

    from litllm.constrain import Grammar

    copyreg.pickle(Grammar, _reduce_grammar)


# ---------------------------------------------------------------------- the engine
class ShardedEngine(Engine):
    """An `Engine` over a tensor-parallel model, on every rank. On rank 0 `add`/`add_many`/`abort` queue the
    calls (ids are given at once, the same every engine gives) and `step()` broadcasts them, then steps."""

    _keys = itertools.count()

    def __init__(self, model, tokenizer, *args, channel: Optional[Channel] = None, key: Optional[int] = None,
                 **kwargs) -> None:
        self.channel = channel or model.tp_channel
        self.key = next(self._keys) if key is None else key
        # rank 0 holds the lock until every rank has its step: no heartbeat reaches a rank still compiling
        with self.channel.lock if self.channel.is_driver else contextlib.nullcontext():
            if self.channel.is_driver:
                with self.channel.fatal_on_lost_rank():
                    self.channel.send(("engine", self.key, args, kwargs))
            try:  # compile=True: each rank compiles (or loads) its own step
                super().__init__(model, tokenizer, *args, **kwargs)
            finally:  # ranks that compile finish minutes apart under load: the first ones wait here (one whose build
                if kwargs.get("compile"):  # failed too: then the others go on to hear rank 0 end the run)
                    with self.channel.fatal_on_lost_rank():
                        self.channel.wait_for_peers(f"engine {self.key} compiled")
        choices = getattr(model, "decode_choices", None)
        if self._compiled and choices is not None:  # this rank's layout, so that its next load finds the saved step
            from litllm.compile_ledger import record_decode_choices

            record_decode_choices(choices["key"], choices["layout"], choices["threads"])
        if self.channel.is_driver and not getattr(model, "tp_kv_said", False):  # said once: LLM makes one per call
            model.tp_kv_said = True
            say_memory(model, model.tp_size, "kv_cache")
        self._calls: list[tuple] = []  # rank 0: add_many / abort calls since the last step
        self._given = 0  # rank 0: the ids handed out

    def add_many(self, requests) -> list[int]:
        if not self.channel.is_driver:
            return super().add_many(requests)
        for request in requests:
            self._check(request)
        with self._lock:
            ids = list(range(self._given, self._given + len(requests)))
            self._given += len(requests)
            self._calls.append(("add", list(requests)))
        return ids

    def abort(self, request_id: int) -> None:
        if not self.channel.is_driver:
            return super().abort(request_id)
        with self._lock:
            self._calls.append(("abort", request_id))

    @property
    def has_unfinished(self) -> bool:
        return bool(self._calls) or super().has_unfinished

    @property
    def num_waiting(self) -> int:
        return super().num_waiting + sum(len(c[1]) for c in list(self._calls) if c[0] == "add")

    def apply(self, calls: list[tuple]) -> None:
        for kind, arg in calls:
            if kind == "add":
                super().add_many(arg)
            else:
                super().abort(arg)

    def step(self):
        if not self.channel.is_driver:
            return super().step()
        with self.channel.lock, interrupts_after(), self.channel.fatal_on_lost_rank():
            with self._lock:
                calls, self._calls = self._calls, []
            self.channel.send(("step", self.key, calls))
            self.apply(calls)
            self.channel.local.announced = True
            try:
                return super().step()
            finally:
                self.channel.local.announced = False

    def _pick(self, logits, running) -> list[int]:
        tokens = self.channel.tokens(super()._pick(logits, running))  # rank 0's picks everywhere
        self._tokens.copy_(torch.tensor(tokens, device=self._tokens.device)[:, None])
        return tokens

    def _sample(self, logits, row) -> int:
        return self.channel.tokens([super()._sample(logits, row)])[0]

    def close(self) -> None:
        if self.channel.is_driver and not self.channel.closed:
            with self.channel.lock:
                self.channel.send(("close", self.key))
        super().close()


@contextlib.contextmanager
def interrupts_after():
    """Hold Ctrl-C (in the main thread) until the block ends, then raise it: a step that every rank runs must not
    stop half-way on rank 0 (`chat` stops an answer with Ctrl-C, then aborts it at the next step)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def driving_forward(model, channel: Channel):
    """Rank 0's `model.forward`: outside an engine step, each call is first broadcast for the workers to run too."""
    forward = model.forward

    def call(*args, **kwargs):
        if getattr(channel.local, "announced", False):
            return forward(*args, **kwargs)  # inside an engine step the workers run too
        with channel.lock, channel.fatal_on_lost_rank():
            channel.send(("forward", args, kwargs))
            return forward(*args, **kwargs)

    return call


# ---------------------------------------------------------------------- the workers
def follow(channel: Channel, model, tokenizer) -> None:
    """A worker's life: run what rank 0 broadcasts until it says exit (or is gone: one line, exit 1)."""
    engines: dict[int, ShardedEngine] = {}
    while True:
        try:
            message = channel.recv()
        except Exception as e:
            _lost(channel, e)
        kind = message[0]
        try:
            if kind == "exit":
                return
            if kind == "engine":
                _, key, args, kwargs = message
                engines[key] = ShardedEngine(model, tokenizer, *args, channel=channel, key=key, **kwargs)
            elif kind == "step":
                _, key, calls = message
                engines[key].apply(calls)
                try:
                    engines[key].step()
                except RequestError:
                    pass  # rank 0 reports it
            elif kind == "close":
                engines.pop(message[1]).close()
            elif kind == "forward":
                with torch.inference_mode():
                    model(*message[1], **message[2])
        except Exception as e:
            _lost(channel, e)


def _lost(channel: Channel, error: Exception) -> None:
    print(f"error: tensor-parallel rank {channel.ranks.rank}: lost touch with rank 0 or a peer "
          f"({_first_line(error)}); exiting", file=sys.stderr, flush=True)
    os._exit(1)


# ---------------------------------------------------------------------- loading
def load_sharded(checkpoint_dir: Optional[Path], devices: int, num_nodes: int, device: str,
                 dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None):
    """Start (or join) the N ranks and load this rank's shard: on rank 0 (given the folder and the dtype) returns
    (model, threads), a model whose engines and forwards drive the others; a worker (checkpoint_dir None: rank 0
    says what to load) runs `follow` and exits the process."""
    from litllm.parallel.launch import start

    if quantize is not None:
        # bitsandbytes' weights are packed flat blocks that can't split by rows or columns; torchao's per-row int8 and
        # per-group int4 could, but the sharded loader does not quantize its shards yet
        why = ("bitsandbytes' quantized weights (packed flat blocks with their own scales) do not split that way"
               if quantize.startswith("bnb.") else "the shards are not quantized yet")
        raise LitLLMError(f"--quantize {quantize} with --devices {devices}: tensor parallelism splits each weight by "
                          f"rows or columns, and {why}; drop --quantize (each of the "
                          f"{devices} devices then holds 1/{devices} of the 16-bit weights) or use --devices 1")
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        raise LitLLMError(f"--devices {devices}: tensor parallelism runs on cpu (gloo) or cuda (nccl), not {device}")
    if checkpoint_dir is not None:  # rank 0 or a launcher's process: refuse what can't shard before starting any
        check_shardable(Path(checkpoint_dir), devices * num_nodes)
    ranks = start(devices, num_nodes, device_type)
    _register_reducers()
    channel = Channel(ranks)
    if channel.is_driver:
        channel.send(("load", str(checkpoint_dir), dtype))
    else:  # what rank 0 loads (under torchrun every rank was given it; spawned workers were not)
        _, checkpoint_dir, dtype = channel.recv()
    return _load_rank(channel, Path(checkpoint_dir), dtype, devices * num_nodes)


def check_shardable(checkpoint_dir: Path, n: int) -> None:
    from litllm.adapter import read_adapter_settings
    from litllm.config import Config
    from litllm.model_folder import check_model_folder
    from litllm.parallel.plan import check_divisible

    checkpoint_dir = check_model_folder(checkpoint_dir)
    if read_adapter_settings(checkpoint_dir) is not None:
        raise LitLLMError(f"--devices {n}: {checkpoint_dir} is an adapter model (adapter.yaml), which tensor "
                          f"parallelism does not shard: merge it or run it on one device")
    check_divisible(Config.from_checkpoint(checkpoint_dir), n)


def say_memory(model, n: int, what: str = "weights") -> None:
    """One line on stderr: what this rank (every rank holds the same) keeps of the model, or of its KV cache."""
    from litllm.parallel.plan import local_bytes

    held = local_bytes(model)
    if what == "weights":
        line = (f"Tensor parallel over {n} ranks: each holds {size_text(held['weights'])} of weights "
                f"({size_text(held['replicated'])} of them replicated: norms, router, unsplit parts)")
    else:
        line = f"Tensor parallel over {n} ranks: each holds a {size_text(held['kv_cache'])} KV cache"
    print(line, file=sys.stderr, flush=True)


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _load_rank(channel: Channel, checkpoint_dir: Path, dtype: torch.dtype, n: int):
    from litllm.compile_ledger import choose_decode_layout
    from litllm.parallel.loading import load_shard

    ranks = channel.ranks
    if ranks.device == "cpu":  # the ranks on this machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", n))))
    try:
        model = load_shard(checkpoint_dir, ranks.rank, n, ranks.device, dtype)
    except LitLLMError:
        if channel.is_driver:
            raise  # the command prints it; the workers leave when it exits
        os._exit(1)
    if ranks.device == "cpu":  # each rank lays its shard out as one device's model is (timed or as recorded)
        choose_decode_layout(model, None)  # threads: the rank's share of the cores, set above
    model.tp_channel = channel
    if not channel.is_driver:
        from litllm.tokenizer import Tokenizer

        follow(channel, model, Tokenizer(checkpoint_dir))
        _destroy()
        sys.exit(0)
    model.engine_class = ShardedEngine
    say_memory(model, n)
    model.forward = driving_forward(model, channel)
    atexit.register(channel.close)
    channel.start_heartbeat()
    return model, torch.get_num_threads()

