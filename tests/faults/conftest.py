"""The fault suite runs in `isolated_env` (tests/conftest.py): its own Redis (append-only file
on, restartable) and database, the session's moto S3 server, short leases; `procs` starts the
real `lcmq worker` and `lcmq sweep` processes."""

import pytest


@pytest.fixture
def fault_env(isolated_env):
    return isolated_env
