"""A real `lcmq api` process for tests: started on a free loopback port, ready when /healthz answers."""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

from bench.harness import Process, free_port, wait_until


@dataclass
class ApiServer:
    process: Process
    url: str

    def signin_token(self) -> str:
        """The token of the sign-in link the process printed."""
        found = re.search(r"\?token=(\S+)", self.process.log)
        assert found, self.process.log[-2000:]
        return found.group(1)


def start_api(procs, env: dict[str, str], timeout_s: float = 60) -> ApiServer:
    """`procs` is the conftest fixture that starts lcmq commands (and kills them at the end)."""
    port = free_port()
    process = procs(env, "api", "--host", "127.0.0.1", "--port", str(port))
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not process.alive():
            raise AssertionError(f"lcmq api exited:\n{process.log[-3000:]}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, timeout_s, interval_s=0.1, what=f"lcmq api on {url}")
    return ApiServer(process, url)
