"""Hide credentials in what we print or store; the run itself keeps the real values in memory.

Used wherever a config, URL or job record leaves the process: `etsdm config`, `etsdm train
--dry-run`, the training log, config.yaml, manifest.json and the evaluation JSON records. Pure
functions on text and nested structures; nothing here reads the environment.

What is masked (with MASK):
- the password of a URL's user info, any scheme: `s3://KEY:SECRET@bucket/x` -> `s3://KEY:***@bucket/x`;
  a user info without a password is masked whole (tokens are often passed as the user name:
  `https://TOKEN@host/...` -> `https://***@host/...`);
- the value of a query parameter whose name looks secret (`?X-Amz-Signature=...`, `&sig=...`,
  `token`, `password`, ...), as in presigned and SAS URLs;
- in a nested structure, a string stored under a key whose name looks secret (`api_key`, `token`,
  `password`, ...), e.g. a key inside `train.deepspeed_extra`.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

MASK = "***"

# scheme://userinfo@ . The user info runs to the LAST "@" before the host (an unencoded "@" in a
# password must not leave its tail in the output), never past "/", "?", "#", white space or a
# character that cannot appear unencoded in a URL (quotes, brackets: the URL's end in JSON/YAML).
# Second form: `user:password@` whose password holds an unencoded "/" (AWS secret keys often do);
# "host:port/..." is not taken for one.
_BAD = r"\s\"<>`\[\]{}|\\^"
_USERINFO = re.compile(rf"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#{_BAD}]*"
                       rf"|[^:/?#@{_BAD}]*:(?!\d*(?:[/?#\s]|$))[^@{_BAD}]*)@")
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&;#\s\"'<>`]*)")
# Names that hold a secret themselves (not a path to one: *_FILE etc. are left alone). The same
# patterns, upper-cased, are in launchers/deepspeed_remote.sh (tests/test_secrets.py compares them).
_SECRET_NAME = re.compile(r"secret|token|passw|passphrase|signature|credential|api[_-]?key|private[_-]?key|"
                          r"accesskey$|[_-]key$|^sig$", re.IGNORECASE)
_NOT_SECRET_SUFFIX = re.compile(r"[_-](file|path|dir|url|uri|endpoint|type|expiry|expires|expiration)$",
                                re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether a variable / key / query parameter named `name` looks like it holds a secret."""
    return bool(_SECRET_NAME.search(name)) and not _NOT_SECRET_SUFFIX.search(name)


def _mask_userinfo(m: re.Match) -> str:
    user, sep, _password = m.group("userinfo").partition(":")
    return f"{m.group('scheme')}{user}:{MASK}@" if sep else f"{m.group('scheme')}{MASK}@"


def _mask_param(m: re.Match) -> str:
    if not m.group("value") or not is_secret_name(m.group("name")):
        return m.group(0)
    return m.group("lead") + MASK


def redact_text(text: str) -> str:
    """`text` with every URL credential masked (see the module docstring); other text unchanged."""
    if "@" in text:
        text = _USERINFO.sub(_mask_userinfo, text)
    if "=" in text:
        text = _QUERY_PARAM.sub(_mask_param, text)
    return text


def redact(obj: Any) -> Any:
    """A copy of `obj` (dicts, lists, tuples, sets, nested) with every string passed through
    redact_text and every string under a secret-looking key masked. Other values are returned
    as they are; containers keep their type, so the result serializes like the original."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            secret = isinstance(k, str) and isinstance(v, str) and v != "" and is_secret_name(k)
            out[redact(k)] = MASK if secret else redact(v)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple takes positional fields
        return type(obj)(*(redact(v) for v in obj))
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(redact(v) for v in obj)
    return obj


def redacted_yaml(tree: dict) -> str:
    """A config tree (Config.to_dict()) as Config.to_yaml writes it, credentials masked."""
    return yaml.safe_dump(redact(tree), sort_keys=False)
