"""`egmla serve`'s POST /v1/chat/completions (egmla/infer/chat.py, egmla/infer/server.py): a chat answer is the
completion of the prompt the chat template makes of its messages (compared with /v1/completions of that prompt, the
same seed), in OpenAI's chat shapes, streamed or whole; where the template comes from (--chat-template, an exported
folder), its sandbox, and every error, each naming the field and the fix."""
import json
import re
import signal
import subprocess
import sys

import pytest

import tests.infer.test_server as base  # its helpers (not `from ... import`: pytest would collect its tests again)
from egmla.infer.chat import ChatTemplate, load_chat_template
from egmla.infer.completions import ApiError

MODEL = base.MODEL
# short (the rows hold 32 tokens) and using what templates use: a filter, loop, raise_exception, add_generation_prompt
TEMPLATE = ("{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
            "{{ raise_exception('a system message comes first') }}{% endif %}"
            "{{ m.role[0] | upper }}:{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
MESSAGES = [{"role": "system", "content": "Be"}, {"role": "user", "content": "To be, or"}]


def rendered(messages: list[dict]) -> str:
    """What TEMPLATE makes of these messages, written out by hand."""
    return "".join(f"{m['role'][0].upper()}:{m['content']}\n" for m in messages) + "A:"


@pytest.fixture(scope="module")
def server(tokenizer):
    with base.serving(tokenizer, chat_template=TEMPLATE) as server:
        yield server


def chat(server, **body) -> dict:
    status, answer = base.call(server, "POST", "/v1/chat/completions", body)
    assert status == 200, answer
    return answer


def test_a_chat_answer_is_the_completion_of_the_rendered_prompt(server):
    for body in (dict(temperature=0, max_tokens=8), dict(n=2, seed=5, temperature=0.9, top_k=40, max_tokens=6)):
        completion = base.complete(server, prompt=rendered(MESSAGES), ignore_eos=True, **body)
        answer = chat(server, model=MODEL, messages=MESSAGES, ignore_eos=True, **body)
        assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
        assert answer["model"] == MODEL and answer["usage"] == completion["usage"]
        assert answer["choices"] == [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                                      "logprobs": None, "finish_reason": "length"} for c in completion["choices"]]
    assert len({c["message"]["content"] for c in answer["choices"]}) == 2  # n samples differ
    # max_completion_tokens is max_tokens' newer name; text parts are joined by newlines; a stop ends it ("stop")
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "To"}, {"type": "text", "text": "be"}]}]
    whole = chat(server, messages=parts, temperature=0, max_completion_tokens=8, ignore_eos=True,
                 logprobs=True)["choices"][0]
    same = base.complete(server, prompt=rendered([MESSAGES[0], {"role": "user", "content": "To\nbe"}]),
                         temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)["choices"][0]
    alike = same["text"]
    assert whole["message"]["content"] == alike and whole["finish_reason"] == "length"
    # (the log-probabilities tell prompts apart where a random model's greedy text does not)
    assert [e["logprob"] for e in whole["logprobs"]["content"]] == same["logprobs"]["token_logprobs"]
    stop = alike[2:4]
    stopped = chat(server, messages=parts, temperature=0, max_tokens=8, ignore_eos=True, stop=[stop])["choices"][0]
    assert stopped == {**whole, "message": {"role": "assistant", "content": alike[:alike.index(stop)]},
                       "logprobs": None, "finish_reason": "stop"}


def test_vllm_extras_shape_the_prompt_and_the_answer_is_its_completion(server):
    """add_generation_prompt: false leaves the template's "A:" out; continue_final_message ends the prompt where the
    last assistant message's text ends (the template's newline after it cut), so the answer continues it."""
    turns = [*MESSAGES, {"role": "assistant", "content": "not to"}]
    for extras, prompt in (({"add_generation_prompt": False}, rendered(MESSAGES)[:-2]),
                           ({"add_generation_prompt": False, "continue_final_message": True},
                            rendered(turns)[:-len("\nA:")])):
        messages = turns if extras.get("continue_final_message") else MESSAGES
        answer = chat(server, messages=messages, temperature=0, max_tokens=6, ignore_eos=True, logprobs=True,
                      **extras)["choices"][0]
        same = base.complete(server, prompt=prompt, temperature=0, max_tokens=6, ignore_eos=True,
                             logprobs=0)["choices"][0]
        assert answer["message"]["content"] == same["text"]
        assert [e["logprob"] for e in answer["logprobs"]["content"]] == same["logprobs"]["token_logprobs"]


