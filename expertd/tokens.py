"""Where the HTTP bearer token comes from: ``token``, ``token_file`` (or a systemd credential), ``EXPERTD_TOKEN``.

A token written in the config file must be kept from every reader of that
file; a token in a file of its own can be given to the daemon alone (systemd's
``LoadCredential=``, a container's secret mount) and rotated without editing
the config: the file is read at start and on every reload (HUP, ``expertctl
reload``), so rotating it is writing the new one and reloading.

``token_file = credential:NAME`` reads ``$CREDENTIALS_DIRECTORY/NAME``, the
directory systemd fills from the unit's ``LoadCredential=NAME:PATH`` (config
values expand no variables, so the directory cannot be written in the file).

At most one of ``token`` and ``token_file`` may be set; the environment's
``EXPERTD_TOKEN`` is the fallback when neither is, so a config that names its
token is never overridden by a stray variable.

No state: :func:`resolve_token` is a function of its arguments.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

from expertd.errors import ConfigError
from expertd.settings_types import TOKEN, _Invalid

ENV_TOKEN = "EXPERTD_TOKEN"
CREDENTIAL_PREFIX = "credential:"
_MAX_TOKEN_FILE = 4096  # bytes read: a token is short, and a wrong path must not read a large file into memory


def token_path(raw: str, base_dir: str, environ: Mapping[str, str]) -> str:
    """The file ``token_file = raw`` names; ValueError (what to do) if it cannot be told."""
    if raw.startswith(CREDENTIAL_PREFIX):
        name = raw[len(CREDENTIAL_PREFIX):]
        if not name or "/" in name:
            raise ValueError("credential:NAME needs the credential's name, e.g. credential:token")
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ValueError("$CREDENTIALS_DIRECTORY is not set: credential:NAME works under systemd, with "
                             f"LoadCredential={name}:/PATH/OF/THE/TOKEN in the unit; elsewhere give the file's path")
        return os.path.join(directory, name)
    return os.path.join(base_dir, os.path.expanduser(raw))


def resolve_token(token: str, token_file: str, where: str, base_dir: str,
                  environ: Mapping[str, str] = os.environ) -> str:
    """The token in force ('' for none): ``token``, else ``token_file``'s content, else $EXPERTD_TOKEN.

    ``where`` names the config file's section (``PATH: [expertd]``); every
    problem is one ConfigError line naming the setting and what to do.
    """
    if token and token_file:
        raise ConfigError(f"{where} token and token_file are both set; keep one (token_file keeps the secret out "
                          "of the config file)")
    if token_file:
        try:
            path = token_path(token_file, base_dir, environ)
        except ValueError as exc:
            raise ConfigError(f"{where} token_file = {token_file}: {exc}") from None
        try:
            # O_NONBLOCK: a FIFO (or a device) planted at the path must not hang start-up or a reload.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as handle:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ConfigError(f"{where} token_file = {token_file}: {path} is not a regular file; give the "
                                      "path of a file that holds the token")
                data = handle.read(_MAX_TOKEN_FILE + 1)
        except OSError as exc:
            raise ConfigError(f"{where} token_file = {token_file}: cannot read {path}: {exc.strerror}; check the "
                              "path and that the daemon's user may read it") from None
        text = data.decode("utf-8", "replace").strip()
        if len(data) > _MAX_TOKEN_FILE or not text:
            raise ConfigError(f"{where} token_file = {token_file}: {path} should hold the token alone, on one "
                              f"line ({'it is empty' if not text else 'it is larger than 4 KiB'})")
        return _checked(text, f"{where} token_file = {token_file}: {path}")
    if token:
        return token
    return _checked(environ.get(ENV_TOKEN, ""), f"environment {ENV_TOKEN}")


def _checked(text: str, where: str) -> str:
    try:
        return TOKEN.parse(text)
    except _Invalid as exc:
        raise ConfigError(f"{where}: {exc}") from None
