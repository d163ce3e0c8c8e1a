"""SamplingParams validation: every invalid value names its OpenAI field and the value."""
import math

import pytest

from tpaserve.sampling_params import SamplingParams, SamplingParamsError

INVALID = [
    ("n", 0), ("n", 129), ("n", 1.5),
    ("max_tokens", -1),
    ("temperature", -0.5), ("temperature", math.nan), ("temperature", math.inf),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan),
    ("top_k", -2),
    ("min_p", -0.1), ("min_p", 1.5),
    ("logprobs", 21), ("logprobs", -1),
    ("prompt_logprobs", 21),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.01), ("frequency_penalty", -math.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", math.nan),
    ("min_tokens", -1),
    ("ignore_eos", "yes"),
    ("seed", 2**64),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_value_names_field_and_value(field, value):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field
    assert field in str(e.value) and repr(value) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_min_tokens_above_max_tokens():
    with pytest.raises(SamplingParamsError, match=r"min_tokens .*max_tokens \(4\).*got 5") as e:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert e.value.param == "min_tokens"
    SamplingParams(max_tokens=None, min_tokens=5)          # no limit: fine


@pytest.mark.parametrize("bias", [{3: 100.5}, {3: math.nan}, {-1: 1.0}, {"x": 1.0}])
def test_invalid_logit_bias(bias):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(logit_bias=bias)
    assert e.value.param == "logit_bias"


def test_invalid_stop_token_id_names_the_element():
    with pytest.raises(SamplingParamsError, match=r"stop_token_ids must be >= 0, got -3") as e:
        SamplingParams(stop_token_ids=[4, -3])
    assert e.value.param == "stop_token_ids"


@pytest.mark.parametrize("stop", [[""], [3], 7])
def test_invalid_stop(stop):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(stop=stop)
    assert e.value.param == "stop"


def test_normalisation_and_hashable():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[5, 6], logit_bias={"9": 1, 2: -3.5},
                       temperature=1, max_tokens=0)
    assert p.stop == ("a", "b") and p.stop_token_ids == (5, 6)
    assert p.logit_bias == ((2, -3.5), (9, 1.0))
    assert isinstance(p.temperature, float)
    assert SamplingParams(stop="x").stop == ("x",)
    assert hash(p) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(5, 6),
                                          logit_bias=((2, -3.5), (9, 1.0)), max_tokens=0))


def test_greedy_and_edges_accepted():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy
    for kw in [dict(top_k=-1), dict(top_p=1.0), dict(min_p=1.0), dict(logprobs=20),
               dict(logprobs=0), dict(presence_penalty=-2), dict(seed=-5)]:
        SamplingParams(**kw)


def test_verify_vocab():
    SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[99]).verify_vocab(100)
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(stop_token_ids=[100]).verify_vocab(100)
    assert e.value.param == "stop_token_ids" and "100" in str(e.value)
