"""`python -m services.evaluator`: the runtime starts what services/evaluator/service.py declares."""

from libs.common.runtime import run
from services.evaluator.service import SERVICE

run(SERVICE)
