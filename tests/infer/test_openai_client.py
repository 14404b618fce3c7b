"""`egmla serve` driven by the official `openai` Python client (a dev dependency, imported at module level on purpose:
where it is installed this file must run; the GPU image lacks it, so its GPU runs pass --ignore for this file, as for
tests/hf/test_lm_eval.py). The client parses every answer into its own typed objects, so this checks the shapes as
the SDK reads them: completions and chat, whole and streamed, logprobs, usage, models, and errors as exceptions."""
import openai
import pytest

import tests.infer.test_chat as chat_tests  # its template and messages (module import: pytest collects nothing twice)
import tests.infer.test_server as base

MODEL = base.MODEL


@pytest.fixture(scope="module")
def client(tokenizer):
    with base.serving(tokenizer, chat_template=chat_tests.TEMPLATE) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60), server


def test_completions_as_the_sdk_reads_them(client):
    sdk, server = client
    answer = sdk.completions.create(model=MODEL, prompt=base.PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    raw = base.complete(server, model=MODEL, prompt=base.PROMPT, max_tokens=6, temperature=0, logprobs=2,
                        ignore_eos=True)
    choice = answer.choices[0]
    assert answer.object == "text_completion" and choice.text == raw["choices"][0]["text"]
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == 6
    assert choice.logprobs.tokens == raw["choices"][0]["logprobs"]["tokens"]
    assert choice.logprobs.token_logprobs == pytest.approx(raw["choices"][0]["logprobs"]["token_logprobs"])
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    pieces = list(sdk.completions.create(model=MODEL, prompt=base.PROMPT, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == choice.text
    assert pieces[-1].usage.completion_tokens == 6


def test_chat_as_the_sdk_reads_it(client):
    sdk, server = client
    body = dict(model=MODEL, messages=chat_tests.MESSAGES, max_completion_tokens=7, temperature=0)
    answer = sdk.chat.completions.create(**body, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    expected = base.complete(server, prompt=chat_tests.rendered(chat_tests.MESSAGES), max_tokens=7, temperature=0,
                             ignore_eos=True)["choices"][0]["text"]
    message = answer.choices[0].message
    assert answer.object == "chat.completion" and message.role == "assistant" and message.content == expected
    content = answer.choices[0].logprobs.content
    assert len(content) == 7 and all(len(entry.top_logprobs) == 2 for entry in content)
    assert bytes(b for entry in content for b in entry.bytes).decode("utf-8", "replace") == expected
    with sdk.chat.completions.create(**body, stream=True, extra_body={"ignore_eos": True}) as chunks:
        deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == expected


def test_models_and_errors_as_the_sdk_reads_them(client):
    sdk, _ = client
    assert [m.id for m in sdk.models.list().data] == [MODEL] and sdk.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("another-model")
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.completions.create(model=MODEL, prompt=base.PROMPT, max_tokens=4, temperature=-1)
    assert refused.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert "messages" in str(refused.value)
