"""Gatekeeper: the only door into training. Validates submitted datasets and announces the accepted ones.

See `service.py` for the wiring, `validation.py` for which checks run at each level,
`policy.py` for what is accepted, `schemas.py` for the registry.
"""

from services.gatekeeper.settings import GatekeeperSettings

__all__ = ["GatekeeperSettings"]
