"""Request bodies carry no NUL characters: PostgreSQL's text columns refuse them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from control_plane.api.schemas import EnrollRequest, TokenCreate


@pytest.mark.parametrize(
    "make",
    [
        lambda: TokenCreate(name="\x00\x99", role="operator"),  # found by schemathesis: a 500
        lambda: EnrollRequest(
            token="edenr_" + "x" * 40,
            public_key="ab" * 32,
            proof="cd" * 64,
            software_version="1\x00",
        ),
    ],
)
def test_text_with_a_nul_is_refused_in_one_sentence(make) -> None:
    with pytest.raises(ValidationError, match="text must not contain NUL characters"):
        make()


def test_ordinary_text_passes() -> None:
    assert TokenCreate(name="ops on-call ü", role="viewer").name == "ops on-call ü"
