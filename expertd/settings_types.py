"""The types of configuration values: how each setting's raw text is parsed and checked.

Each :class:`_Type` pairs the name shown in ``--help`` and docs/config.md with
the function that parses a value from the INI file or the command line; a
value that does not parse raises :class:`_Invalid`, whose message says what is
expected (:func:`expertd.config.load_config` adds the file, section and key).
Stateless: the constants below (``SIZE``, ``DURATION``, ``PATH``...) are what
:data:`expertd.settings.SETTINGS` declares its settings with.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from expertd.pipelines import ON_ERROR


class _Invalid(ValueError):
    """A value did not parse; the message says what is expected."""


@dataclass(frozen=True)
class _Type:
    name: str  # shown in docs and --help
    parse: Callable[[str], Any]


def _int_at_least(low: int) -> _Type:
    def parse(raw: str) -> int:
        try:
            value = int(raw, 10)
        except ValueError:
            raise _Invalid(f"not a whole number; use an integer ≥ {low}") from None
        if value < low:
            raise _Invalid(f"must be at least {low}")
        return value

    return _Type(f"integer ≥ {low}", parse)


def _parse_workers(raw: str) -> int:
    if raw.strip().lower() == "auto":
        return max(1, os.cpu_count() or 1)
    return _int_at_least(1).parse(raw)


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _parse_threads(raw: str) -> int | None:
    if raw.strip().lower() == "auto":
        return None  # resolved per worker: cores // workers
    return _int_at_least(1).parse(raw)


# A batch travels to its worker in one message with a descriptor per member; the kernel takes at most
# 253 descriptors in one message (SCM_MAX_FD).
MAX_BATCH_LIMIT = 250


def _parse_max_batch(raw: str) -> int | None:
    if raw.strip().lower() == "auto":
        return None  # resolved per expert: DEFAULT_MAX_BATCH for a batched one, else 1
    value = _int_at_least(1).parse(raw)
    if value > MAX_BATCH_LIMIT:
        raise _Invalid(f"must be at most {MAX_BATCH_LIMIT}")
    return value


# expertd.batching remembers the callers it expects this long.
MAX_BATCH_DELAY = 1.0


def _parse_batch_delay(raw: str) -> float:
    value = _parse_duration_or_off(raw)
    if value > MAX_BATCH_DELAY:
        raise _Invalid(f"at most {MAX_BATCH_DELAY:g}s: a free worker waiting longer for company would idle more "
                       "than batching saves")
    return value


def _parse_size(raw: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[bB]?\s*", raw)
    if not match:
        raise _Invalid("not a size; use bytes or a number with K, M or G (e.g. 16M)")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if value < 1024:
        raise _Invalid("must be at least 1K")
    return value


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}


def _parse_duration(raw: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*", raw)
    if not match:
        raise _Invalid("not a duration; use seconds or a number with ms, s, m or h (e.g. 30s)")
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if value <= 0:
        raise _Invalid("must be more than zero")
    return value


def _parse_duration_or_off(raw: str) -> float:
    if raw.strip().lower() in ("0", "off"):
        return 0.0
    return _parse_duration(raw)


def _parse_size_or_off(raw: str) -> int:
    if raw.strip().lower() in ("0", "off"):
        return 0
    return _parse_size(raw)


def _parse_per_uid(raw: str) -> int | None:
    if raw.strip().lower() == "auto":
        return None  # half of max_connections
    return _int_at_least(1).parse(raw)


_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _Invalid("not yes or no")


def _parse_jitter(raw: str) -> int | None:
    if raw.strip().lower() == "auto":
        return None  # a tenth of max_requests
    return _int_at_least(0).parse(raw)


def _parse_ids(kind: str) -> Callable[[str], list[int]]:
    def parse(raw: str) -> list[int]:
        import grp
        import pwd

        ids = []
        for word in _parse_words(raw):
            if word.isdigit():
                ids.append(int(word))
                continue
            try:
                ids.append(pwd.getpwnam(word).pw_uid if kind == "user" else grp.getgrnam(word).gr_gid)
            except KeyError:
                raise _Invalid(f"no {kind} named {word!r} on this system; use a name or a numeric id") from None
        return ids

    return parse


def _parse_group(raw: str) -> int | None:
    if not raw.strip():
        return None
    ids = _parse_ids("group")(raw)
    if len(ids) != 1:
        raise _Invalid("name one group")
    return ids[0]


def _parse_mode(raw: str) -> int:
    try:
        value = int(raw.strip(), 8)
    except ValueError:
        raise _Invalid("not an octal file mode; use e.g. 0660") from None
    if not 0 <= value <= 0o777:
        raise _Invalid("must be between 0000 and 0777")
    return value


def _parse_words(raw: str) -> list[str]:
    return [word for word in re.split(r"[\s,]+", raw) if word]


def _parse_modules(raw: str) -> list[str]:
    words = _parse_words(raw)
    for word in words:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", word):
            raise _Invalid(f"{word!r} is not a module name; list dotted module names")
    return words


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _parse_log_level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in _LOG_LEVELS:
        raise _Invalid(f"unknown log level; use one of {', '.join(_LOG_LEVELS)}")
    return value


def _parse_on_error(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ON_ERROR:
        raise _Invalid(f"not {' or '.join(ON_ERROR)}; continue runs the later stages after a failure, stop skips them")
    return value


LOG_FORMATS = ("text", "json")


def _parse_log_format(raw: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_FORMATS:
        raise _Invalid("not text or json; json writes one JSON object a line (expertd --help-topic logging)")
    return value


def _parse_function(raw: str) -> str:
    value = raw.strip()
    dotted = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
    if not (re.fullmatch(f"{dotted}:{dotted}", value) or re.fullmatch(rf"{dotted}\.[A-Za-z_][A-Za-z0-9_]*", value)):
        raise _Invalid("not a function reference; use module:function (or Firefly's module.function)")
    return value


def _parse_address(raw: str) -> tuple[str, int] | None:
    value = raw.strip()
    if not value:
        return None
    host, colon, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _Invalid("expected HOST:PORT, e.g. 127.0.0.1:8000 or [::1]:8000")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise _Invalid(f"{host!r} is not an IP address; use one (or localhost), e.g. 127.0.0.1:8000") from None
    return host, int(port)


MIN_TOKEN_LENGTH = 16  # expertd's own tokens (a Firefly token, accepted as Firefly accepts it, may be shorter)
TOKEN_HINT = "python -c 'import secrets; print(secrets.token_urlsafe())'"


def parse_token(raw: str, min_length: int = MIN_TOKEN_LENGTH) -> str:
    """A token: printable, no spaces, at least ``min_length`` characters (0: Firefly's, any length)."""
    value = raw.strip()
    if value and (len(value) < min_length or not value.isprintable() or " " in value):
        raise _Invalid(f"a token needs at least {min_length} printable characters and no spaces (e.g. the output "
                       f"of: {TOKEN_HINT})" if min_length else "a token is printable text with no spaces")
    return value


def _parse_url_path(raw: str) -> str:
    value = raw.strip()
    if value and (not value.startswith("/") or value == "/" or not value.isprintable() or " " in value
                  or "?" in value or "#" in value):
        raise _Invalid("expected a URL path such as /square: starting with /, not / alone, no spaces, ? or #")
    if "%" in value:  # (requests' paths are decoded before routing: /c%61ll/x would be expertd's /call/x)
        raise _Invalid("write the path decoded, without %-escapes (/café, not /caf%C3%A9)")
    return value


def _parse_origins(raw: str) -> str:
    origins = _parse_words(raw.replace(",", " "))
    if not all(origin.isascii() and origin.isprintable() for origin in origins):
        raise _Invalid("origins are ASCII, e.g. https://app.example.com (xn-- for other scripts) or *")
    if "*" in origins and len(origins) > 1:
        raise _Invalid("* allows every origin: write it alone, or list the origins without it")
    return ", ".join(origins)  # (several: each response names the request's Origin if listed, see expertd.firefly)


def _parse_text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise _Invalid("must not be empty")
    return value


INT_WORKERS = _Type("integer ≥ 1 or auto", _parse_workers)
THREADS = _Type("integer ≥ 1 or auto", _parse_threads)
SIZE = _Type("size (bytes, K, M, G)", _parse_size)
BATCH_DELAY = _Type("duration up to 1s, or 0 for none", _parse_batch_delay)
MAX_BATCH = _Type(f"integer from 1 to {MAX_BATCH_LIMIT}, or auto", _parse_max_batch)
DURATION = _Type("duration (ms, s, m, h; bare numbers are seconds)", _parse_duration)
DURATION_OR_OFF = _Type("duration, or 0 for none", _parse_duration_or_off)
SIZE_OR_OFF = _Type("size, or 0 for none", _parse_size_or_off)
JITTER = _Type("integer ≥ 0 or auto", _parse_jitter)
PER_UID = _Type("integer ≥ 1 or auto", _parse_per_uid)
BOOL = _Type("yes or no", _parse_bool)
USERS = _Type("list of user names or uids", _parse_ids("user"))
GROUPS = _Type("list of group names or gids", _parse_ids("group"))
GROUP = _Type("group name or gid", _parse_group)
MODE = _Type("octal mode", _parse_mode)
PATH = _Type("path", _parse_text)
PATHS = _Type("list of paths", _parse_words)
OPTIONAL_PATH = _Type("path, or empty", str.strip)
MODULES = _Type("list of modules", _parse_modules)
LOG_LEVEL = _Type("one of " + ", ".join(_LOG_LEVELS), _parse_log_level)
FUNCTION = _Type("module:function", _parse_function)
ADDRESS_OR_OFF = _Type("HOST:PORT, or empty for none", _parse_address)
# Checked by expertd.pipelines.load_pipelines, which needs every section's names at once.
STAGES = _Type("stages: NAME + NAME, NAME ...", str.strip)
LOG_FORMAT = _Type("text or json", _parse_log_format)
ACCESS_LOG_PATH = _Type("path, - for stderr, or empty for none", str.strip)
ON_ERROR_MODE = _Type(" or ".join(ON_ERROR), _parse_on_error)
TOKEN = _Type(f"secret text ({MIN_TOKEN_LENGTH}+ characters), or empty", parse_token)
URL_PATH = _Type("URL path (/NAME), or empty", _parse_url_path)
ORIGINS = _Type("origins separated by commas, * for any, or empty", _parse_origins)
TOKEN_FILE = _Type("path, credential:NAME, or empty", str.strip)  # (read by expertd.tokens)
