"""Reading OpenAI request bodies for the local runtime: what it honours (logprobs, logit_bias) and
what it refuses by name (tools it would have to call, response formats, image parts)."""

from __future__ import annotations

import pytest

from concilium.specialists.runtime.openai_adapter import RequestError, sampling_params, unsupported_feature

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _params(**body):
    return sampling_params({"messages": USER, **body}, default_max_tokens=8, vocab_size=100)


def test_logprobs_and_logit_bias_are_read():
    p = _params(logprobs=True, top_logprobs=5, logit_bias={"7": -100, "12": 3.5})
    assert p.logprobs and p.top_logprobs == 5 and p.logit_bias == {7: -100.0, 12: 3.5}
    p = _params()
    assert not p.logprobs and p.top_logprobs == 0 and p.logit_bias == {} and not p.json_object
    assert _params(response_format={"type": "json_object"}).json_object


@pytest.mark.parametrize(
    "body, param",
    [
        (dict(top_logprobs=3), "top_logprobs"),  # needs logprobs: true
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(logprobs="yes"), "logprobs"),
        (dict(logit_bias={"100": 1}), "logit_bias"),  # outside the vocabulary
        (dict(logit_bias={"x": 1}), "logit_bias"),
        (dict(logit_bias={"5": 200}), "logit_bias"),
        (dict(logit_bias=[1, 2]), "logit_bias"),
    ],
)
def test_bad_logprobs_and_logit_bias_name_the_parameter(body, param):
    with pytest.raises(RequestError) as e:
        _params(**body)
    assert e.value.param == param


@pytest.mark.parametrize(
    "body, param",
    [
        (dict(tools=TOOLS, tool_choice="required"), "tool_choice"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}), "tool_choice"),
        (dict(functions=[TOOLS[0]["function"]], function_call={"name": "get_weather"}), "function_call"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}), "response_format"),
        (dict(modalities=["text", "audio"]), "modalities"),
        (
            dict(messages=[{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]}]),
            "messages[0].content[1]",
        ),
    ],
)
def test_features_the_local_model_cannot_honour(body, param):
    err = unsupported_feature({"messages": USER, **body})
    assert err is not None and err.param == param and err.code == "unsupported_parameter"


@pytest.mark.parametrize(
    "body",
    [
        dict(),
        dict(tools=TOOLS),  # tool_choice auto: answering in text is a valid answer
        dict(tools=TOOLS, tool_choice="auto"),
        dict(tools=TOOLS, tool_choice="none"),
        dict(response_format={"type": "text"}),
        dict(response_format={"type": "json_object"}),
        dict(logprobs=True, top_logprobs=2, logit_bias={"3": 1}),
        dict(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
        dict(modalities=["text"]),
    ],
)
def test_features_the_local_model_serves(body):
    assert unsupported_feature({"messages": USER, **body}) is None


def test_penalties_are_read_and_checked():
    p = _params(presence_penalty=0.5, frequency_penalty=-1)
    assert (p.presence_penalty, p.frequency_penalty) == (0.5, -1.0)
    for key in ("presence_penalty", "frequency_penalty"):
        with pytest.raises(RequestError) as e:
            _params(**{key: 3})
        assert e.value.param == key
