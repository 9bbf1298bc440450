"""A model's chat template, rendered with jinja2 the way transformers renders it (a sandboxed
environment, trim_blocks and lstrip_blocks, `raise_exception` and a `tojson` filter).

The template comes from --chat-template FILE, else the folder's chat_template.jinja, else the
"chat_template" of its tokenizer_config.json; a model without one serves no chat requests.
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The messages cannot be rendered: a bad request, with the template's own words."""


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent,
                                                                      ensure_ascii=False)
        self.template = env.from_string(source)
        self.special_tokens = special_tokens  # bos_token, eos_token, … as the template names them

    @classmethod
    def load(cls, model_dir: Path, override: str = "") -> ChatTemplate | None:
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        if override:
            source = Path(override).read_text()
        elif (model_dir / "chat_template.jinja").exists():
            source = (model_dir / "chat_template.jinja").read_text()
        else:
            source = config.get("chat_template")
        if not source:
            return None
        tokens = {k: v for k, v in config.items()
                  if k.endswith("_token") and isinstance(v, str)}
        return cls(source, tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template cannot render these messages: {exc}") \
                from None


def _raise(message: str):
    raise ChatTemplateError(message)
