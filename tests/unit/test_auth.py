"""auth: the challenge-response proof, its check, nonces, and reading secrets."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from clusterd.core.auth import (
    MIN_SECRET_BYTES,
    ROLES,
    SecretError,
    load_secret,
    new_nonce,
    proof,
    verify,
)

SECRET = b"0123456789abcdef-secret"
NONCE = "00112233445566778899aabbccddeeff"


# -- proof ---------------------------------------------------------------------------------------


def test_proof_is_deterministic():
    """The same secret, nonce and role always give the same proof."""
    assert proof(SECRET, NONCE, "client") == proof(SECRET, NONCE, "client")


def test_proof_is_hmac_sha256_of_the_documented_message():
    """The proof is lower-case hex HMAC-SHA256(secret, "clusterd-auth:<role>:<nonce>"), as
    SECURITY.md documents for third-party clients."""
    expected = hmac.new(SECRET, f"clusterd-auth:worker:{NONCE}".encode(), hashlib.sha256)
    assert proof(SECRET, NONCE, "worker") == expected.hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", proof(SECRET, NONCE, "worker"))


def test_proof_is_bound_to_the_role():
    """A client proof is not a worker proof for the same secret and nonce."""
    assert proof(SECRET, NONCE, "client") != proof(SECRET, NONCE, "worker")
    assert not verify(SECRET, NONCE, "worker", proof(SECRET, NONCE, "client"))
    assert not verify(SECRET, NONCE, "client", proof(SECRET, NONCE, "worker"))


def test_proof_is_bound_to_the_nonce():
    """A proof made for one connection's nonce fails on another's (no replay)."""
    other = "ffeeddccbbaa99887766554433221100"
    assert proof(SECRET, NONCE, "client") != proof(SECRET, other, "client")
    assert not verify(SECRET, other, "client", proof(SECRET, NONCE, "client"))


def test_proof_is_bound_to_the_secret():
    """A proof made with another secret fails."""
    assert not verify(SECRET, NONCE, "client", proof(SECRET + b"x", NONCE, "client"))


# -- verify --------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_verify_accepts_the_right_proof(role):
    """verify() accepts the proof made with the same secret, nonce and role."""
    assert verify(SECRET, NONCE, role, proof(SECRET, NONCE, role)) is True


GOOD = proof(SECRET, NONCE, "client")


@pytest.mark.parametrize(
    "given",
    [
        "",
        GOOD[:-1],
        GOOD[:32],
        GOOD + "0",
        GOOD.upper(),
        " " + GOOD,
        "0" * 64,
        "é" * 64,
        GOOD[:-1] + "é",
        "\ud800" * 64,
        "\x00" * 64,
        "not hex at all",
    ],
    ids=[
        "empty",
        "truncated-by-one",
        "truncated-half",
        "one-too-long",
        "upper-case",
        "leading-space",
        "zeros",
        "non-ascii",
        "last-char-non-ascii",
        "lone-surrogates",
        "nul-bytes",
        "text",
    ],
)
def test_verify_rejects_wrong_proofs_without_raising(given):
    """Empty, truncated, padded, non-ASCII and otherwise wrong proofs are False, never an
    exception (hmac.compare_digest raises TypeError on non-ASCII str, so this must be handled)."""
    assert verify(SECRET, NONCE, "client", given) is False


# -- nonces --------------------------------------------------------------------------------------


def test_new_nonce_is_32_lower_case_hex_characters():
    """A nonce is 16 random bytes written as 32 lower-case hex digits."""
    assert re.fullmatch(r"[0-9a-f]{32}", new_nonce())


def test_new_nonce_differs_on_every_call():
    """Every call gives a fresh nonce, so no two connections share one."""
    nonces = {new_nonce() for _ in range(200)}
    assert len(nonces) == 200


# -- load_secret ---------------------------------------------------------------------------------

ENV = "CLUSTERD_TEST_SECRET"
LONG = "k" * MIN_SECRET_BYTES


@pytest.fixture
def env(monkeypatch):
    """The test's environment variable, unset at the start of every test."""
    monkeypatch.delenv(ENV, raising=False)
    return monkeypatch


