"""Instruction messages: plain text, JSON with overrides, and every way to get them wrong."""

from __future__ import annotations

import re

import pytest

from ptp_ros.ros.requests import Request, RequestError, parse_request


def parse(data: str) -> Request:
    return parse_request(data, default_id="agent-7", max_chars=100)


def test_plain_text_gets_the_default_id():
    assert parse("  Where is the cup? ") == Request(id="agent-7", text="Where is the cup?")


def test_json_with_every_field():
    r = parse('{"id": 12, "text": "Count chairs", "max_new_tokens": 16, "latency_budget_ms": 800, "keep_ratio": 0.3}')
    assert r == Request(id="12", text="Count chairs", max_new_tokens=16, latency_budget_ms=800.0, keep_ratio=0.3)
    assert parse('{"text": "only text"}') == Request(id="agent-7", text="only text")


@pytest.mark.parametrize(
    "data, reason, request_id",
    [
        ("", "empty", None),
        ("x" * 101, "limit is 100", None),
        ("{not json", "not valid JSON", None),
        ("[1, 2]", None, None),  # not JSON-looking: plain text
        ('{"id": "a", "text": "hi", "keep_raito": 0.5}', "unknown field(s) keep_raito", "a"),
        ('{"id": "b"}', "string field 'text'", "b"),
        ('{"id": "c", "text": "hi", "keep_ratio": 0}', "keep_ratio must be in (0, 1]", "c"),
        ('{"id": "d", "text": "hi", "keep_ratio": 1.5}', "keep_ratio", "d"),
        ('{"id": "e", "text": "hi", "max_new_tokens": 2.5}', "integer", "e"),
        ('{"id": "f", "text": "hi", "max_new_tokens": true}', "integer", "f"),
        ('{"id": "g", "text": "hi", "latency_budget_ms": -5}', "latency_budget_ms", "g"),
        (
            '{"id": "h", "text": "hi", "latency_budget_ms": "fast"}',
            "latency_budget_ms must be in (0.0, 3600000.0]",
            "h",
        ),
        ('{"id": [1], "text": "hi"}', "id must be", None),
        ('{"id": "i", "text": "   "}', "empty", "i"),
    ],
)
def test_bad_instructions_are_refused_with_a_reason(data, reason, request_id):
    if reason is None:
        assert parse(data).text == data
        return
    with pytest.raises(RequestError, match=re.escape(reason)) as info:
        parse(data)
    assert info.value.request_id == request_id
