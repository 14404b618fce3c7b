"""OpenAI's chat completions request (POST /v1/chat/completions) for `egmla serve`, and the chat template that makes
its messages one prompt.

egmla trains base language models, with no chat template of their own. As vLLM does, the server takes one from
`--chat-template` (a file, or the template itself), else from the folder it serves (an exported Hugging Face folder's
chat_template.jinja, or its tokenizer_config.json's chat_template); without one a chat request is answered 400 and
completions work as ever. Templates follow transformers' `apply_chat_template` convention (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`) and render in jinja2's immutable sandbox, as
there: a template is code from a model folder. The rendered prompt then runs as a completion's would
(`CompletionRequest`), so a chat answer is the completion of that prompt.
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Callable

from egmla.infer.completions import (ApiError, CompletionRequest, boolean_field, check_body, check_text,
                                     check_top_logprobs, generation_fields, integer_field)

# "developer" is OpenAI's newer name for system instructions: passed to the template as sent, as vLLM passes it
ROLES = ("system", "developer", "user", "assistant")
_NO_SAMPLING = "sampling has temperature, top_p and top_k only (egmla.infer.sampling)"
_NO_TOOLS = "the served model is a base language model: the server has no tool or function calling"
# OpenAI chat fields this server does not implement: the values that mean "not used", and why (completions' table)
CHAT_UNSUPPORTED = {
    "presence_penalty": ((None, 0), _NO_SAMPLING),
    "frequency_penalty": ((None, 0), _NO_SAMPLING),
    "logit_bias": ((None, {}), _NO_SAMPLING),
    "tools": ((None, []), _NO_TOOLS),
    "tool_choice": ((None, "none"), _NO_TOOLS),
    "functions": ((None, []), _NO_TOOLS),
    "function_call": ((None, "none"), _NO_TOOLS),
    "response_format": ((None, {"type": "text"}), "answers are free text: there is no structured (JSON) output"),
    # vLLM's extras that this server does not take: a template is code, so it comes from the server's operator only
    "chat_template": ((None,), "the chat template is the server's (--chat-template or the served folder's), not "
                               "a request's"),
    "echo": ((None, False), "a chat answer does not repeat the last message; put its text in the prompt of "
                            "/v1/completions with echo: true instead"),
}
# template variables a request's chat_template_kwargs may not replace (the server sets them)
TEMPLATE_OWN = ("messages", "add_generation_prompt", "bos_token", "eos_token", "raise_exception", "strftime_now")
MESSAGES_EXAMPLE = '[{"role": "user", "content": "Hello"}]'


class ChatTemplate:
    """A compiled chat template, the bos and eos token texts it is given, and where it came from (its errors name
    it)."""

    def __init__(self, source: str, origin: str = "chat_template", bos_token: str | None = None,
                 eos_token: str | None = None):
        import jinja2

        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(f"{origin}: not a Jinja template: line {error.lineno}: {error.message}") from None
        self.source, self.origin = source, origin
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""  # None would render as "None"

    def render(self, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False,
               variables: dict | None = None) -> str:
        """The prompt of these messages; ApiError 400 where the template refuses them (its raise_exception) or
        fails on them. `continue_final_message`: the prompt ends where the last message's text ends (what the
        template puts after it, an end-of-turn mark, is cut), so the answer continues that message, as transformers'
        apply_chat_template does. `variables`: more names the template can read (a request's
        chat_template_kwargs, such as vLLM's)."""
        import jinja2

        try:
            prompt = self.template.render(**(variables or {}), messages=messages,
                                          add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                                          eos_token=self.eos_token)
        # raise_exception's, an undefined field, a sandbox refusal; or the template's own Python error on these
        # messages (a str + int, a / 0, a recursion without end): a 400 naming it, as vLLM answers, not a 500
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError, RuntimeError) as error:
            why = str(error) if isinstance(error, jinja2.TemplateError) else f"{type(error).__name__}: {error}"
            raise ApiError(400, f"the chat template ({self.origin}) cannot render these messages: "
                                f"{why.rstrip('.')}; send "
                                f"messages it accepts", "messages") from None
        return _cut_after_final(prompt, messages[-1]["content"], self.origin) if continue_final_message else prompt


def _cut_after_final(prompt: str, final: str, origin: str) -> str:
    """The prompt up to the end of the last message's text, found from the right (a template may strip it)."""
    for text in (final, final.strip()):
        at = prompt.rfind(text) if text else -1
        if at >= 0:
            return prompt[:at + len(text)]
    raise ApiError(400, f"continue_final_message: the chat template ({origin}) does not put the last message's "
                        f"text in the prompt, so there is no end of it to continue from; send the last message as a "
                        f"non-empty text the template writes out, or leave continue_final_message out",
                   "continue_final_message")


