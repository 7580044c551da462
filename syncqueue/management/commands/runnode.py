"""Serve HTTP (gunicorn) and run the django-q2 cluster together; Ctrl-C stops both cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from syncqueue import tasks

# Work in flight is safe to cut (leases put it back), so a stop need not wait long.
STOP_GRACE_SECONDS = 10


class Command(BaseCommand):
    help = "Run this node: the web server and the background workers, stopping both on Ctrl-C or SIGTERM."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
        parser.add_argument("--port", type=int, default=8000, help="Port to listen on (default 8000).")
        parser.add_argument("--web-workers", type=int, default=2, help="gunicorn worker processes (default 2).")
        parser.add_argument("--threads", type=int, default=4, help="Threads per web worker (default 4).")
        parser.add_argument("--access-log", action="store_true", help="Log every HTTP request to stdout.")

    def handle(self, *args, host, port, web_workers, threads, access_log, **options):
        if not 0 < port < 65536:
            raise CommandError(f"--port must be between 1 and 65535, got {port}")
        if web_workers < 1 or threads < 1:
            raise CommandError("--web-workers and --threads must be at least 1")
        base = str(settings.BASE_DIR)
        web = [
            sys.executable,
            "-m",
            "gunicorn",
            "exalate_web.wsgi",
            "--bind",
            f"{host}:{port}",
            "--workers",
            str(web_workers),
            "--threads",
            str(threads),
            "--graceful-timeout",
            "5",
            "--timeout",
            "60",
            # gunicorn's control socket sits at one path per user, so two nodes would clash on it.
            "--no-control-socket",
        ]
        if access_log:
            web += ["--access-logfile", "-"]
        # The tick polls, pulls and retries; waiting for the scheduler could take a minute.
        tasks.start()
        queue = [sys.executable, str(settings.BASE_DIR / "manage.py"), "qcluster"]
        children = [subprocess.Popen(web, cwd=base), subprocess.Popen(queue, cwd=base)]
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        self.stdout.write(f"{settings.NODE_NAME} is running at http://{host}:{port}/ (Ctrl-C stops it)")
        try:
            while not stopping and all(child.poll() is None for child in children):
                time.sleep(0.2)
        finally:
            failed = [c for c in children if c.poll() not in (None, 0)]
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            for child in children:
                try:
                    child.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        if failed and not stopping:
            raise CommandError("a part of the node stopped unexpectedly; see the log above")
