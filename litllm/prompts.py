"""Prompt styles: how an instruction or a chat is laid out as text before tokenization.

Every style is a Jinja chat template over `messages` (the format Hugging Face checkpoints ship in
`tokenizer_config.json`), rendered by one function that reproduces `transformers`'
`apply_chat_template` (same sandboxed environment, options, filters and globals). Built-in styles
are templates written here; `PromptStyle.from_checkpoint` uses a checkpoint's own template when it
has one. Built-in templates leave out the leading BOS token (the tokenizer adds it); a checkpoint's
template writes its BOS itself, so its prompts are encoded without adding another (`style.encode`).

    style = PromptStyle.from_name("alpaca")
    style.apply("Name three colors.")                       # single-turn instruction
    style.apply("Summarize.", input="Some long text...")    # Alpaca's instruction + input
    style.render_messages([{"role": "user", "content": "Hi"}])  # multi-turn chat
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import yaml

from litllm.errors import LitLLMError
from litllm.model_folder import PROMPT_STYLE_FILE
from litllm.utils import read_json_object

if TYPE_CHECKING:
    import torch

    from litllm.tokenizer import Tokenizer



# ---------------------------------------------------------------------- built-in templates
# Each is a chat template in the Hugging Face convention. Written as one `{{ ... }}` expression per
# piece so that no template whitespace leaks into the text; '\n' inside Jinja literals is a newline.
def _first_user_folds_system(user: str, assistant: str, generation: str, joiner: str = "\n\n") -> str:
    """A template for formats without a system role: the system prompt is prepended to the first user turn."""
    return (
        "{%- set ns = namespace(system='') -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- set content = m['content'] -%}"
        "{%- if loop.first and ns.system -%}{%- set content = ns.system + '" + joiner + "' + content -%}{%- endif -%}"
        "{%- if m['role'] == 'user' -%}{{ " + user + " }}"
        "{%- else -%}{{ " + assistant + " }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + generation + " }}{%- endif -%}"
    )


def _per_role(turn: str, generation: str, default_system: Optional[str] = None) -> str:
    """A template where every message, system included, is `turn` (an expression over `role`, `content`)."""
    prologue = ""
    if default_system is not None:
        prologue = (
            "{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{%- set role = 'system' -%}{%- set content = " + json.dumps(default_system) + " -%}{{ " + turn + " }}"
            "{%- endif -%}"
        )
    return (
        prologue
        + "{%- for m in messages -%}{%- set role = m['role'] -%}{%- set content = m['content'] -%}{{ " + turn + " }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + generation + " }}{%- endif -%}"
    )


ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

_ALPACA = (
    "{%- set ns = namespace(system=none) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if loop.first -%}"
    "{%- if ns.system is none -%}{%- set ns.system = " + json.dumps(ALPACA_SYSTEM_WITH_INPUT) + " if m.get('input') else "
    + json.dumps(ALPACA_SYSTEM) + " -%}{%- endif -%}"
    "{{ ns.system + '\n\n' }}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{%- if m.get('input') -%}{{ '### Input:\n' + m['input'] + '\n\n' }}{%- endif -%}"
    "{{ '### Response:\n' }}"
    "{%- else -%}{{ m['content'] + '\n\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

_LLAMA2 = (
    "{%- set ns = namespace(system='') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if not loop.first -%}{{ '<s>' }}{%- endif -%}"
    "{%- if loop.first and ns.system -%}"
    "{{ '[INST] <<SYS>>\n' + ns.system + '\n<</SYS>>\n\n' + m['content'] | trim + ' [/INST]' }}"
    "{%- else -%}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}{%- endif -%}"
    "{%- else -%}{{ ' ' + m['content'] | trim + ' </s>' }}{%- endif -%}"
    "{%- endfor -%}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    # plain text: messages joined by newlines, nothing added (base models)
    "default": "{%- for m in messages -%}{%- if not loop.first -%}{{ '\n' }}{%- endif -%}{{ m['content'] }}{%- endfor -%}",
    "alpaca": _ALPACA,
    "llama2-chat": _LLAMA2,
    "codellama": _LLAMA2,
    "llama3": _per_role(
        "'<|start_header_id|>' + role + '<|end_header_id|>\n\n' + content | trim + '<|eot_id|>'",
        "'<|start_header_id|>assistant<|end_header_id|>\n\n'",
    ),
    "mistral": _first_user_folds_system("'[INST] ' + content + ' [/INST]'", "content + '</s>'", "''"),
    "gemma": _first_user_folds_system(
        "'<start_of_turn>user\n' + content | trim + '<end_of_turn>\n'",
        "'<start_of_turn>model\n' + content | trim + '<end_of_turn>\n'",
        "'<start_of_turn>model\n'",
    ),
    "chatml": _per_role("'<|im_start|>' + role + '\n' + content + '<|im_end|>\n'", "'<|im_start|>assistant\n'"),
    "phi2": _first_user_folds_system("'Instruct: ' + content + '\n'", "'Output: ' + content + '\n'", "'Output:'"),
    "phi3": _per_role("'<|' + role + '|>\n' + content + '<|end|>\n'", "'<|assistant|>\n'"),
    "phi4": _per_role("'<|im_start|>' + role + '<|im_sep|>' + content + '<|im_end|>'", "'<|im_start|>assistant<|im_sep|>'"),
    "tinyllama": _per_role(
        "'<|' + role + '|>\n' + content + '</s>\n'", "'<|assistant|>\n'",
        default_system="You are a friendly chatbot who always gives helpful, detailed, and polite answers.",
    ),
    "stablelm-zephyr": _per_role("'<|' + role + '|>\n' + content + '<|endoftext|>\n'", "'<|assistant|>\n'"),
    "falcon": _first_user_folds_system("'User: ' + content + '\n'", "'Falcon: ' + content + '\n'", "'Falcon:'"),
    "olmo2": _per_role(
        "'<|' + role + '|>\n' + content + ('<|endoftext|>\n' if role == 'assistant' else '\n')", "'<|assistant|>\n'"
    ),
}
BUILTIN_TEMPLATES["qwen"] = BUILTIN_TEMPLATES["chatml"]

# text that ends an assistant turn, besides the tokenizer's EOS ids (matched as token sequences)
BUILTIN_STOP_STRINGS: dict[str, tuple[str, ...]] = {
    "alpaca": ("### Instruction:",),
    "llama2-chat": ("</s>",),
    "codellama": ("</s>",),
    "llama3": ("<|eot_id|>", "<|end_of_text|>"),
    "mistral": ("</s>",),
    "gemma": ("<end_of_turn>",),
    "chatml": ("<|im_end|>", "<|endoftext|>"),
    "qwen": ("<|im_end|>", "<|endoftext|>"),
    "phi2": ("\nInstruct:",),
    "phi3": ("<|end|>", "<|endoftext|>"),
    "phi4": ("<|im_end|>",),
    "tinyllama": ("</s>",),
    "stablelm-zephyr": ("<|endoftext|>",),
    "falcon": ("\nUser:",),
    "olmo2": ("<|endoftext|>",),
}

# model-name patterns (lower case, checked in order) -> style, for checkpoints without a template
_FAMILY_DEFAULTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("codellama", "instruct"), "codellama"),
    (("llama-2", "chat"), "llama2-chat"),
    (("llama-3", "instruct"), "llama3"),
    (("tinyllama", "chat"), "tinyllama"),
    (("mistral", "instruct"), "mistral"),
    (("mixtral", "instruct"), "mistral"),
    (("gemma", "-it"), "gemma"),
    (("qwen", "instruct"), "chatml"),
    (("qwen3",), "chatml"),
    (("smollm", "instruct"), "chatml"),
    (("phi-2",), "phi2"),
    (("phi-3",), "phi3"),
    (("phi-4",), "phi4"),
    (("falcon", "instruct"), "falcon"),
    (("olmo-2", "instruct"), "olmo2"),
    (("stablelm-zephyr",), "stablelm-zephyr"),
)


# ---------------------------------------------------------------------- rendering
@lru_cache(maxsize=32)
def compile_chat_template(template: str):
    """Compile `template` exactly as transformers' `_compile_jinja_template` does (sandbox, options, globals)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; render its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # like transformers: no HTML escaping (Jinja's own tojson escapes <, >, &)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates can't set underscore attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LitLLMError(f"chat template: Jinja syntax error at line {e.lineno}: {e.message}") from None


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         tools: Optional[list[dict]] = None, **variables) -> str:
    """Render a chat template the way `tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)` does
    (`tools`: JSON-schema function specs, passed to the template as given)."""
    import jinja2

    # transformers drops keys whose value is None (some templates print "None" otherwise)
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compile_chat_template(template).render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.exceptions.TemplateError as e:
        raise LitLLMError(f"chat template: {e}") from None


