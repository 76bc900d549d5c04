"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus-client writes it).

    litllm_requests_running / litllm_requests_waiting     gauges: engine requests in KV-cache rows / queued
    litllm_kv_cache_usage_ratio                            gauge: the KV cache's positions that requests hold
    litllm_prompt_tokens_total                             counter: each API request's prompts (once, whatever n)
    litllm_generation_tokens_total                         counter: tokens generated (every choice)
    litllm_requests_total{finish_reason}                   counter: engine requests finished (stop, length, abort)
    litllm_time_to_first_token_seconds                     histogram: submit -> first token
    litllm_time_per_output_token_seconds                   histogram: per request, (last - first token) / (n - 1)
    litllm_spec_decode_draft_tokens / _acceptance_ratio    gauges (--draft_model): draft tokens proposed / accepted share
    litllm_decode_steps{rows}                              gauge: decode steps run over the first `rows` KV-cache rows

The bridge calls `submitted` on the event loop and `dispatched` from the engine thread (under its lock);
the gauges are read from the engine when scraped.
"""

from __future__ import annotations

import time

from litllm.errors import LitLLMError

# seconds; TTFT spans queueing too (long), a token's time is short
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, engine) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as e:
            raise LitLLMError(f"litllm serve needs prometheus-client for /metrics ({e}): "
                              "pip install 'litllm[serve]'") from None
        self.registry = registry = CollectorRegistry()  # this server's own (never the process-global one)
        Gauge("litllm_requests_running", "Engine requests in KV-cache rows", registry=registry).set_function(
            lambda: engine.num_running)
        Gauge("litllm_requests_waiting", "Engine requests queued for a KV-cache row", registry=registry).set_function(
            lambda: engine.num_waiting)
        Gauge("litllm_kv_cache_usage_ratio", "Fraction of the KV cache's positions held by requests",
              registry=registry).set_function(lambda: engine.kv_cache_usage)
        Gauge("litllm_prefix_cache_hit_ratio", "Fraction of the prompt tokens admitted whose KV was reused from the "
              "prefix cache (serve --prefix_caching)", registry=registry).set_function(
            lambda: engine.prefix_hits / max(engine.prefix_queries, 1))
        if hasattr(engine, "proposed"):  # serve --draft_model
            Gauge("litllm_spec_decode_draft_tokens", "Tokens the draft model proposed (serve --draft_model)",
                  registry=registry).set_function(lambda: engine.proposed)
            Gauge("litllm_spec_decode_acceptance_ratio", "Fraction of the draft model's proposed tokens the model "
                  "accepted", registry=registry).set_function(lambda: engine.accepted / max(engine.proposed, 1))
        decode_steps = Gauge("litllm_decode_steps", "Decode steps run, by the KV-cache rows each decoded (a step over "
                             "the first rows, where every running request lies)", ["rows"], registry=registry)
        for rows in engine.step_rows:
            decode_steps.labels(rows=str(rows)).set_function(lambda rows=rows: engine.decode_steps.get(rows, 0))
        self.prompt_tokens = Counter("litllm_prompt_tokens", "Prompt tokens of the requests accepted (each prompt "
                                     "once, whatever n)", registry=registry)
        self.generation_tokens = Counter("litllm_generation_tokens", "Tokens generated", registry=registry)
        self.finished = Counter("litllm_requests", "Engine requests finished", ["finish_reason"], registry=registry)
        self.ttft = Histogram("litllm_time_to_first_token_seconds", "Time from a request's arrival to its first "
                              "token", buckets=TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram("litllm_time_per_output_token_seconds", "Per request, the time between its tokens "
                              "after the first", buckets=TPOT_BUCKETS, registry=registry)
        self._arrived: dict[int, float] = {}
        self._first: dict[int, float] = {}

    def submitted(self, request_ids: list[int], requests: list) -> None:
        now = time.perf_counter()
        self._arrived.update(dict.fromkeys(request_ids, now))
        self.prompt_tokens.inc(sum(len(ids) for ids in {tuple(r.prompt_ids) for r in requests}))

    def dispatched(self, out) -> None:
        """One engine Output (its request's queue has it)."""
        now = time.perf_counter()
        if out.token_ids:
            self.generation_tokens.inc(len(out.token_ids))
            if out.request_id not in self._first:
                self._first[out.request_id] = now
                self.ttft.observe(now - self._arrived.get(out.request_id, now))
        if out.finished:
            self.finished.labels(finish_reason=out.finish_reason or "error").inc()
            first = self._first.pop(out.request_id, None)
            self._arrived.pop(out.request_id, None)
            if first is not None and out.completion_tokens > 1:
                self.tpot.observe((now - first) / (out.completion_tokens - 1))

    def failed(self, request_id: int) -> None:
        self.finished.labels(finish_reason="error").inc()
        self._arrived.pop(request_id, None)
        self._first.pop(request_id, None)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
