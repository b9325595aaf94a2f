"""Secrets out of what sweetspot prints, logs and writes to MLflow.

A tracking URI or a storage path may carry credentials: ``http://user:pass@host:5000``,
``postgresql://user:pass@db/mlflow``, ``s3://key:secret@bucket``, ``https://host/?token=...``.
:func:`redact` replaces the secret parts of every such URI in a text, and leaves the rest as it was:

- a URI's password (``user:***@``), or its whole user part when it has no password (a bare token
  such as ``https://ghp_abc@host`` is a secret as often as a user name is);
- the value of a ``key=value`` parameter whose key names a secret (``token``, ``password``,
  ``secret``, ``api_key``, ``signature``, AWS's ``X-Amz-Credential``, ...), in a query string or in a
  libpq-style ``password=... host=...`` string.

It errs on the side of hiding: a password with a ``/`` in it (which a URI should percent-encode,
but people write anyway) is hidden too, at the price of hiding ``host:port/path`` in the rare
URI whose path or query holds an ``@``.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@ (the password: anything up to the "@", "/" included) or
# scheme://token@ (no "/", ":" or "@" in it).
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)"
    r"(?:(?P<user>[^\s:/?#@]*):(?P<password>[^\s@]*)|(?P<token>[^\s:/?#@]+))@"
)
# Parameter names that hold a secret: any name containing one of these words, or exactly
# ``key`` or ``sig`` (Google's API keys, Azure's SAS signatures).
_SECRET_WORDS = r"token|passw(?:or)?d|pwd|secret|api[_\-]?key|access[_\-]?key|credential|signature|auth"
_SECRET_PARAM = re.compile(
    rf"(?:^|(?<=[?&;\s,]))(?P<key>[\w.\-]*(?:{_SECRET_WORDS})[\w.\-]*|key|sig)=(?P<value>[^&#\s;,]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***`` (see the module)."""
    text = _USERINFO.sub(_mask_userinfo, text)
    return _SECRET_PARAM.sub(lambda match: f"{match['key']}={MASK}", text)


def _mask_userinfo(match: re.Match[str]) -> str:
    if match["token"] is not None:
        return f"{match['scheme']}{MASK}@"
    return f"{match['scheme']}{match['user']}:{MASK}@"