def test_message_names_and_template_variables_reach_the_template():
    from egmla.infer.chat import _messages

    template = ChatTemplate("{% for m in messages %}{{ m.name or m.role }}:{{ m.content }};{% endfor %}"
                            "{% if think %}<think>{% endif %}")
    messages = [{"role": "user", "content": "hi", "name": "ann"}, {"role": "user", "content": "yo"}]
    assert template.render(messages) == "ann:hi;user:yo;"
    # a developer message (OpenAI's newer system) reaches the template with its role
    assert _messages([{"role": "developer", "content": "be brief"}]) == [{"role": "developer", "content": "be brief"}]
    assert template.render(messages, variables={"think": True}) == "ann:hi;user:yo;<think>"

    assert _messages([{"role": "user", "content": "hi", "name": "ann"}]) == [{"role": "user", "content": "hi",
                                                                             "name": "ann"}]
    # continue_final_message: the template strips the text, so the cut falls after the stripped text
    stripping = ChatTemplate("{% for m in messages %}<{{ m.content | trim }}>{% endfor %}")
    assert stripping.render([{"role": "assistant", "content": " so "}], False, True) == "<so"
    with pytest.raises(ApiError, match="does not put the last message's text in the prompt") as error:
        ChatTemplate("{% for m in messages %}[turn]{% endfor %}").render([{"role": "assistant", "content": "y"}],
                                                                        False, True)
    assert error.value.param == "continue_final_message"


def test_without_max_tokens_a_chat_runs_to_the_rows_end(server):
    """Chat has no max_tokens default of 16 (completions'): it ends at the end-of-text token or the row's end."""
    answer = chat(server, messages=MESSAGES, temperature=0, ignore_eos=True)
    longest = base.complete(server, prompt=rendered(MESSAGES), temperature=0, ignore_eos=True, max_tokens=100)
    assert answer["usage"] == longest["usage"] and answer["usage"]["completion_tokens"] > 16
    assert answer["choices"][0]["finish_reason"] == "length"


def test_streamed_deltas_add_up_to_the_answer(server):
    body = dict(messages=MESSAGES, n=2, seed=3, temperature=0.8, max_tokens=7, ignore_eos=True)
    whole = chat(server, **body)
    events = base.stream(server, "/v1/chat/completions", **body, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"] and usage["object"] == "chat.completion.chunk"
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert {c["id"] for c in events[:-1]} == {usage["id"]} and usage["id"].startswith("chatcmpl-")
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}  # the first chunk gives the role
        assert all(set(c["delta"]) <= {"content"} for c in mine[1:])
        assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [choice["finish_reason"]]
    plain = base.stream(server, "/v1/chat/completions", **body)
    assert plain[-2]["choices"][0]["finish_reason"] == "length" and not any("usage" in c for c in plain[:-1])