@functools.lru_cache(maxsize=1)
def _environment():
    """transformers' chat-template environment: the immutable sandbox (no attribute of Python's internals, no
    mutation of what it is given), trimmed blocks, loop controls, generation blocks, and the helpers templates
    call."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own escapes HTML, which a prompt must not have
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class GenerationBlocks(jinja2.ext.Extension):
        """transformers' {% generation %} ... {% endgeneration %} (it marks the assistant's part for training masks,
        TRL's templates have it): rendered as its body, as apply_chat_template renders it."""

        tags = {"generation"}

        def parse(self, parser):
            line = next(parser.stream).lineno  # a scope of its own, as transformers' call block is
            return jinja2.nodes.Scope(parser.parse_statements(("name:endgeneration",), drop_needle=True),
                                      lineno=line)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols, GenerationBlocks])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment


def load_chat_template(option: str | None, folder: str | Path, tokenizer, eos_token_id: int | None = None
                       ) -> ChatTemplate | None:
    """`egmla serve`'s chat template: --chat-template's file or text, else the folder's chat_template.jinja, else its
    tokenizer_config.json's chat_template (transformers writes one or the other), else None. bos_token and eos_token
    are the tokenizer's (`egmla export` names the same ones), eos_token the server's end-of-text token where given."""
    source, origin = _template_source(option, Path(folder))
    if source is None:
        return None
    from egmla.hf.tokenizer import special_tokens

    tokens = special_tokens(tokenizer)
    eos = tokenizer.id_to_token(eos_token_id) if eos_token_id is not None else tokens["eos_token"]
    return ChatTemplate(source, origin, tokens["bos_token"], eos)


def check_template_option(option: str) -> None:
    """--chat-template's file or text, read and compiled: a ValueError naming the option before the weights load."""
    ChatTemplate(*_template_source(option, Path(".")))


def _template_source(option: str | None, folder: Path) -> tuple[str | None, str]:
    if option is not None:
        if os.path.isfile(option):  # (not Path.is_file: a long template raises "file name too long" there)
            return Path(option).read_text(encoding="utf-8"), f"--chat-template {option}"
        if any(mark in option for mark in "{}\n"):  # vLLM's rule: the template itself, not a path
            return option, "--chat-template"
        raise ValueError(f"--chat-template {option!r}: no such file, and not a template (no {{ }} in it): give a "
                         f"Jinja file or the template itself")
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    if isinstance(template, list):  # named templates ({"name", "template"}): transformers' default is "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return (template, f"{config}'s chat_template") if isinstance(template, str) and template else (None, "")


def parse_chat_request(body, model_name: str, encode: Callable[[object, int], list[int]],
                       template: ChatTemplate | None, max_len: int, max_choices: int | None = None
                       ) -> CompletionRequest:
    """Check a chat request body field by field (ApiError naming the first bad one) and make it the completion of its
    rendered messages: one prompt, `n` samples, at most `max_len` positions (the scheduler's row) in all; without
    max_tokens / max_completion_tokens it runs to the end-of-text token or the row's end."""
    check_body(body, model_name, f'{{"messages": {MESSAGES_EXAMPLE}}}', CHAT_UNSUPPORTED)
    if template is None:
        raise ApiError(400, "this server has no chat template: its model is a base language model, which has none of "
                            "its own; serve it with --chat-template FILE_OR_STRING (a Jinja template, transformers' "
                            "convention), or send the prompt to /v1/completions", "messages", "chat_template_missing")
    messages = _messages(body.get("messages"))
    add_generation_prompt = boolean_field(body, "add_generation_prompt", True)
    continue_final = boolean_field(body, "continue_final_message")
    if continue_final and add_generation_prompt:  # vLLM's and transformers' rule: one or the other
        raise ApiError(400, "continue_final_message: true with add_generation_prompt: true: the answer would both "
                            "continue the last message and open a new one; add \"add_generation_prompt\": false",
                       "continue_final_message")
    if continue_final and messages[-1]["role"] != "assistant":
        raise ApiError(400, f"continue_final_message: true, but the last message's role is {messages[-1]['role']!r}: "
                            f"it continues an assistant message; end the messages with one", "continue_final_message")
    variables = _template_variables(body.get("chat_template_kwargs"))
    common = generation_fields(body, max_choices)
    max_tokens = _max_tokens(body, max_len)
    wanted, top = boolean_field(body, "logprobs"), integer_field(body, "top_logprobs", None, minimum=0)
    if top is not None and not wanted:  # vLLM's and OpenAI's rule
        raise ApiError(400, f"top_logprobs={top} without logprobs: true: add \"logprobs\": true, or leave "
                            f"top_logprobs out", "top_logprobs")
    check_top_logprobs(top, "top_logprobs")
    prompt = template.render(messages, add_generation_prompt, continue_final, variables)
    try:
        ids = encode(prompt, 0)
    except ValueError as error:  # empty, beyond the model's context
        raise ApiError(400, f"the prompt the chat template makes of these messages is refused: {error}",
                       "messages") from error
    if len(ids) > max_len:  # here, not at submission: the error names messages, not prompt
        raise ApiError(400, f"the prompt the chat template makes of these messages has {len(ids)} tokens, more than "
                            f"the server's --max-len={max_len} positions per row: send fewer or shorter messages",
                       "messages")
    return CompletionRequest([ids], [prompt], max_tokens=max_tokens, logprobs=(top or 0) if wanted else None,
                             echo=False, **common)


