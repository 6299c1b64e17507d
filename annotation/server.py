"""Start, check and stop a real Label Studio server on 127.0.0.1 (sqlite, its own data folder).

    python -m annotation.server start [--port 8080] [--data-dir .labelstudio] [--media-root DIR]
    python -m annotation.server status | stop

Credentials come from the environment, never from git: LABEL_STUDIO_USERNAME (an e-mail),
LABEL_STUDIO_PASSWORD and LABEL_STUDIO_USER_TOKEN (the API token, at most 40 characters). They are
planted on the FIRST start of a data folder (with the legacy API token enabled; Label Studio 1.23
turns legacy tokens off for new organisations). Local files are served from `--media-root`, where
the annotate stage writes the pair images. The server runs in its own process group (it has an
autoreload child) so that `stop` ends all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 8080
CRED_VARS = ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN")


class ServerError(RuntimeError):
    pass


@dataclass
class LabelStudioServer:
    """One Label Studio process tree; `start()` returns once /health answers."""

    data_dir: Path
    media_root: Path
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"
    timeout_s: float = 180.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "server.json"

    def env(self) -> dict[str, str]:
        missing = [v for v in CRED_VARS if not os.environ.get(v)]
        if missing:
            raise ServerError(
                f"set {', '.join(missing)} in the environment (admin e-mail, password, API token ≤ 40 chars)"
            )
        if "@" not in os.environ["LABEL_STUDIO_USERNAME"]:
            raise ServerError("LABEL_STUDIO_USERNAME must be an e-mail address")
        if len(os.environ["LABEL_STUDIO_USER_TOKEN"]) > 40:
            raise ServerError("LABEL_STUDIO_USER_TOKEN must be at most 40 characters")
        d = self.data_dir.resolve()
        env = dict(os.environ)
        env.update(
            {
                "LABEL_STUDIO_BASE_DATA_DIR": str(d),
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.media_root.resolve()),
                "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
                "XDG_CONFIG_HOME": str(d / "xdg" / "config"),
                "XDG_CACHE_HOME": str(d / "xdg" / "cache"),
                "XDG_DATA_HOME": str(d / "xdg" / "data"),
                "DJANGO_DB": "sqlite",
                "SENTRY_DSN": "",
                "FRONTEND_SENTRY_DSN": "",
            }
        )
        return env

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200 and json.loads(r.read() or b"{}").get("status") == "UP"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _port_free(self) -> bool:
        with socket.socket() as s:
            try:
                s.bind((self.host, self.port))
                return True
            except OSError:
                return False

    def start(self) -> LabelStudioServer:
        if self.healthy():
            raise ServerError(f"a server already answers on {self.url}; stop it or choose another --port")
        if not self._port_free():
            # Label Studio silently moves to the next free port: refuse instead.
            raise ServerError(f"port {self.port} on {self.host} is busy; choose another --port")
        exe = shutil.which("label-studio") or str(Path(sys.executable).with_name("label-studio"))
        if not Path(exe).exists():
            raise ServerError("the label-studio command is not installed (pip install label-studio==1.23.2)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.media_root.mkdir(parents=True, exist_ok=True)
        env = self.env()
        log = open(self.data_dir / "server.log", "ab")
        proc = subprocess.Popen(
            [exe, "start", "--no-browser", "--internal-host", self.host, "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() ends the autoreload child too
            cwd=self.data_dir,
        )
        self.pid_file.write_text(json.dumps({"pid": proc.pid, "port": self.port, "host": self.host}))
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout_s:
            if proc.poll() is not None:
                raise ServerError(
                    f"label-studio exited with code {proc.returncode}; see {self.data_dir / 'server.log'}"
                )
            if self.healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"label-studio did not become healthy within {self.timeout_s:.0f} s on {self.url}")

    def stop(self) -> bool:
        """Ends the server's process group; True if one was running."""
        if not self.pid_file.is_file():
            return False
        pid = json.loads(self.pid_file.read_text())["pid"]
        self.pid_file.unlink()
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        for _ in range(100):
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
        return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "status", "stop"])
    p.add_argument("--port", type=int, default=int(os.environ.get("LABEL_STUDIO_PORT", DEFAULT_PORT)))
    p.add_argument("--data-dir", default=".labelstudio", help="server data folder (sqlite, uploads, logs)")
    p.add_argument("--media-root", default=".labelstudio/media", help="folder served as local files")
    a = p.parse_args(argv)
    srv = LabelStudioServer(Path(a.data_dir), Path(a.media_root), a.port)
    try:
        if a.command == "start":
            t0 = time.monotonic()
            srv.start()
            print(
                f"label-studio: up on {srv.url} in {time.monotonic() - t0:.0f} s (data {srv.data_dir}); "
                f"export LABEL_STUDIO_URL={srv.url} and stop with `python -m annotation.server stop`"
            )
        elif a.command == "status":
            up = srv.healthy()
            print(f"label-studio on {srv.url}: {'up' if up else 'down'}")
            sys.exit(0 if up else 1)
        else:
            print("label-studio: stopped" if srv.stop() else "label-studio: not running")
    except ServerError as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
