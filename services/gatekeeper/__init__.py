"""Gatekeeper: validates submitted chat datasets and announces the accepted ones.

See `service.py` for the wiring, `validation.py` for the checks, `policy.py` for what is accepted.
"""

from services.gatekeeper.settings import GatekeeperSettings

__all__ = ["GatekeeperSettings"]