def _max_tokens(body: dict, default: int) -> int:
    """max_completion_tokens, or max_tokens (its older name); the default reaches the row's end."""
    new = integer_field(body, "max_completion_tokens", None, minimum=1)
    old = integer_field(body, "max_tokens", None, minimum=1)
    if new is not None and old is not None and new != old:
        raise ApiError(400, f"max_completion_tokens={new} and max_tokens={old} disagree: give one of them "
                            f"(max_tokens is the older name)", "max_completion_tokens")
    return new or old or default


def _template_variables(value) -> dict:
    """A request's chat_template_kwargs (vLLM's field): more variables for the template, such as a template's own
    switches (`enable_thinking`); never the ones the server sets."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) and key.isidentifier() for key in value):
        raise ApiError(400, f"chat_template_kwargs={value!r}: must be an object of template variables such as "
                            f"{{\"enable_thinking\": false}}", "chat_template_kwargs")
    taken = sorted(set(value) & set(TEMPLATE_OWN))
    if taken:
        raise ApiError(400, f"chat_template_kwargs sets {', '.join(taken)}, which the server sets; use the request's "
                            f"own fields (messages, add_generation_prompt) or leave them out", "chat_template_kwargs")
    return value


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"messages={value!r}: must be a non-empty list of messages such as {MESSAGES_EXAMPLE}",
                       "messages")
    return [_message(message, f"messages[{index}]") for index, message in enumerate(value)]


def _message(message, name: str) -> dict:
    """{"role", "content"} of one message, its content as one string (what the template is given)."""
    if not isinstance(message, dict):
        raise ApiError(400, f"{name}={message!r}: must be an object such as {{\"role\": \"user\", \"content\": "
                            f"\"Hello\"}}", "messages")
    role = message.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{name}.role={role!r}: must be one of {', '.join(ROLES)} (no tool or function "
                            f"messages: {_NO_TOOLS})", "messages")
    if message.get("tool_calls") not in (None, []):
        raise ApiError(400, f"{name}.tool_calls is not supported: {_NO_TOOLS}; leave it out", "messages")
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(_text_part(part, f"{name}.content[{index}]") for index, part in enumerate(content))
    if not isinstance(content, str):
        raise ApiError(400, f"{name}.content={content!r}: must be a string or a list of text parts such as "
                            f"[{{\"type\": \"text\", \"text\": \"Hello\"}}]", "messages")
    check_text(content, f"{name}.content", "messages")
    speaker = message.get("name")  # OpenAI's participant name: templates that know it write it out
    if speaker is None:
        return {"role": role, "content": content}
    if not isinstance(speaker, str) or not speaker:
        raise ApiError(400, f"{name}.name={speaker!r}: must be a non-empty string (the participant's name) or left "
                            f"out", "messages")
    check_text(speaker, f"{name}.name", "messages")
    return {"role": role, "content": content, "name": speaker}


def _text_part(part, name: str) -> str:
    """A content part's text: only text parts (the model reads text), joined with newlines as vLLM joins them."""
    if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
        kind = part.get("type") if isinstance(part, dict) else None
        why = f"a {kind} part: the model reads text only" if kind not in (None, "text") else "not a text part"
        raise ApiError(400, f"{name}={part!r}: {why}; send {{\"type\": \"text\", \"text\": \"...\"}} parts or the "
                            f"content as a string", "messages")
    return part["text"]
