"""API keys: entry parsing, scopes, constant-time lookup, key sources (environment and a rotated file)."""

from __future__ import annotations

import os

import pytest

from deployments.auth import (
    ADMIN,
    INFERENCE,
    ApiKeys,
    AuthConfigError,
    AuthFailure,
    Caller,
    KeySource,
    key_id,
    parse_entries,
)

A = "sk-inference-aaaaaaaaaaaa"
B = "sk-admin-bbbbbbbbbbbbbbbb"
C = "sk-both-cccccccccccccccccc"


def keys() -> ApiKeys:
    return ApiKeys(parse_entries(f"{A}, admin:{B}\nadmin+inference:{C}  # ops", "test"))


def test_entries_name_scopes_and_default_to_inference():
    parsed = parse_entries(f"{A}\nadmin:{B} all:{C}\n# a comment\n\n", "test")
    assert parsed == {A: {INFERENCE}, B: {ADMIN}, C: {INFERENCE, ADMIN}}
    assert parse_entries("weird:prefix-0123456789abcdef", "t") == {"weird:prefix-0123456789abcdef": {INFERENCE}}


def test_short_keys_are_refused_without_echoing_them():
    with pytest.raises(AuthConfigError) as info:
        parse_entries("admin:short", "$KEYS")
    assert "short" not in str(info.value) and "$KEYS, line 1" in str(info.value)


@pytest.mark.parametrize(
    "header, scope, status",
    [
        (None, INFERENCE, 401),
        ("", INFERENCE, 401),
        (A, INFERENCE, 401),  # no scheme
        (f"Basic {A}", INFERENCE, 401),
        ("Bearer sk-unknown-000000000000", INFERENCE, 401),
        (f"Bearer {A}x", INFERENCE, 401),
        (f"Bearer {A}", ADMIN, 403),
        (f"Bearer {B}", INFERENCE, 403),
    ],
)
def test_refusals(header, scope, status):
    verdict = keys().authorize(header, scope)
    assert isinstance(verdict, AuthFailure) and verdict.status == status
    assert A not in verdict.message and B not in verdict.message


def test_granted_callers_are_named_by_key_id_only():
    ok = keys().authorize(f"bearer  {C} ", ADMIN)
    assert ok == Caller(key_id(C), frozenset({INFERENCE, ADMIN}))
    assert keys().authorize(f"Bearer {A}", INFERENCE).key_id == key_id(A) != key_id(B)
    assert C not in repr(ok)


def test_no_keys_is_a_configuration_error():
    with pytest.raises(AuthConfigError):
        ApiKeys({})
    with pytest.raises(AuthConfigError, match=r"\$NOPE"):
        KeySource("NOPE", None, environ={})


def test_keys_from_environment_and_file_and_rotation(tmp_path):
    secret = tmp_path / "keys"
    secret.write_text(f"admin:{B}\n")
    source = KeySource("KEYS", str(secret), recheck_s=0.0, environ={"KEYS": A})
    assert isinstance(source.current().authorize(f"Bearer {A}", INFERENCE), Caller)
    assert isinstance(source.current().authorize(f"Bearer {B}", ADMIN), Caller)
    secret.write_text(f"admin:{C}\n")  # the secret was rotated
    os.utime(secret, ns=(1, 10**18))
    now = source.current()
    assert isinstance(now.authorize(f"Bearer {B}", ADMIN), AuthFailure)
    assert isinstance(now.authorize(f"Bearer {C}", ADMIN), Caller)
    secret.write_text("admin:tiny\n")  # a bad rewrite keeps the keys in force
    os.utime(secret, ns=(2, 2 * 10**18))
    assert isinstance(source.current().authorize(f"Bearer {C}", ADMIN), Caller)