def test_load_secret_reads_a_file_and_strips_whitespace(tmp_path, env):
    """A secret file's surrounding whitespace (the newline editors add) is not part of it."""
    path = tmp_path / "client.secret"
    path.write_bytes(b"  \n" + LONG.encode() + b"-tail\r\n\t ")
    assert load_secret(str(path), ENV) == LONG.encode() + b"-tail"


def test_load_secret_keeps_inner_bytes_as_they_are(tmp_path, env):
    """Bytes inside the secret (spaces, non-ASCII) are kept: only the ends are stripped."""
    raw = b"a b\xff\x00" + LONG.encode()
    path = tmp_path / "s"
    path.write_bytes(raw + b"\n")
    assert load_secret(str(path)) == raw


def test_load_secret_reads_the_environment_variable(env):
    """With no file, the environment variable is used, stripped and encoded as UTF-8."""
    env.setenv(ENV, f" {LONG}é\n")
    assert load_secret(None, ENV) == (LONG + "é").encode()


def test_load_secret_prefers_the_file_to_the_environment(tmp_path, env):
    """When both are set the file wins."""
    path = tmp_path / "s"
    path.write_text("f" * 20)
    env.setenv(ENV, "e" * 20)
    assert load_secret(str(path), ENV) == b"f" * 20


def test_load_secret_missing_file_is_an_error_even_with_the_environment_set(tmp_path, env):
    """A named file that cannot be read is a SecretError naming it, not a silent fallback to the
    environment."""
    env.setenv(ENV, "e" * 20)
    missing = tmp_path / "nope.secret"
    with pytest.raises(SecretError, match="nope.secret"):
        load_secret(str(missing), ENV)


def test_load_secret_directory_is_an_error(tmp_path, env):
    """A path that is not a readable file (here a directory) is a SecretError."""
    with pytest.raises(SecretError):
        load_secret(str(tmp_path))


def test_secret_error_is_a_value_error():
    """SecretError is a ValueError, so option parsing reports it as a usage error."""
    assert issubclass(SecretError, ValueError)


@pytest.mark.parametrize("size, ok", [(MIN_SECRET_BYTES - 1, False), (MIN_SECRET_BYTES, True)])
def test_load_secret_minimum_length_from_a_file(tmp_path, env, size, ok):
    """A secret file holding fewer than 16 bytes (after stripping) is a SecretError; 16 is fine."""
    path = tmp_path / "s"
    path.write_bytes(b"x" * size + b"\n")
    if ok:
        assert load_secret(str(path)) == b"x" * size
    else:
        with pytest.raises(SecretError, match="shorter than 16 bytes"):
            load_secret(str(path))


@pytest.mark.parametrize("size, ok", [(MIN_SECRET_BYTES - 1, False), (MIN_SECRET_BYTES, True)])
def test_load_secret_minimum_length_from_the_environment(env, size, ok):
    """The same 16-byte minimum applies to a secret from the environment."""
    env.setenv(ENV, "y" * size)
    if ok:
        assert load_secret(None, ENV) == b"y" * size
    else:
        with pytest.raises(SecretError, match=ENV):
            load_secret(None, ENV)


def test_load_secret_empty_file_is_an_error(tmp_path, env):
    """A secret file holding only whitespace is too short, not "no secret"."""
    path = tmp_path / "s"
    path.write_bytes(b" \n\n")
    with pytest.raises(SecretError):
        load_secret(str(path))


def test_load_secret_with_neither_is_none(env):
    """No file and no (or an empty) environment variable: None, meaning the role is open."""
    assert load_secret() is None
    assert load_secret(None, None) is None
    assert load_secret(None, ENV) is None
    assert load_secret("", ENV) is None
    env.setenv(ENV, "")
    assert load_secret(None, ENV) is None
