"""Serve a continually learning model over HTTP: predict, learn new classes, versions, rollback.

    app = retain.serve.create_app("runs/simplecil-mnist5k-B0Inc2-s1993", token="s3cret")
    # mount it in your own service, or: uvicorn.run(app, host="127.0.0.1", port=8000)

``retain serve RUN_DIR`` runs the same app with uvicorn; ``retain predict RUN_DIR IMAGE...``
answers offline. FastAPI and uvicorn are the ``serve`` extra (``pip install -e ".[serve]"``)
and are imported only when an app is created. See ``app.py`` for the endpoints, ``server.py``
for concurrency, ``store.py`` for the versions on disk, ``learn.py`` for learn jobs and
``images.py`` for what an upload may hold.
"""

from __future__ import annotations

from pathlib import Path


def create_app(run_dir: str | Path | None = None, *, method: str | None = None,
               backbone: str | None = None, params: dict | None = None,
               weights: str | None = None, image_size: int | None = None, seed: int = 1993,
               state: str | Path | None = None, token: str | None = None,
               token_all: bool = False, limits=None, device: str = "cpu",
               batch_size: int = 32, learn_in: str = "process", nice: int = 19):
    """A FastAPI app serving the last checkpoint of ``run_dir`` (or, with ``method`` and
    ``backbone``, a method that knows no class yet), learning in its ``state`` folder
    (default: RUN_DIR/serve, or runs/serve-<method>-<backbone>). An existing state folder is
    reopened at its latest complete version. ``token``: needed by learn, rollback and delete
    (by every endpoint with ``token_all``); None makes a random one, logged at start and kept
    in ``app.state.server.settings.token``. ``limits``: a ``retain.serve.images.Limits``.
    ``learn_in``: "process" (default: a process per job at CPU priority ``nice``, 19 = only
    the CPU time predictions leave) or "thread".
    """
    import logging
    import secrets

    from .app import create_fastapi
    from .images import Limits
    from .server import Server, Settings

    if learn_in not in ("process", "thread"):
        from ..errors import ConfigError

        raise ConfigError(f"learn_in must be 'process' or 'thread', not {learn_in!r}")
    state = Path(state) if state else default_state(run_dir, method, backbone)
    settings = Settings(token=token, token_all=token_all, limits=limits or Limits(),
                        device=device, batch_size=batch_size, learn_in=learn_in, nice=nice)
    if not settings.token:
        settings.token = secrets.token_urlsafe(18)
        logging.getLogger("retain.serve").warning("no token given; this server's token is %s",
                                                  settings.token)
    server = Server.open(state, run_dir=run_dir, method=method, backbone=backbone,
                         params=params, weights=weights, image_size=image_size, seed=seed,
                         settings=settings)
    return create_fastapi(server)


def default_state(run_dir, method, backbone) -> Path:
    if run_dir is not None:
        return Path(run_dir) / "serve"
    if method and backbone:
        return Path("runs") / f"serve-{method}-{backbone}"
    from ..errors import ConfigError

    raise ConfigError("pass a run folder, or --method and --backbone to start an empty model "
                      "(or --state of an existing state folder)")


__all__ = ["create_app"]
