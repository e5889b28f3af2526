"""`python -m services.deployer`: the runtime starts what services/deployer/service.py declares."""

from libs.common.runtime import run
from services.deployer.service import SERVICE

run(SERVICE)
