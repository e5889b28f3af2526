"""The API keys: where they come from, which one a request carries, and what its role allows.

The main key is an admin key. Precedence: `api_key`, else the file `api_key_file` (read once at
start), else a key generated once into `data_dir/secrets/inference_api_key` (mode 0600) and
reused on every later start. `api_keys_file` adds named keys, each with a role (TOML, one table
per key; the table's name is who called, as logs show it):

    [dashboard]
    key = "..."
    role = "read"     # /v1/* and GET /models/info
    [ops]
    key = "..."
    role = "admin"    # also POST /models/reload

Only names and file paths are ever logged, never a key. A token is compared with every key, each
in constant time and with no early exit, so the time taken reveals neither how much of a guess
was right nor which key, if any, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from libs.common.log import get_logger
from libs.common.settings import SettingsError

log = get_logger("inference.auth")

GENERATED_KEY_PATH = Path("secrets") / "inference_api_key"
# How logs name the caller holding the main key (api_key, api_key_file or the generated one).
MAIN_KEY_NAME = "main"

Role = Literal["read", "admin"]
ROLES: tuple[str, ...] = get_args(Role)


@dataclass(frozen=True)
class ApiKey:
    name: str
    role: Role
    key: str = field(repr=False)  # a repr must never show it


class KeyTable:
    """The configured keys; `match` says which one a request carries."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = tuple(keys)
        # Digests are all 32 bytes long, so compare_digest's time does not even reveal a key's length.
        self._digests = tuple(_digest(k.key) for k in keys)

    def match(self, authorization: str | None) -> ApiKey | None:
        """The key whose token the `Authorization: Bearer` header carries, or None."""
        token = bearer_token(authorization)
        if token is None:
            return None
        presented = _digest(token)
        found = None
        # Every key is compared, matched or not: no early exit.
        for key, digest in zip(self.keys, self._digests, strict=True):
            if hmac.compare_digest(presented, digest):
                found = key
        return found

    @property
    def names(self) -> dict[str, str]:
        """Each key's name and role: what may be logged about them."""
        return {k.name: k.role for k in self.keys}


def resolve_api_key(api_key: str, api_key_file: str, data_dir: Path) -> str:
    if api_key:
        return api_key
    if api_key_file:
        try:
            key = Path(api_key_file).expanduser().read_text().strip()
        except OSError as exc:
            raise SettingsError(f"api_key_file {api_key_file}: cannot read it: {exc.strerror}") from exc
        if not key:
            raise SettingsError(f"api_key_file {api_key_file} is empty")
        return key
    return _generated_key(Path(data_dir) / GENERATED_KEY_PATH)


def _generated_key(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
        try:
            # link() refuses an existing name: when replicas start together, the first key wins
            # and every replica reads that one.
            os.link(tmp, path)
            log.info("generated an API key; clients read it from this file", path=str(path))
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_text().strip()
    if not key:
        raise SettingsError(f"{path} is empty; delete it to generate a new key")
    return key


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def resolve_api_keys(api_key: str, api_key_file: str, api_keys_file: str, data_dir: Path) -> KeyTable:
    """The main key (admin) and the named keys of `api_keys_file`, checked; SettingsError names the setting."""
    keys = [ApiKey(MAIN_KEY_NAME, "admin", resolve_api_key(api_key, api_key_file, data_dir))]
    if api_keys_file:
        try:
            text = Path(api_keys_file).expanduser().read_text()
        except OSError as exc:
            raise SettingsError(f"api_keys_file {api_keys_file}: cannot read it: {exc.strerror}") from exc
        keys += parse_api_keys(text, api_keys_file)
    seen: set[bytes] = set()
    for key in keys:
        if _digest(key.key) in seen:
            raise SettingsError(f"api_keys_file {api_keys_file}: key {key.name!r} repeats another key's value;"
                                " every key must be different")
        seen.add(_digest(key.key))
    table = KeyTable(keys)
    log.info("API keys", keys=table.names, api_keys_file=api_keys_file)
    return table


def parse_api_keys(text: str, source: str) -> list[ApiKey]:
    """The named keys of an `api_keys_file` (see the module docstring); `source` names it in errors."""
    where = f"api_keys_file {source}"
    try:
        # The parser's message may quote the line, i.e. a key: never pass it on.
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise SettingsError(f"{where}: invalid TOML (one table per key: [name] key = \"...\" role = \"read\")") \
            from None
    keys = []
    for name, entry in data.items():
        if name == MAIN_KEY_NAME:
            raise SettingsError(f"{where}: the name {MAIN_KEY_NAME!r} is the main key's (api_key); choose another")
        if not isinstance(entry, dict):
            raise SettingsError(f"{where}: {name!r} must be a table: [{name}] key = \"...\" role = \"read\"")
        if unknown := sorted(set(entry) - {"key", "role"}):
            raise SettingsError(f"{where}: [{name}] has unknown field(s) {unknown}; a key has `key` and `role`")
        key, role = entry.get("key"), entry.get("role")
        if not isinstance(key, str) or not key.strip():
            raise SettingsError(f"{where}: [{name}] has an empty or missing key")
        if key != key.strip():
            raise SettingsError(f"{where}: [{name}]'s key starts or ends with whitespace, which no header can carry")
        if role not in ROLES:
            raise SettingsError(f"{where}: [{name}] has unknown role {role!r}; roles: {', '.join(ROLES)}")
        keys.append(ApiKey(name, role, key))
    return keys