# ---------------------------------------------------------------------- the style
@dataclass(frozen=True)
class PromptStyle:
    """How prompts and chats are laid out for one model.

    name: a built-in style name, `chat_template` for a checkpoint's own template, or a custom name.
    template: the Jinja chat template rendered over `messages`.
    stop_strings: text that ends an assistant turn (besides the tokenizer's EOS ids).
    variables: extra template variables (a checkpoint's `bos_token`, `eos_token`, ...).
    writes_bos: the template writes the BOS token itself (checkpoint templates do), so the rendered
        prompt is encoded without adding one.
    """

    name: str
    template: str
    stop_strings: tuple[str, ...] = ()
    variables: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    writes_bos: bool = False

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_name(cls, name: str, flag: Optional[str] = None) -> "PromptStyle":
        """A built-in style by name (`litllm.prompts.style_names()` lists them); an unknown one fails naming `flag`
        (where the name came from: `--prompt_style`, `--data.prompt_style`, a file's field) and the closest style."""
        key = name.lower().replace("_", "-")
        if key not in BUILTIN_TEMPLATES:
            from difflib import get_close_matches

            close = get_close_matches(key, style_names(), n=1, cutoff=0.6)
            raise LitLLMError(f"{flag + ': ' if flag else ''}unknown prompt style {name!r}"
                              f"{f' (did you mean {close[0]}?)' if close else ''}; "
                              f"expected one of {', '.join(style_names())}")
        return cls(key, BUILTIN_TEMPLATES[key], BUILTIN_STOP_STRINGS.get(key, ()))

    @classmethod
    def from_chat_template(
        cls, template: str, variables: Optional[dict[str, Any]] = None, stop_strings: tuple[str, ...] = ()
    ) -> "PromptStyle":
        """Wrap a checkpoint's Jinja template; `variables` are the tokenizer's special tokens (`bos_token`, ...)."""
        compile_chat_template(template)  # fail now, with a clear message, on a broken template
        return cls("chat_template", template, tuple(stop_strings), dict(variables or {}), writes_bos=True)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Union[str, Path, None], name: Optional[str] = None,
                        fallback: str = "default", flag: str = "--prompt_style") -> "PromptStyle":
        """The style of a model folder: the built-in style `name` when given (the flag `flag`), else
        `prompt_style.yaml` if present, else the tokenizer's chat template, else a family default guessed
        from `model_config.yaml`'s name, else `fallback` (`default`, plain text, for decoding; training on
        instructions falls back to `alpaca`). No folder (None): `fallback`."""
        if name:
            return cls.from_name(name, flag)
        if checkpoint_dir is None:
            return cls.from_name(fallback)
        checkpoint_dir = Path(checkpoint_dir)
        path = checkpoint_dir / PROMPT_STYLE_FILE
        if path.is_file():
            return _style_from_yaml(path, checkpoint_dir)
        template = checkpoint_chat_template(checkpoint_dir)
        if template is not None:
            return _checkpoint_style(checkpoint_dir, template)
        family = default_style_name(_model_name(checkpoint_dir))
        return cls.from_name(fallback if family == "default" else family)

    # ---------------------------------------------------------------- formatting
    def apply(self, prompt: str, sys_prompt: Optional[str] = None, **fields: Any) -> str:
        """Format one instruction as the text the model should continue.

        Extra keyword fields go into the user message (e.g. Alpaca's `input=`).
        """
        messages: list[dict[str, Any]] = []
        if sys_prompt:
            messages.append({"role": "system", "content": sys_prompt})
        messages.append({"role": "user", "content": prompt, **fields})
        return self.render_messages(messages, add_generation_prompt=True)

    def render_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                        tools: Optional[list[dict]] = None) -> str:
        """Format a chat (`[{"role": "system"|"user"|"assistant", "content": ...}, ...]`), with `tools` (the
        template's `tools` variable) when given."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise LitLLMError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        return render_chat_template(self.template, messages, add_generation_prompt, tools, **self.variables)

    def encode(self, tokenizer: "Tokenizer", text: str, device=None) -> "torch.Tensor":
        """Token ids of a rendered prompt: BOS added unless the template wrote it already."""
        return tokenizer.encode(text, bos=False if self.writes_bos else None, device=device)

    def stop_tokens(self, tokenizer: "Tokenizer") -> list[list[int]]:
        """Token sequences that end a reply: each EOS/stop id of the tokenizer, then each stop string."""
        stops: list[list[int]] = [[i] for i in tokenizer.stop_ids]
        for text in self.stop_strings:
            ids = tokenizer.encode(text, bos=False).tolist()
            if ids and ids not in stops:
                stops.append(ids)
        return stops


def style_names() -> list[str]:
    return sorted(BUILTIN_TEMPLATES)


def default_style_name(model_name: str) -> str:
    """The built-in style a model family uses, from its preset/model name (`default` if unknown)."""
    lowered = model_name.lower()
    for parts, style in _FAMILY_DEFAULTS:
        if all(p in lowered for p in parts):
            return style
    return "default"


def save_prompt_style(style: Union[str, PromptStyle], checkpoint_dir: Union[str, Path]) -> None:
    """Write `prompt_style.yaml` so `PromptStyle.from_checkpoint` finds this style again."""
    from litllm.utils import atomic_write_text

    atomic_write_text(Path(checkpoint_dir) / PROMPT_STYLE_FILE, prompt_style_yaml(style))


def prompt_style_yaml(style: Union[str, PromptStyle]) -> str:
    """The text of the `prompt_style.yaml` that makes `PromptStyle.from_checkpoint` find `style` again."""
    style = PromptStyle.from_name(style) if isinstance(style, str) else style
    if style.name in BUILTIN_TEMPLATES and style.template == BUILTIN_TEMPLATES[style.name]:
        data: dict[str, Any] = {"name": style.name}
    elif style.name == "chat_template":
        data = {"name": "chat_template"}  # the template stays in tokenizer_config.json
        if style.stop_strings:
            data["stop_strings"] = list(style.stop_strings)
    else:
        data = {"name": style.name, "template": style.template, "stop_strings": list(style.stop_strings)}
    return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------- checkpoint helpers
def checkpoint_chat_template(checkpoint_dir: Path) -> Optional[str]:
    """The chat template of a folder (tokenizer_config.json's `chat_template`, or chat_template.jinja)."""
    config = read_json_object(checkpoint_dir / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):
        # several named templates: transformers uses the one named "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (checkpoint_dir / "chat_template.jinja").is_file():
        template = (checkpoint_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) and template.strip() else None


def template_variables(checkpoint_dir: Path) -> dict[str, str]:
    """The special-token strings transformers passes to a chat template (its `special_tokens_map`)."""
    config = read_json_object(checkpoint_dir / "tokenizer_config.json")
    special = read_json_object(checkpoint_dir / "special_tokens_map.json")
    variables = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        value = config.get(key, special.get(key))
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            variables[key] = value
    return variables


def _checkpoint_style(checkpoint_dir: Path, template: str, stop_strings: tuple[str, ...] = ()) -> PromptStyle:
    variables = template_variables(checkpoint_dir)
    # the text a template writes right after an assistant reply ends the turn (e.g. "<|im_end|>"):
    # render a reply with a sentinel and take what follows it up to the first newline
    sentinel = "\x00reply\x00"
    try:
        text = render_chat_template(
            template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], False, **variables
        )
        tail = text.split(sentinel, 1)[1].split("\n", 1)[0].strip() if sentinel in text else ""
    except LitLLMError:
        tail = ""
    stops = tuple(dict.fromkeys([*stop_strings, *([tail] if tail else [])]))
    return PromptStyle.from_chat_template(template, variables, stops)


def _style_from_yaml(path: Path, checkpoint_dir: Path) -> PromptStyle:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LitLLMError(f"{path}: invalid YAML ({e})") from None
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise LitLLMError(f"{path}: expected a mapping with a `name` (a style name or `chat_template`)")
    stops = tuple(data.get("stop_strings") or ())
    if data.get("template"):
        compile_chat_template(data["template"])
        return PromptStyle(data["name"], data["template"], stops)
    if data["name"] == "chat_template":
        template = checkpoint_chat_template(checkpoint_dir)
        if template is None:
            raise LitLLMError(f"{path}: style `chat_template` but {checkpoint_dir} has no chat template")
        return _checkpoint_style(checkpoint_dir, template, stops)
    style = PromptStyle.from_name(data["name"], f"{path}: name")
    return PromptStyle(style.name, style.template, style.stop_strings + stops) if stops else style


def _model_name(checkpoint_dir: Path) -> str:
    path = checkpoint_dir / "model_config.yaml"
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError):  # the model's own loader reports a damaged file
            data = {}
        if isinstance(data, dict) and data.get("name"):
            return str(data["name"])
    return checkpoint_dir.name


