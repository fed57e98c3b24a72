"""values.check_json_object: the size limit is the compact JSON size, exactly.

Its running bounds avoid encoding every payload twice (the store encodes it once more), but
they must never change the answer: a value is accepted iff its JSON is within the limit. (An
earlier bound counted every integer as 20 bytes: 120 KB of small integers was refused as
"larger than 1 MiB".)"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import wire_json_objects

from dspy_infra.errors import SpecError
from dspy_infra.values import check_json_object, json_text


def _size(value: Any) -> int:
    return len(json_text(value).encode("utf-8"))


@given(doc=wire_json_objects, slack=st.integers(min_value=-40, max_value=40))
def test_accepted_iff_the_json_fits_the_limit(doc: dict[str, Any], slack: int) -> None:
    exact = _size(doc)
    limit = max(0, exact + slack)
    if exact <= limit:
        assert check_json_object(doc, "payload", max_bytes=limit) == doc
    else:
        with pytest.raises(SpecError, match="bytes"):
            check_json_object(doc, "payload", max_bytes=limit)


def test_many_small_numbers_are_measured_as_written() -> None:
    doc = {"xs": [1] * 60_000, "fs": [0.5] * 1000}
    assert _size(doc) < 200_000
    assert check_json_object(doc, "payload", max_bytes=1 << 20) == doc


def test_escaped_characters_count_as_their_escapes() -> None:
    doc = {"c": "\x01" * 100}  # each is "\u0001": 6 bytes
    assert _size(doc) == 6 * 100 + len('{"c":""}')
    check_json_object(doc, "payload", max_bytes=_size(doc))
    with pytest.raises(SpecError, match="bytes"):
        check_json_object(doc, "payload", max_bytes=_size(doc) - 1)


@given(
    doc=st.dictionaries(
        st.one_of(st.text(max_size=8), st.sampled_from(["", "k" * 257, "a\x00", "\ud800"])),
        st.one_of(st.text(max_size=30), st.sampled_from(["", "\x00", "\ud800x", "é" * 50]), st.integers()),
        max_size=6,
    ),
    limit=st.integers(min_value=2, max_value=400),
)
def test_the_flat_string_map_fast_path_accepts_and_refuses_exactly_what_the_walk_does(
    doc: dict[Any, Any], limit: int
) -> None:
    """``check_json_object`` answers a plain dict of strings without the full walk; a
    read-only view of the same dict takes the walk. Same copy, or the same refusal."""
    from types import MappingProxyType

    try:
        walked: Any = check_json_object(MappingProxyType(doc), "payload", max_bytes=limit)
    except SpecError as exc:
        walked = ("refused", str(exc))
    try:
        fast: Any = check_json_object(doc, "payload", max_bytes=limit)
    except SpecError as exc:
        fast = ("refused", str(exc))
    assert fast == walked
    if isinstance(fast, dict):
        assert fast is not doc
