"""The review station: ``python -m leukonet.serve ckpt_path=RUN/checkpoints/last.ckpt`` -> http://127.0.0.1:8000/.

A thin entry: the configuration (``conf/serve.yaml``), then the FastAPI app of ``leukonet.station`` under uvicorn.
The socket is bound here so that ``port=0`` can print the port it got.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import hydra
import uvicorn
from omegaconf import DictConfig
from sqlalchemy.engine import make_url

from leukonet.errors import DataError, exit_on_user_error
from leukonet.station.access import check_host
from leukonet.station.app import create_app
from leukonet.train import CONF


def serve(cfg: DictConfig) -> None:
    check_host(cfg)  # before the checkpoint is read
    app = create_app(cfg)
    family = socket.AF_INET6 if ":" in str(cfg.host) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((str(cfg.host), int(cfg.port)))
        sock.listen(2048)  # connections wait from now on, until uvicorn accepts them
    except OSError as err:
        sock.close()
        raise DataError(f"cannot listen on {cfg.host}:{cfg.port}: {err.strerror or err}") from err
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    database = make_url(str(cfg.db_url)).render_as_string(hide_password=True)
    print(f"leukonet: serving {Path(str(cfg.ckpt_path)).name} on http://{shown}:{port}/ (database {database}; "
          f"Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10))
    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then re-raises the signal to the handler it found:
    # this one, so that the server ends with its message and exit status 0, as after Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    print("leukonet: stopped", flush=True)


@hydra.main(version_base="1.3", config_path=CONF, config_name="serve")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: serve(cfg))


if __name__ == "__main__":
    main()
