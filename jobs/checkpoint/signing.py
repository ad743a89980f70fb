"""Who wrote a checkpoint or an export: an HMAC-SHA256 (RFC 2104, Python's `hmac`) under the
account's signing key (cluster/credentials.py) over what its markers record (each file's size and
sha256) and which part it is (a checkpoint's rank).

The sha256 markers alone prove integrity, not authorship: whoever can write the run's storage can
rewrite them too. The key never enters the storage, so a checkpoint that verifies was written by
a process that holds it, and only then is anything in it unpickled. A checkpoint's step is in
its signed job state, so a genuine checkpoint replayed under a later step's name is caught by
comparing the two (checkpoint/files.py), while a copy under any other name still loads.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field

from cluster.credentials import signing_key

KEY_ID, MAC = "key_id", "hmac_sha256"
ACCEPT_UNSIGNED = "train.accept_unsigned_checkpoints"  # the one option that loads checkpoints made before signing


class SignatureError(RuntimeError):
    """A checkpoint or export that this account's key did not sign."""


@dataclass(frozen=True)
class Signer:
    key: bytes = field(repr=False)
    accept_unsigned: bool = False  # ACCEPT_UNSIGNED: what older releases wrote, for one release

    @classmethod
    def of_account(cls, accept_unsigned: bool = False) -> Signer:
        """This account's signer: $AIAYN_SIGNING_KEY, else the key file (cluster/credentials.py)."""
        return cls(signing_key(), accept_unsigned)

    @property
    def key_id(self) -> str:
        """Names the key (not the secret) so that a refusal can say 'signed with another key'."""
        return hashlib.sha256(b"aiayn signing key id\0" + self.key).hexdigest()[:12]

    def _mac(self, kind: str, name: str, record: dict) -> str:
        message = json.dumps({"kind": kind, "name": name, "record": record}, sort_keys=True, separators=(",", ":"))
        return hmac.new(self.key, message.encode(), hashlib.sha256).hexdigest()

    def sign(self, kind: str, name: str, record: dict) -> dict[str, str]:
        """The signature of `record` (JSON-able) written as `kind` under `name`."""
        return {KEY_ID: self.key_id, MAC: self._mac(kind, name, record)}

    def check(self, kind: str, name: str, record: dict, signature: dict | None, where: str) -> None:
        """Raise SignatureError (one line naming `where`) unless `signature` is this key's over
        `record` as `kind` `name`. No signature: accepted only with `accept_unsigned`."""
        if signature is None:
            if self.accept_unsigned:
                return
            raise SignatureError(f"{where} is not signed (written before aiayn signed its {kind}s, or not by aiayn); "
                                 f"not loading it: set {ACCEPT_UNSIGNED}=true to load an older release's {kind}s "
                                 "you wrote yourself")
        if not isinstance(signature, dict) or signature.get(KEY_ID) != self.key_id:
            found = signature.get(KEY_ID) if isinstance(signature, dict) else None
            raise SignatureError(f"{where} is signed with another key ({found!r}, this account's is {self.key_id}); "
                                 "not loading it: give the key that wrote it as AIAYN_SIGNING_KEY")
        if not hmac.compare_digest(str(signature.get(MAC, "")), self._mac(kind, name, record)):
            raise SignatureError(f"{where}: its signature does not match what it records (changed or forged after "
                                 "it was written); not loading it")
