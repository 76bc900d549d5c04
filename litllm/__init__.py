"""litllm: pretrain, finetune, evaluate, convert and run large language models.

`import litllm` stays light: the model and API load on first use.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["GPT", "Config", "LLM"]

if TYPE_CHECKING:
    from litllm.api import LLM
    from litllm.config import Config
    from litllm.model import GPT


def __getattr__(name: str):
    if name == "Config":
        from litllm.config import Config

        return Config
    if name == "GPT":
        from litllm.model import GPT

        return GPT
    if name == "LLM":
        from litllm.api import LLM

        return LLM
    raise AttributeError(f"module 'litllm' has no attribute {name!r}")
