"""How a process proves who it is to NATS, and over what: credentials and TLS from the settings,
checked once, turned into nats-py's connect options.

One way to authenticate at a time: a user and password, a `.creds` file (JWT and NKey seed, for a
server in operator mode) or an NKey seed file. The last two need the `nkeys` package, which
nats-py imports only then; a user and password need nothing. Any TLS file set makes the
connection TLS: the CA verifies the server (the system's CAs when none is given), a certificate
and key identify this client to a server that verifies clients.

With credentials, replies come to the user's own inbox (`nats_permissions.inbox_prefix`), the only
one its permissions let it read.
"""

from __future__ import annotations

import importlib.util
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.common.nats_permissions import inbox_prefix
from libs.common.settings import CLI, CommonSettings, SettingsError, env_name


def _name(field_name: str) -> str:
    return env_name(CLI, field_name)


@dataclass(frozen=True)
class NatsAuth:
    user: str = ""
    password: str = field(default="", repr=False)
    creds_file: str = ""
    nkey_seed_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> NatsAuth:
        """The settings' credentials and TLS files; a `SettingsError` naming the variable when they
        are incomplete, conflicting, missing on disk or need a package that is not installed."""
        auth = cls(settings.nats_user, settings.nats_password, settings.nats_creds_file, settings.nats_nkey_seed_file,
                   settings.nats_tls_ca_file, settings.nats_tls_cert_file, settings.nats_tls_key_file)
        auth.check()
        return auth

    def check(self) -> None:
        if bool(self.user) != bool(self.password):
            missing = "nats_password" if self.user else "nats_user"
            raise SettingsError(f"{_name(missing)}: is not set, but {_name('nats_user' if self.user else 'nats_password')}"
                                " is (a user and a password go together)")
        ways = [name for name, value in (("nats_user", self.user), ("nats_creds_file", self.creds_file),
                                          ("nats_nkey_seed_file", self.nkey_seed_file)) if value]
        if len(ways) > 1:
            raise SettingsError(f"{_name(ways[1])}: set only one way to authenticate, not also {_name(ways[0])}")
        for name in ("nats_creds_file", "nats_nkey_seed_file", "nats_tls_ca_file", "nats_tls_cert_file",
                     "nats_tls_key_file"):
            path = getattr(self, name.removeprefix("nats_"))
            if path and not Path(path).is_file():
                raise SettingsError(f"{_name(name)}: {path} does not exist (or is not a file)")
        if (self.creds_file or self.nkey_seed_file) and importlib.util.find_spec("nkeys") is None:
            raise SettingsError(f"{_name(ways[0])}: NKey and .creds authentication need the nkeys package "
                                "(pip install nkeys); a user and password do not")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            missing = "nats_tls_key_file" if self.tls_cert_file else "nats_tls_cert_file"
            raise SettingsError(f"{_name(missing)}: is not set, but the other half of the client certificate is")
        if self.tls:
            self.ssl_context()

    @property
    def authenticates(self) -> bool:
        return bool(self.user or self.creds_file or self.nkey_seed_file)

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca_file or self.tls_cert_file)

    def ssl_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca_file or None)
        except (ssl.SSLError, OSError) as exc:
            raise SettingsError(f"{_name('nats_tls_ca_file')}: {self.tls_ca_file} is not a CA certificate: {exc}") from exc
        if self.tls_cert_file:
            try:
                context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
            except (ssl.SSLError, OSError) as exc:
                raise SettingsError(f"{_name('nats_tls_cert_file')}: {self.tls_cert_file} with "
                                    f"{self.tls_key_file} is not a certificate and its key: {exc}") from exc
        return context

    def connect_options(self, service: str) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` of the process `service` (its user's name)."""
        options: dict[str, Any] = {}
        if self.user:
            options.update(user=self.user, password=self.password)
        if self.creds_file:
            options["user_credentials"] = self.creds_file
        if self.nkey_seed_file:
            options["nkeys_seed"] = self.nkey_seed_file
        if self.authenticates:
            # The user's own inbox, the one its permissions let it read (by the service's name when
            # only a .creds or seed file says who it is).
            options["inbox_prefix"] = inbox_prefix(self.user or service)
        if self.tls:
            options["tls"] = self.ssl_context()
        return options
