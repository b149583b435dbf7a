"""Request bodies read with limits (selfheal_serving.parsing), without a server."""
from __future__ import annotations

import json

import pytest

from selfheal_core.errors import ClientError
from selfheal_serving.parsing import parse_json
from selfheal_serving.settings import JsonLimits

LIMITS = JsonLimits(max_depth=4)


def parse(text: str):
    return parse_json(text.encode(), LIMITS, 10_000_000)


@pytest.mark.parametrize("text", [
    "[[[[1]]]]",  # at the limit
    '{"a": [[{"b": 1}]]}',
    '["[[[[[[", "{{{{{{{"]',  # brackets inside strings are text
    '[["\\"[[[[[[", "\\\\"], ["]]]]]]"]]',  # escaped quotes and backslashes end no string early
    "[[[[1]]], [[[2]]]]",  # deep twice, never deeper
])
def test_nesting_within_the_limit_is_parsed(text):
    assert parse(text) == json.loads(text)


@pytest.mark.parametrize("text", ["[[[[[1]]]]]", '{"a": [[[{"b": 1}]]]}', '["x", [[[["\\""]]]]]', "[" * 5000])
def test_nesting_beyond_the_limit_is_refused_before_parsing(text):
    with pytest.raises(ClientError, match="nested deeper than 4 levels") as err:
        parse(text)
    assert err.value.code == 400


def test_an_unterminated_string_is_refused_either_way():
    with pytest.raises(ClientError) as err:
        parse('["abc [[[[[[')
    assert err.value.code == 400