def test_logprobs_in_the_chat_shape_are_the_completions(server, tokenizer):
    """logprobs: true and top_logprobs: k give OpenAI's {"content": [{token, logprob, bytes, top_logprobs}]}, the
    same values as a completion's legacy logprobs of the rendered prompt, streamed or not."""
    body = dict(temperature=0, max_tokens=5, ignore_eos=True)
    legacy = base.complete(server, prompt=rendered(MESSAGES), logprobs=2, **body)["choices"][0]["logprobs"]
    answer = chat(server, messages=MESSAGES, logprobs=True, top_logprobs=2, **body)
    content = answer["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == legacy["tokens"]
    assert [e["logprob"] for e in content] == legacy["token_logprobs"]
    for entry, top in zip(content, legacy["top_logprobs"]):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
        assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])
        assert {t["token"]: t["logprob"] for t in reversed(entry["top_logprobs"])} == top  # legacy keeps the first
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    none = chat(server, messages=MESSAGES, logprobs=True, **body)["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in none] == legacy["token_logprobs"] and all(e["top_logprobs"] == [] for e in none)
    chunks = [e for e in base.stream(server, "/v1/chat/completions", messages=MESSAGES, logprobs=True,
                                     top_logprobs=2, **body) if e != "[DONE]" and e["choices"][0]["logprobs"]]
    assert [e for c in chunks for e in c["choices"][0]["logprobs"]["content"]] == content


def test_logprob_bytes_are_each_tokens_own(tokenizer):
    """A token that holds part of a multi-byte character decodes alone to U+FFFD; its `bytes` are its own, so that a
    client joins the bytes of the tokens to the text (OpenAI's point of the field)."""
    from egmla.infer.responses import TokenText

    tokens = TokenText(tokenizer)
    text = "Café naïve — façade"
    ids = tokenizer.encode(text).ids
    assert any(tokens.decode([i]) == "\ufffd" for i in ids)  # the case that matters is there
    assert b"".join(bytes(tokens.bytes(i)) for i in ids) == text.encode()
    assert tokens.bytes(tokenizer.token_to_id("<|endoftext|>")) == []  # a special token: its text, empty


def test_the_template_renders_in_a_sandbox():
    """A template is code from a model folder: it cannot reach Python's internals or change what it is given; it
    can refuse a conversation (raise_exception), its own errors on one are 400s as well (not the server's 500), and
    a template that does not parse is refused at start."""
    messages = [{"role": "user", "content": "x"}]
    for source, message in (("{{ messages.append(1) }}", "'append' of 'list' object is unsafe"),
                            ("{{ ''.__class__.__mro__ }}", "'__class__' of 'str' object is unsafe"),
                            ("{{ raise_exception('only users here') }}", "only users here"),
                            ("{{ messages[0].content + 1 }}", 'TypeError: can only concatenate str (not "int") to str'),
                            ("{{ 1 / (messages | length - 1) }}", "ZeroDivisionError: division by zero"),
                            ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError: maximum recursion")):
        with pytest.raises(ApiError, match=re.escape(message)) as error:
            ChatTemplate(source, "T").render(messages)
        assert error.value.status == 400 and error.value.param == "messages" and "chat template (T)" in str(error.value)
    assert messages == [{"role": "user", "content": "x"}]
    # transformers' tojson (no HTML escapes), trimmed blocks, the tokens given
    template = ChatTemplate("{% for m in messages %}\n{{ m | tojson }}{% endfor %}{{ eos_token }}", bos_token="<s>",
                            eos_token="</s>")
    assert template.render([{"role": "user", "content": "é<&"}]) == '{"role": "user", "content": "é<&"}</s>'
    # transformers' {% generation %} blocks (TRL's training templates mark the assistant's part so): their body
    marked = ChatTemplate("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]"
                          "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    assert marked.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "a[b]"
    with pytest.raises(ValueError, match=r"--chat-template: not a Jinja template: line 1"):
        ChatTemplate("{% for m in %}", "--chat-template")


def test_where_the_template_comes_from(tmp_path, tokenizer):
    """--chat-template (a file, or the template itself), else the folder's chat_template.jinja, else its
    tokenizer_config.json's chat_template (a string, or transformers' list of named ones), else none."""
    messages = [{"role": "user", "content": "hi"}]
    assert load_chat_template(None, tmp_path, tokenizer) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "listed {{ bos_token }}"}]}))
    listed = load_chat_template(None, tmp_path, tokenizer)
    assert listed.render(messages) == "listed <|endoftext|>" and "tokenizer_config.json" in listed.origin
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config {{ eos_token }}"}))
    assert load_chat_template(None, tmp_path, tokenizer, eos_token_id=5).render(messages) == \
        f"config {tokenizer.id_to_token(5)}"  # the server's end-of-text token
    (tmp_path / "chat_template.jinja").write_text("jinja {{ messages[0].content }}")
    assert load_chat_template(None, tmp_path, tokenizer).render(messages) == "jinja hi"
    (tmp_path / "mine.jinja").write_text("file")
    mine = load_chat_template(str(tmp_path / "mine.jinja"), tmp_path, tokenizer)
    assert mine.render(messages) == "file" and mine.origin == f"--chat-template {tmp_path / 'mine.jinja'}"
    assert load_chat_template("inline {{ messages | length }}", tmp_path, tokenizer).render(messages) == "inline 1"
    with pytest.raises(ValueError, match="--chat-template 'nowhere.jinja': no such file, and not a template"):
        load_chat_template("nowhere.jinja", tmp_path, tokenizer)


def test_without_a_template_chat_is_a_400_naming_the_option_and_completions_work(tokenizer):
    with base.serving(tokenizer) as server:
        status, answer = base.call(server, "POST", "/v1/chat/completions", {"messages": MESSAGES})
        assert status == 400 and answer["error"]["code"] == "chat_template_missing"
        assert "--chat-template" in answer["error"]["message"] and answer["error"]["param"] == "messages"
        assert base.complete(server, prompt=base.PROMPT, max_tokens=2)["usage"]["completion_tokens"] == 2


