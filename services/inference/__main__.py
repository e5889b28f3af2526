"""`python -m services.inference`: the runtime starts what services/inference/service.py declares."""

from libs.common.runtime import run
from services.inference.service import SERVICE

run(SERVICE)
