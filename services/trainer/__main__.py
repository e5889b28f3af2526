"""`python -m services.trainer`: the runtime starts what services/trainer/service.py declares."""

from libs.common.runtime import run
from services.trainer.service import SERVICE

run(SERVICE)
