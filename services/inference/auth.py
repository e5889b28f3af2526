"""The API key: where it comes from, and whether a request carries it.

Precedence: `api_key`, else the file `api_key_file` (read once at start), else a key generated
once into `data_dir/secrets/inference_api_key` (mode 0600) and reused on every later start.
Only the file's path is ever logged. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from libs.common.log import get_logger
from libs.common.settings import SettingsError

log = get_logger("inference.auth")

GENERATED_KEY_PATH = Path("secrets") / "inference_api_key"


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


def is_authorized(authorization: str | None, api_key: str) -> bool:
    token = bearer_token(authorization)
    # Constant time: the comparison must not reveal how much of a guess was right.
    return token is not None and hmac.compare_digest(token.encode(), api_key.encode())
