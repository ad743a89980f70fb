"""Credentials out of what is printed, logged or shipped: URIs with a user-info part and
secret-looking query or fragment parameters. Standard library only: the set-up script
(jobs/bootstrap.py) uses it before anything is installed."""

from __future__ import annotations

import re
from typing import Any

# `sig` alone: the signature of an Azure shared-access URL (...?sv=...&sig=...). A fragment too
# (`#access_token=...`, OAuth's implicit grant).
_SECRET_PARAMETER = re.compile(
    r"([?&#](?:[^=&#]*(?:token|secret|password|passwd|pwd|key|signature|credential|auth)[^=&#]*|sig)=)[^&#\s]*",
    re.IGNORECASE)
# scheme://user:password@host: everything before the last `@` of the authority (a password may hold `@`)
_USER_INFO = re.compile(r"(\w[\w+.-]*://)[^/\s]*@")


def redact(text: str) -> str:
    """A URI (or any string) safe to print or log: credentials in its user-info part and
    secret-looking parameters are replaced by ***."""
    return _SECRET_PARAMETER.sub(r"\1***", _USER_INFO.sub(r"\1***@", text))


def redact_tree(value: Any) -> Any:
    """A JSON-like tree (a manifest, a config) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_tree(item) for item in value]
    return value
