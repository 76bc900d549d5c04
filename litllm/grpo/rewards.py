"""Reward functions of `litllm finetune_grpo --reward ...`: built-in ones and a user's own.

A reward function is called as TRL calls one:

    score(prompts=[...], completions=[...], completion_ids=[...], **record_fields) -> list[float | None]

one entry per completion (B prompts x G completions, the prompt repeated G times). `prompts` hold each record's
prompt as given (a string, or its message list); `completions` the decoded text (for a chat record, TRL's
`[{"role": "assistant", "content": text}]`); every other field of the records arrives as a list of the same
length (`answer=[...]`). `None` means "not scored by this function" (left out of the group statistics).

Built-in: `accuracy` (the record's `answer` against the completion's final answer), `format` (a regex over the
whole completion) and `length` (a soft penalty past a target length in tokens).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from litllm.errors import LitLLMError

DEFAULT_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
BUILTIN = ("accuracy", "format", "length")
_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of TRL's conversational `[{"role", "content"}]`."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def final_answer(text: str) -> Optional[str]:
    """The answer a completion gives: its last `<answer>...</answer>` span, else its last `\\boxed{...}`, else its
    last number (None: no answer)."""
    spans = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if spans:
        return spans[-1].strip()
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(text: str) -> Optional[float]:
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        found = _NUMBER.findall(text)
        return float(found[-1].replace(",", "").replace("$", "")) if len(found) == 1 else None


def answers_match(given: Optional[str], expected: Any) -> bool:
    """Numbers compare numerically (`4`, `4.0`, `$4`, `4.` are equal), anything else as stripped text."""
    if given is None or expected is None:
        return False
    a, b = _as_number(given), _as_number(str(expected))
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return given.strip() == str(expected).strip()


def accuracy(prompts: list, completions: list, answer: Optional[list] = None, **_: Any) -> list[float]:
    """1.0 where the completion's final answer equals the record's `answer`, else 0.0."""
    if answer is None or any(a is None for a in answer):
        raise LitLLMError("the accuracy reward needs an 'answer' field in every record")
    return [float(answers_match(final_answer(completion_text(c)), a)) for c, a in zip(completions, answer)]


def format_reward(pattern: str) -> Callable[..., list[float]]:
    """1.0 where the whole (stripped) completion matches `pattern` (dot matches newlines), else 0.0."""
    regex = re.compile(pattern, flags=re.DOTALL)

    def format(prompts: list, completions: list, **_: Any) -> list[float]:
        return [float(regex.fullmatch(completion_text(c).strip()) is not None) for c in completions]

    return format


def length_reward(target: int) -> Callable[..., list[float]]:
    """0 up to `target` completion tokens, then falling linearly to -1 at twice the target (and staying there)."""

    def length(prompts: list, completions: list, completion_ids: list, **_: Any) -> list[float]:
        return [-min(1.0, max(0, len(ids) - target) / target) for ids in completion_ids]

    return length


@dataclass
class Reward:
    name: str
    """What metrics call it (`rewards/<name>/mean`): the built-in's name, or the user function's `__name__`."""
    spec: str
    """As given to --reward (errors quote it)."""
    fn: Callable[..., Sequence[Any]]
    weight: float = 1.0


def load_function(spec: str) -> Callable:
    """`path/to/file.py:function` or `package.module:function` -> the function."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise LitLLMError(f"--reward {spec}: expected one of {', '.join(BUILTIN)}, or file.py:function / "
                          "package.module:function")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise LitLLMError(f"--reward {spec}: file {path} not found")
        module_spec = importlib.util.spec_from_file_location(f"litllm_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise LitLLMError(f"--reward {spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(source)
        except Exception as e:
            raise LitLLMError(f"--reward {spec}: cannot import {source}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise LitLLMError(f"--reward {spec}: {source} has no function {name!r}")
    return fn


def load_rewards(specs: Sequence[str], weights: Optional[Sequence[float]] = None, format_pattern: str = DEFAULT_FORMAT,
                 length_target: int = 256) -> list[Reward]:
    """The run's rewards from its `--reward` values (and `--reward_weights`, default 1 each)."""
    if not specs:
        raise LitLLMError(f"--reward: give at least one ({', '.join(BUILTIN)}, or file.py:function)")
    if weights is not None and len(weights) != len(specs):
        raise LitLLMError(f"--reward_weights: {len(weights)} weight(s) for {len(specs)} --reward(s)")
    if length_target < 1:
        raise LitLLMError(f"--length_target must be >= 1, got {length_target}")
    try:
        re.compile(format_pattern)
    except re.error as e:
        raise LitLLMError(f"--format_pattern: not a regular expression: {e}") from None
    rewards = []
    for i, spec in enumerate(specs):
        if spec == "accuracy":
            fn = accuracy
        elif spec == "format":
            fn = format_reward(format_pattern)
        elif spec == "length":
            fn = length_reward(length_target)
        else:
            fn = load_function(spec)
        name = spec if spec in BUILTIN else getattr(fn, "__name__", spec)
        rewards.append(Reward(name, spec, fn, 1.0 if weights is None else float(weights[i])))
    return rewards


def score(rewards: Sequence[Reward], prompts: list, completions: list, completion_ids: list[list[int]],
          fields: dict[str, list]) -> torch.Tensor:
    """(N, F) float32 rewards of N completions under F functions (NaN: a function returned None).

    A function that raises, or returns anything but N numbers/None, stops the run with one line naming it."""
    n = len(completions)
    columns = []
    for reward in rewards:
        try:
            values = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **fields)
        except LitLLMError as e:
            raise LitLLMError(f"--reward {reward.spec}: {e}") from None
        except Exception as e:
            raise LitLLMError(f"--reward {reward.spec}: raised {type(e).__name__}: {e}") from None
        try:
            values = list(values)
        except TypeError:
            raise LitLLMError(f"--reward {reward.spec}: returned {type(values).__name__}, expected a list of {n} "
                              "floats") from None
        if len(values) != n:
            raise LitLLMError(f"--reward {reward.spec}: returned {len(values)} values for {n} completions")
        column = []
        for v in values:
            if v is None:
                column.append(float("nan"))
            elif isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
                column.append(float(v))
            else:
                raise LitLLMError(f"--reward {reward.spec}: returned {type(v).__name__} {v!r}, expected a float or None")
        columns.append(column)
    return torch.tensor(columns, dtype=torch.float32).T.reshape(n, len(rewards))