USER = {"role": "user", "content": "x"}


@pytest.mark.parametrize("body,status,param,message", [
    ({}, 400, "messages", "messages=None: must be a non-empty list of messages"),
    ({"messages": []}, 400, "messages", "messages=[]: must be a non-empty list"),
    ({"messages": "hi"}, 400, "messages", "messages='hi': must be a non-empty list"),
    ({"messages": ["hi"]}, 400, "messages", "messages[0]='hi': must be an object"),
    ({"messages": [USER, {"role": "tool", "content": "1"}]}, 400, "messages",
     "messages[1].role='tool': must be one of"),
    ({"messages": [{"role": "user"}]}, 400, "messages", "messages[0].content=None: must be a string or a list of text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages",
     "messages[0].content[0]={'type': 'image_url', 'image_url': {'url': 'x'}}: a image_url part: the model reads text"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages", "not a text part"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]}, 400, "messages",
     "messages[0].tool_calls is not supported"),
    ({"messages": [USER, {"role": "system", "content": "late"}]}, 400, "messages", "a system message comes first"),
    ({"messages": [{"role": "user", "content": "To be, or not to be, that is the question: To be, or not"}]}, 400,
     "messages", "has 34 tokens, more than the max_len=32 positions per row"),
    ({"messages": [{"role": "user", "content": "To be, or not to be, that is the question: " * 3}]}, 400, "messages",
     "more than the max_len=32 positions per row"),  # the limit that binds, though over max_seq_len=48 too
    ({"messages": [USER], "tools": [{"type": "function"}]}, 400, "tools", "tools=[{'type': 'function'}] is not "
                                                                          "supported: the served model is a base"),
    ({"messages": [USER], "response_format": {"type": "json_object"}}, 400, "response_format", "no structured"),
    ({"messages": [USER], "presence_penalty": 1}, 400, "presence_penalty", "presence_penalty=1 is not supported"),
    ({"messages": [USER], "max_tokens": 0}, 400, "max_tokens", "max_tokens=0: must be an integer >= 1"),
    ({"messages": [USER], "max_completion_tokens": 4, "max_tokens": 5}, 400, "max_completion_tokens",
     "max_completion_tokens=4 and max_tokens=5 disagree"),
    ({"messages": [USER], "top_logprobs": 2}, 400, "top_logprobs", "top_logprobs=2 without logprobs: true"),
    ({"messages": [USER], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "top_logprobs=21: at most 20"),
    ({"messages": [USER], "logprobs": 3}, 400, "logprobs", "logprobs=3: must be true or false"),
    ({"messages": [USER], "stream_options": {"include_usage": True}}, 400, "stream_options", "without stream: true"),
    ({"messages": [USER], "temperature": -1}, 400, "temperature", "temperature=-1.0: must be >= 0"),
    ({"messages": [USER], "n": 4 + 64 + 1}, 400, "n", "n=69: 69 choices at once can never be queued"),
    ({"messages": [USER], "model": "gpt-4o"}, 404, "model", "model='gpt-4o': this server serves 'tiny-eg-mla' only"),
    ({"messages": [{**USER, "name": 3}]}, 400, "messages", "messages[0].name=3: must be a non-empty string"),
    ({"messages": [USER], "chat_template": "{{ 1 }}"}, 400, "chat_template", "the chat template is the server's"),
    ({"messages": [USER], "echo": True}, 400, "echo", "echo=True is not supported"),
    ({"messages": [USER], "add_generation_prompt": "no"}, 400, "add_generation_prompt", "must be true or false"),
    ({"messages": [USER, {"role": "assistant", "content": "y"}], "continue_final_message": True}, 400,
     "continue_final_message", 'add "add_generation_prompt": false'),
    ({"messages": [USER], "continue_final_message": True, "add_generation_prompt": False}, 400,
     "continue_final_message", "the last message's role is 'user'"),
    ({"messages": [USER], "chat_template_kwargs": ["x"]}, 400, "chat_template_kwargs", "must be an object of template"),
    ({"messages": [USER], "chat_template_kwargs": {"messages": []}}, 400, "chat_template_kwargs",
     "chat_template_kwargs sets messages, which the server sets"),
])
def test_bad_chat_requests_are_refused_naming_the_field(server, body, status, param, message):
    got, answer = base.call(server, "POST", "/v1/chat/completions", {"user": "an unknown field is ignored", **body})
    assert got == status and set(answer) == {"error"}, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert message in answer["error"]["message"], answer["error"]["message"]


def test_a_lone_surrogate_in_a_message_is_a_400(server):
    status, answer = base.call(server, "POST", "/v1/chat/completions",
                               raw=b'{"messages": [{"role": "user", "content": "To \\ud800"}]}')
    assert status == 400 and answer["error"]["param"] == "messages"
    assert "messages[0].content holds a lone UTF-16 surrogate" in answer["error"]["message"]
    assert "token ids" not in answer["error"]["message"]  # a fix that exists for prompts, not for messages


def test_a_chat_method_not_post_is_a_405(server):
    status, answer = base.call(server, "GET", "/v1/chat/completions")
    assert status == 405 and "/v1/chat/completions takes POST" in answer["error"]["message"]


LM_EVAL_CHAT_CLIENT = """
import json, sys
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalChatCompletion
url, model, messages = json.loads(sys.argv[1])
lm = LocalChatCompletion(base_url=url + "/v1/chat/completions", model=model, num_concurrent=1, max_retries=1)
context = lm.apply_chat_template(messages)
texts = lm.generate_until([Instance("generate_until", {}, (context, {"until": ["\\n\\n"], "max_gen_toks": 6}), 0)],
                          disable_tqdm=True)
print(json.dumps(texts))
"""


def test_lm_eval_local_chat_completions_generates_through_the_server(server):
    """lm-evaluation-harness's own `local-chat-completions` model, in a process of its own as a client would be: its
    generate_until gives the completion of the rendered messages (its seed, greedy, its stop)."""
    argument = json.dumps([server.url, MODEL, MESSAGES])
    client = subprocess.run([sys.executable, "-c", LM_EVAL_CHAT_CLIENT, argument], capture_output=True, text=True,
                            timeout=300)
    assert client.returncode == 0, client.stderr[-2000:]
    [text] = json.loads(client.stdout.strip().splitlines()[-1])
    expected = base.complete(server, prompt=rendered(MESSAGES), max_tokens=6, temperature=0, seed=1234,
                             stop=["\n\n"])["choices"][0]["text"]
    assert text == expected and text


def test_the_command_serves_chat_with_an_exported_folders_template(run_dir, tmp_path, tokenizer):
    """`egmla serve --run EXPORTED` takes the folder's chat_template.jinja (transformers writes templates there): the
    start line names it, and chat answers are the completions of what it renders (its bos_token the tokenizer's)."""
    from egmla.hf.export import export_hf

    folder = export_hf(run_dir, tmp_path / "exported")
    (folder / "chat_template.jinja").write_text("{{ bos_token }}" + TEMPLATE)
    command = [sys.executable, "-m", "egmla", "serve", "--run", str(folder), "--port", "0", "--max-batch", "2",
               "--decode-path", "gate-table", "--max-len", "32"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        url = re.search(r"(http://[\d.]+:\d+)/v1 ", first)
        if not (url and f"chat template {folder / 'chat_template.jinja'}" in first):
            process.kill()  # first: its stderr ends only with it
            pytest.fail(first + process.stderr.read())

        class Remote:  # what base.call needs of a server
            pass

        remote = Remote()
        remote.url = url.group(1)
        answer = chat(remote, messages=MESSAGES, max_tokens=5, temperature=0, ignore_eos=True)
        completion = base.complete(remote, prompt="<|endoftext|>" + rendered(MESSAGES), max_tokens=5, temperature=0,
                                   ignore_eos=True)
        assert answer["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
        assert answer["usage"] == completion["usage"]
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0


def test_the_command_refuses_a_chat_template_that_is_neither_file_nor_template(capsys, run_dir):
    from egmla.cli import main as egmla_main

    assert egmla_main(["serve", "--run", str(run_dir), "--port", "0", "--chat-template", "missing.jinja"]) == 2
    assert "--chat-template 'missing.jinja': no such file, and not a template" in capsys.readouterr().err
    assert egmla_main(["serve", "--run", str(run_dir), "--port", "0", "--chat-template", "{% if %}"]) == 2
    assert "--chat-template: not a Jinja template: line 1" in capsys.readouterr().err
    # before the weights load: a run that cannot load does not hide the template's error
    assert egmla_main(["serve", "--run", str(run_dir / "nowhere"), "--port", "0", "--chat-template", "{% if %}"]) == 2
    assert "--chat-template: not a Jinja template: line 1" in capsys.readouterr().err
