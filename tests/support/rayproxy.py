"""The Ray dashboard behind a proxy that fails the way a Ray cluster does, for the faults a real head
does not make on demand: it forgets jobs (a head restarted without GCS persistence), takes its time
to stop or to submit one (a driver that ignores SIGTERM, a busy head), refuses one part's
submissions for good, or is gone altogether (Ray down or decommissioned). Everything else passes
through unchanged."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
import urllib.parse
import urllib.request

from tests.support.services import free_port

# A held request is let go after this long at the latest, within the operator's Jobs API timeout (30 s).
HOLD_SECONDS = 25.0
HOLDABLE = ("stop", "submit")


class RayProxy:
    def __init__(self, ray_cluster):
        self.cluster = ray_cluster
        self.forgotten: set[str] = set()
        self.refused: set[str] = set()  # parts whose submissions are answered 400
        self.seen = {what: threading.Event() for what in HOLDABLE}  # such a request came while held
        self._go = {what: threading.Event() for what in HOLDABLE}
        for go in self._go.values():
            go.set()
        upstream, proxy = ray_cluster.dashboard_url.rstrip("/"), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self):
                path = self.path.split("?")[0].rstrip("/")
                if path.startswith("/api/jobs/") and path.split("/")[3] in proxy.forgotten:
                    return self.answer(404, b"Job not found")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                what = None
                if self.command == "POST" and path.startswith("/api/jobs/") and path.endswith("/stop"):
                    what = "stop"
                elif self.command == "POST" and path == "/api/jobs":
                    what = "submit"
                    part = (json.loads(body or b"{}").get("metadata") or {}).get("laion-operator.io/part")
                    if part in proxy.refused:
                        return self.answer(400, b"the runtime env cannot be set up")
                if what and not proxy._go[what].is_set():
                    proxy.seen[what].set()
                    proxy._go[what].wait(HOLD_SECONDS)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(upstream + self.path, data=body, method=self.command, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        code, data = response.status, response.read()
                except urllib.error.HTTPError as err:
                    code, data = err.code, err.read()
                if path == "/api/jobs" and self.command == "GET" and code == 200:
                    jobs = [j for j in json.loads(data) if j.get("submission_id") not in proxy.forgotten]
                    data = json.dumps(jobs).encode()
                self.answer(code, data)

            def answer(self, code, data):
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = forward

        host = urllib.parse.urlsplit(upstream).hostname  # where the dashboard is, the proxy is
        self.server = http.server.ThreadingHTTPServer((host, free_port()), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        self.dashboard_url = f"http://{host}:{self.server.server_address[1]}"
        self._open = True

    def client_env(self) -> dict[str, str]:
        return self.cluster.client_env()

    def forget(self, job_id: str) -> None:
        """The Jobs API answers 404 for the job and leaves it out of its list; the job is stopped, as a
        lost head ends its jobs, which the operator cannot see any more."""
        from ray.job_submission import JobSubmissionClient

        self.forgotten.add(job_id)
        JobSubmissionClient(self.cluster.dashboard_url).stop_job(job_id)

    def hold(self, what: str) -> None:
        """Requests to `what` ("stop" or "submit") a job wait (up to HOLD_SECONDS) until `let_go`."""
        self.seen[what].clear()
        self._go[what].clear()

    def let_go(self, what: str) -> None:
        self._go[what].set()

    def refuse(self, part: str) -> None:
        """Every submission of the LaionPart `part` is answered 400, as Ray answers a runtime env it
        cannot set up: a refusal no retry mends."""
        self.refused.add(part)

    def down(self) -> None:
        """Nothing listens at the address any more: every call is refused."""
        self.close()

    def close(self) -> None:
        for go in self._go.values():
            go.set()
        if self._open:
            self._open = False
            self.server.shutdown()
            self.server.server_close()
