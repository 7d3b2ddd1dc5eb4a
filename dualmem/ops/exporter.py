"""``dualmem metrics``: the workers' latency snapshots and live gauges as a Prometheus
exposition, printed once or served over HTTP on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

from dualmem.errors import DualMemError
from dualmem.layout import Layout
from dualmem.metrics import prometheus_text
from dualmem.ops.database import check_current, open_database
from dualmem.redis_backend import connect, translate_errors
from dualmem.settings import Settings
from dualmem.sqlite_store import SQLiteStore
from dualmem.worker import stream_backlog, stream_pending

__all__ = ["CONTENT_TYPE", "Exporter", "start_server"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exporter:
    """Renders the exposition: one latency series per worker (``source`` label, from the
    ``metrics`` table the workers snapshot into) plus gauges read at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        with open_database(settings.db_path) as conn:
            check_current(conn, settings.db_path)
        self.store = SQLiteStore.from_settings(settings)
        self.layout = Layout(settings.namespace, settings.shards)
        self._client = None if settings.embedded else connect(settings)[0]

    def close(self) -> None:
        """Release the database and Redis connections."""
        self.store.close()
        if self._client is not None:
            self._client.close()

    def gauges(self) -> dict[str, float]:
        """Backlog and pending commands, dead letters, database size, journal seq."""
        db = Path(self.settings.db_path)
        size = sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
        out = {
            "dead_letters": float(self.store.dead_letter_count()),
            "db_bytes": float(size),
            "journal_seq": float(self.store.last_seq()),
        }
        if self._client is None:
            return out
        try:
            with translate_errors("metrics"):
                backlog = pending = 0
                for stream in self.layout.streams():
                    backlog += stream_backlog(self._client, stream, self.settings.group)
                    pending += stream_pending(self._client, stream, self.settings.group)
        except DualMemError:
            out["redis_up"] = 0.0
        else:
            out.update(redis_up=1.0, backlog=float(backlog), pending=float(pending))
        return out

    def render(self) -> str:
        """The whole exposition text."""
        lines: list[str] = []
        for i, (source, snapshot) in enumerate(sorted(self.store.latest_metrics().items())):
            for line in prometheus_text(snapshot).splitlines():
                if line.startswith("#"):
                    if i == 0:
                        lines.append(line)
                    continue
                lines.append(line.replace('{path="', f'{{source="{_label(source)}",path="', 1))
        gauge_text = prometheus_text({}, self.gauges()).splitlines()
        lines.extend(line for line in gauge_text if "latency" not in line)
        return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    render: Callable[[], str]
    #: Seconds a connection may take to send its request: an idle client is dropped.
    timeout = 10

    def do_GET(self) -> None:
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        try:
            body = type(self).render().encode("utf-8")
        except DualMemError as exc:
            self.send_error(503, str(exc))
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck connection's thread never holds up the exit
    block_on_close = False


def start_server(
    port: int, render: Callable[[], str], host: str = "127.0.0.1"
) -> tuple[HTTPServer, threading.Thread]:
    """Serve ``render()`` at ``http://host:port/metrics`` in a thread (port 0: any free
    port, see ``server.server_address``). Stop it with ``server.shutdown()``.

    Each connection has a thread of its own (and ``_Handler.timeout`` to send its
    request): one client that connects and sends nothing held the single-threaded
    server, so every other scrape timed out and ``shutdown()`` waited for it. The
    renders themselves still run one at a time.
    """
    lock = threading.Lock()

    def render_one() -> str:
        with lock:
            return render()

    handler = type("Handler", (_Handler,), {"render": staticmethod(render_one)})
    server = _Server((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, name="dualmem-metrics", daemon=True)
    thread.start()
    return server, thread
