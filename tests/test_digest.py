"""Digest parsing, hashing and the file-name safety guarantee."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from puller.digest import ALGORITHMS, Digest
from puller.errors import InvalidDigest

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
EMPTY_SHA512 = hashlib.sha512(b"").hexdigest()
H64 = "a" * 64


@pytest.mark.parametrize("text, algorithm, hexpart", [
    (f"sha256:{EMPTY_SHA256}", "sha256", EMPTY_SHA256),
    (f"sha256:{'0123456789abcdef' * 4}", "sha256", "0123456789abcdef" * 4),
    (f"sha512:{EMPTY_SHA512}", "sha512", EMPTY_SHA512),
])
def test_parse_good(text: str, algorithm: str, hexpart: str) -> None:
    d = Digest.parse(text)
    assert (d.algorithm, d.hex) == (algorithm, hexpart)
    assert str(d) == text
    assert d.short == hexpart[:12]
    assert Digest.parse(str(d)) == d


@pytest.mark.parametrize("text, fragment", [
    ("", "expected 'algorithm:hex'"),
    (H64, "expected 'algorithm:hex'"),
    (f"sha256:{'A' * 64}", "lowercase"),
    (f"sha256:{EMPTY_SHA256.upper()}", "lowercase"),
    (f"SHA256:{H64}", "unsupported digest algorithm"),
    (f"md5:{'a' * 32}", "unsupported digest algorithm"),
    (f"sha384:{'a' * 96}", "unsupported digest algorithm"),
    (f"sha256:{'a' * 63}", "length"),
    (f"sha256:{'a' * 65}", "length"),
    (f"sha256:{'a' * 128}", "length"),
    (f"sha512:{H64}", "length"),
    ("sha256:", "length"),
    (f"sha256:{'g' * 64}", "lowercase"),
    (f"sha256:{'a' * 62}..", "lowercase"),
    (f"sha256:../../{'a' * 58}", "lowercase"),
    (f"sha256:{'a' * 63}/", "lowercase"),
    (f"sha256: {'a' * 63}", "lowercase"),
    (f"sha256:{H64}\n", "length"),
    (f" sha256:{H64}", "unsupported digest algorithm"),
    (f"sha256::{'a' * 63}", "lowercase"),
    (f"sha256-{H64}", "expected 'algorithm:hex'"),
    (f"sha256:{'a' * 63}\u0660", "lowercase"),  # Arabic-Indic zero: isdigit() but not hex
])
def test_parse_bad(text: str, fragment: str) -> None:
    with pytest.raises(InvalidDigest) as e:
        Digest.parse(text)
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg


@pytest.mark.parametrize("value", [None, 42, b"sha256:" + H64.encode(), ["sha256", H64]])
def test_parse_refuses_non_str(value: object) -> None:
    with pytest.raises(InvalidDigest, match="must be a string"):
        Digest.parse(value)  # type: ignore[arg-type]


def test_error_message_truncates_long_input() -> None:
    with pytest.raises(InvalidDigest) as e:
        Digest.parse("sha256:" + "x" * 10_000)
    assert len(str(e.value)) < 250


@pytest.mark.parametrize("algorithm, hexpart", [
    ("sha256", "../" + "a" * 61),
    ("sha256", "A" * 64),
    ("sha1", "a" * 40),
    ("sha256", "a" * 10),
])
def test_direct_construction_is_validated(algorithm: str, hexpart: str) -> None:
    # Paths are built from .hex, so even a hand-built Digest must be safe.
    with pytest.raises(InvalidDigest):
        Digest(algorithm, hexpart)


def test_from_bytes_known_vectors() -> None:
    assert str(Digest.from_bytes(b"")) == f"sha256:{EMPTY_SHA256}"
    assert Digest.from_bytes(b"", "sha512").hex == EMPTY_SHA512
    assert Digest.from_bytes(b"abc") == Digest.parse(
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    with pytest.raises(InvalidDigest):
        Digest.from_bytes(b"", "md5")


def test_hasher_is_fresh_and_matching() -> None:
    d = Digest.from_bytes(b"hello")
    h = d.hasher()
    h.update(b"hel")
    h.update(b"lo")
    assert h.hexdigest() == d.hex
    assert d.hasher().hexdigest() == EMPTY_SHA256  # a new object each time
    assert Digest.from_bytes(b"x", "sha512").hasher().name == "sha512"


def test_hashable_and_frozen() -> None:
    d = Digest.parse(f"sha256:{H64}")
    assert {d, Digest("sha256", H64)} == {d}
    with pytest.raises(AttributeError):
        d.hex = "b" * 64  # type: ignore[misc]


@given(st.binary(max_size=256), st.sampled_from(sorted(ALGORITHMS)))
def test_property_round_trip(data: bytes, algorithm: str) -> None:
    d = Digest.from_bytes(data, algorithm)
    assert Digest.parse(str(d)) == d
    assert d.hex == hashlib.new(algorithm, data).hexdigest()


@given(st.one_of(st.text(max_size=200),
                 st.text(alphabet="sha256:0123456789abcdefABCDEF./ \n", max_size=140)))
def test_property_only_invalid_digest_or_safe(text: str) -> None:
    try:
        d = Digest.parse(text)
    except InvalidDigest as e:
        assert "\n" not in str(e)
        return
    assert re.fullmatch(r"[0-9a-f]+", d.hex) and len(d.hex) == ALGORITHMS[d.algorithm]
    assert str(d) == text
