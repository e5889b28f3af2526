"""`python -m services.curriculum`: the runtime starts what services/curriculum/service.py declares."""

from libs.common.runtime import run
from services.curriculum.service import SERVICE

run(SERVICE)
