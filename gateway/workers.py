"""Running the gateway under uvicorn: one process, or a supervisor with N workers.

With ``--workers N`` uvicorn's supervisor would answer SIGHUP by replacing
every worker process; Edgeway's supervisor instead passes the signal on, so
each worker re-reads the policy in place like a single process does: requests
in flight finish on the old policy, and an invalid file is refused with its
problems logged while the old policy keeps serving. SIGINT/SIGTERM, worker
restarts and SIGTTIN/SIGTTOU stay uvicorn's.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

logger = logging.getLogger("edgeway")

APP = "edgeway.gateway.asgi:app_from_env"


class Workers(Multiprocess):
    """uvicorn's multiprocess supervisor, with SIGHUP forwarded to every worker (see the module docstring)."""

    def handle_hup(self) -> None:
        logger.info("SIGHUP: every worker re-reads the policy")
        for process in self.processes:
            if process.pid is not None:
                try:
                    os.kill(process.pid, signal.SIGHUP)
                except ProcessLookupError:  # it just died; the supervisor starts a new one, which reads the file
                    continue


def run(workers: int, **options: Any) -> None:
    """Serve ``edgeway.gateway.asgi:app_from_env`` with ``options`` (uvicorn.Config keywords)."""
    if workers <= 1:
        uvicorn.run(APP, factory=True, workers=1, **options)
        return
    config = uvicorn.Config(APP, factory=True, workers=workers, **options)
    Workers(config, sockets=[config.bind_socket()]).run()
