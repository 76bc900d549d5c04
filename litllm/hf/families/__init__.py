"""Every built-in model family, one module each; importing this package registers them all in
`litllm.hf.family.FAMILIES`. A family from elsewhere calls `litllm.hf.family.register` itself (see
`extensions/example_family.py`)."""

from litllm.hf.families import (  # noqa: F401 (imported to register)
    falcon, gemma, gemma2, gemma3, gpt_neox, gpt_oss, granite, llama, llama4, ministral3, mistral, mixtral, olmo2,
    olmo3, olmoe, phi,
    phi3, qwen2, qwen3, qwen3_moe, smollm3, stablelm,
)
from litllm.hf.families import deepseek_v2, deepseek_v3, glm4_moe  # noqa: F401 (MLA, grouped routers)
