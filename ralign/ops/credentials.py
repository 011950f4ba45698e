"""The one rule for credentials in text: what counts as a secret, and how it is hidden.

Two shapes are secrets: the user-info part of a URI (`scheme://user:password@host`, or `scheme://token@host`), and
the value of a setting whose name says it holds one (`MLFLOW_TRACKING_PASSWORD`, `api_key`, ...). Error messages,
logs, reports, MLflow params and rendered manifests all go through these functions, so what one of them hides, none
of them repeats.
"""

from __future__ import annotations

import re

# scheme://<anything without / @ whitespace or quotes>@  (an empty user-info part is harmless and matches too)
_URI_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]*@")
CREDENTIAL_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY", re.I)


def redact_credentials(text) -> str:
    """`text` as a string, with every URI's `user:password@` (or `token@`) part replaced by `***@`."""
    return _URI_USERINFO.sub(r"\1***@", str(text))


def has_credentials(text: str) -> bool:
    """Whether `text` holds a URI with a user-info part (what `redact_credentials` would hide)."""
    return bool(_URI_USERINFO.search(text))


def is_credential_name(name: str) -> bool:
    """Whether a setting called `name` holds a secret by its name (its value must never be recorded)."""
    return bool(CREDENTIAL_NAME.search(str(name)))
