"""`python -m services.dashboard`: the runtime starts what services/dashboard/service.py declares."""

from libs.common.runtime import run
from services.dashboard.service import SERVICE

run(SERVICE)
