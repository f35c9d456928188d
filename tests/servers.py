"""An ASGI app served by uvicorn on 127.0.0.1 (a free port) in a daemon thread, for
tests that drive a server with a real HTTP client."""

import socket
import threading
import time

import uvicorn


class ThreadedUvicorn:
  """Serves ``app`` until :meth:`close`; ``url`` is its root (no path)."""

  def __init__(self, app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    self._thread = threading.Thread(target=self._server.run, args=([sock],), daemon=True)
    self._thread.start()
    deadline = time.monotonic() + 30
    while not self._server.started:
      assert time.monotonic() < deadline, "uvicorn did not start"
      time.sleep(0.01)

  def close(self):
    self._server.should_exit = True
    self._thread.join(10)
