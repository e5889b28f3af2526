"""`python -m services.gatekeeper`: the runtime starts what services/gatekeeper/service.py declares."""

from libs.common.runtime import run
from services.gatekeeper.service import SERVICE

run(SERVICE)
