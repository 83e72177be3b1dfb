"""Chat templates: a tokenizer directory's Jinja template, rendered exactly as transformers'
`apply_chat_template` renders it (tests/data/test_hf_tokenizer.py compares 100 conversations).

Where the template lives: tokenizer_config.json "chat_template" (a string, or a list of {name, template}:
the one named "default"), or chat_template.jinja / chat_template.json beside it (transformers 5 writes the
.jinja file). The environment is transformers': a sandbox with trim_blocks and lstrip_blocks, loop
controls, a `tojson` that does not escape HTML, `raise_exception`, `strftime_now`; the template sees
`messages`, `add_generation_prompt` and the special tokens as strings (`bos_token`, `eos_token`, ...).

The response of a chat prompt ends at the template's end of turn: `end_of_turn_id` renders an assistant
turn around a marker and takes the token right after the marker when it is a special token (Qwen's
<|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>); the sampler counts it as an EOS.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = dict[str, Any]
_MARKER = "bond_jax_end_of_turn_marker"


def _environment() -> ImmutableSandboxedEnvironment:

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


def _template_text(files: dict[str, bytes]) -> str | None:
  """The directory's default chat template (tokenizer_config.json first, as transformers reads it)."""
  config = json.loads(files.get("tokenizer_config.json", b"{}"))
  found = config.get("chat_template")
  if found is None and "chat_template.jinja" in files:
    found = files["chat_template.jinja"].decode("utf-8")
  if found is None and "chat_template.json" in files:
    found = json.loads(files["chat_template.json"]).get("chat_template")
  if isinstance(found, list):  # named templates: the default one
    found = next((t["template"] for t in found if t.get("name") == "default"), None)
  return found or None


class ChatTemplate:
  """A compiled chat template and the special-token strings it is rendered with."""

  def __init__(self, source: str, special: dict[str, str]):
    self.source = source
    self.special = dict(special)
    self._template = _environment().from_string(source)

  @classmethod
  def from_files(cls, files: dict[str, bytes], special: dict[str, str]) -> ChatTemplate | None:
    source = _template_text(files)
    return None if source is None else cls(source, special)

  def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The conversation as text; with the generation prompt, it ends where the assistant's reply starts."""
    return self._template.render(messages=[dict(m) for m in messages],
                                 add_generation_prompt=add_generation_prompt, **self.special)

  def end_of_turn_id(self, tokenizer) -> int | None:
    """The id of the special token that closes an assistant turn, or None when the template closes it
    with plain text (then the tokenizer's eos ends a response)."""
    try:
      text = self.render([{
          "role": "user",
          "content": "hi"
      }, {
          "role": "assistant",
          "content": _MARKER
      }], add_generation_prompt=False)
    except jinja2.exceptions.TemplateError:
      return None
    if _MARKER not in text:
      return None
    after = text.split(_MARKER, 1)[1]
    ids = tokenizer.encode_rendered(after)
    if not ids or not tokenizer.is_special(ids[0]):
      return None
    return ids[0]


def check_messages(value: Any) -> str | None:
  """Why `value` is not a chat `messages` list ([{'role': str, 'content': str}, ...]), or None."""
  if not isinstance(value, list) or not value:
    return "not a non-empty list"
  for m in value:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      return "a message is not {'role': str, 'content': str}"
  return None
