"""Gatekeeper: the only door into training. Validates submitted datasets and announces the accepted ones.

The modules, in the order a row meets them:

  intake.py          the ways in: a Submission from NATS, an HTTP upload or the inbox folder
  reading.py         bytes → lines → rows: gzip, limits, framing, decoding (quick file and line checks)
  schemas.py         the registry of row formats, each with its quick row checks; answer profiles
  checks/            what a check is and the one protocol of the level checks (__init__.py);
                     the standard level (standard.py: token lengths) and the deep level (deep.py:
                     answer format and leakage)
  duplicates.py      deep: exact and near duplicate rows; datasets accepted before
  verdict.py         the acceptance policy, the report, the announcement event
  pipeline.py        ties them: one file through its level, one submission from its bytes to its report
  service.py         the wiring to NATS, HTTP (api.py) and the inbox; settings.py its settings
"""

from services.gatekeeper.settings import GatekeeperSettings

__all__ = ["GatekeeperSettings"]
