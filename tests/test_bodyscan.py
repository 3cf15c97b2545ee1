"""The top-level scan of large request bodies, without HTTP."""
from __future__ import annotations

import json

import pytest

from aivonx import bodyscan
from aivonx.bodyscan import Large, ScanError, scan_all


def test_small_values_are_decoded_and_large_ones_measured():
    body = json.dumps({"model": "llama3", "stream": False, "options": {"x": [1, {"y": "]"}]},
                       "input": [0] * 100_000, "s": 'a"\\b'}).encode()
    out = scan_all(body)
    assert out["model"] == "llama3" and out["stream"] is False
    assert out["options"] == {"x": [1, {"y": "]"}]} and out["s"] == 'a"\\b'
    assert isinstance(out["input"], Large) and out["input"].kind == "array"
    assert out["input"].size == len(json.dumps([0] * 100_000))
    assert out["input"]  # a large value is never empty


def test_the_scan_yields_while_it_skips_a_large_value():
    body = b'{"model": "m", "x": "' + b"y" * (10 * bodyscan.WINDOW) + b'"}'
    steps = bodyscan.scan(body)
    yields = 0
    while True:
        try:
            next(steps)
            yields += 1
        except StopIteration as done:
            assert done.value["model"] == "m" and done.value["x"].kind == "string"
            break
    assert yields >= 9


@pytest.mark.parametrize("body,error", [
    (b"[1]", "must be a JSON object"),
    (b'{"a": 1} x', "data after"),
    (b'{"a": 1,}', "member name"),
    (b'{"a" 1}', "expected ':'"),
    (b'{"a": [}', "mismatched"),
    (b'{"a": "x', "unterminated string"),
    (b'{"a": [' + b"0," * 100_000, "unterminated array"),
    (b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nested too deeply"),
    (b'{"a": nope}', "unexpected character"),
])
def test_malformed_bodies_are_refused(body: bytes, error: str):
    with pytest.raises(ScanError, match=error):
        scan_all(body)
