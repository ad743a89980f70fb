"""Who wrote a checkpoint or an export: the account's signing key and what it signs.

The checkpoint side with a stand-in engine: tests/jobs/test_rank_start.py; planted by another
account into a real run: tests/faults/test_planted_checkpoint.py."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from cluster.credentials import SIGNING_KEY_ENV, aiayn_home
from data_pipeline.errors import InputError
from jobs.checkpoint.signing import SignatureError, Signer
from jobs.inference.export import WEIGHTS, verify_export, write_export
from transformer import build_model, preset


def test_the_accounts_key_is_made_once_private_and_never_replaced(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("AIAYN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    first = Signer.of_account()
    key = aiayn_home() / "credentials" / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert Signer.of_account().key_id == first.key_id and len(first.key) >= 32
    assert first.key.decode() not in repr(first)  # a signer printed in a traceback shows no key
    key.chmod(0o640)
    with pytest.raises(InputError, match="signing.key: the signing key must be this account's with mode 0600"):
        Signer.of_account()
    key.chmod(0o600)
    monkeypatch.setenv(SIGNING_KEY_ENV, "shared-by-the-team-" + "x" * 20)  # the user's own, for a shared bucket
    assert Signer.of_account().key_id != first.key_id
    monkeypatch.setenv(SIGNING_KEY_ENV, "short")
    with pytest.raises(InputError, match=f"{SIGNING_KEY_ENV}: a signing key needs at least 32 characters"):
        Signer.of_account()


def test_a_signed_export_verifies_and_a_changed_or_foreign_one_does_not(tmp_path) -> None:
    signer = Signer(b"the account's own signing key, 32+ bytes")
    model = build_model(preset("tiny", vocab_size=32, d_model=16, d_ff=32, n_layers=1, n_heads=2, max_positions=16))
    export = write_export(model, b"tokenizer", {"step": 3}, tmp_path / "export", signer)
    verify_export(export, signer)
    with pytest.raises(SignatureError, match="signed with another key"):
        verify_export(export, Signer(b"another account's signing key, 32+ bytes"))
    unsigned = write_export(model, b"tokenizer", {"step": 3}, tmp_path / "unsigned")
    with pytest.raises(SignatureError, match="is not signed"):
        verify_export(unsigned, signer)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    os.replace(write_export(model, b"tokenizer", {"step": 3}, tmp_path / "other") / WEIGHTS, export / WEIGHTS)
    with pytest.raises(SignatureError, match="signature does not match"):  # the weights swapped under its record
        verify_export(export, signer)
