"""`litllm serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Split as vLLM splits it: the HTTP layer knows nothing about batching, the engine
(`litllm/engine.py`) knows nothing about HTTP.

- `protocol.py`: OpenAI request fields -> validated parameters (400s that name the field), and the
  response / streaming-chunk bodies. Plain Python, no web framework.
- `bridge.py`: one background thread loops `engine.step()` and hands each request's Outputs to its
  own asyncio queue; aborts and a bounded queue (503 + Retry-After when full).
- `app.py`: the FastAPI routes (`/health`, `/v1/models`, `/v1/completions`, `/v1/chat/completions`),
  API-key check, OpenAI-style error bodies, server-sent events.
- `server.py`: the `litllm serve` command: load the model as `generate` does, bind the port, run uvicorn;
  past `--shutdown_timeout`, abort what is still in flight so each stream ends with an error event.
- `connection.py`: uvicorn's h11 protocol with a clock on request headers (slow or silent clients).

FastAPI and uvicorn are imported inside functions (the `serve` extra), so `litllm --help` stays fast.
"""
