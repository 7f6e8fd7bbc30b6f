"""``retain predict`` and ``retain serve``: flags and handlers (hooked in by retain/commands/).

Nothing heavy is imported here at module level, so ``retain --help`` stays light.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from pathlib import Path

from ..errors import ConfigError

TOKEN_ENV = "RETAIN_SERVE_TOKEN"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``retain predict``."""
    p.add_argument("run_dir", help="a run folder (its last checkpoint) or a serve state folder")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("-k", "--top", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")


def add_serve_arguments(s: argparse.ArgumentParser) -> None:
    """The flags of ``retain serve``."""
    s.add_argument("run_dir", nargs="?", help="a run folder to serve (its last checkpoint)")
    s.add_argument("--method", help="start empty with this method (no run folder)")
    s.add_argument("--backbone", help="the backbone of an empty start")
    s.add_argument("--weights", help="local weights file of that backbone")
    s.add_argument("--image-size", type=int, help="input resolution of that backbone")
    s.add_argument("--set", action="append", default=[], metavar="params.NAME=VALUE",
                   help="a hyper-parameter of the method of an empty start")
    s.add_argument("--state", help="state folder (default RUN_DIR/serve, or "
                                   "runs/serve-<method>-<backbone>)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--token", help=f"token for learn/rollback/delete (default ${TOKEN_ENV}; "
                                   f"neither: a random one, printed)")
    s.add_argument("--token-all", action="store_true",
                   help="every endpoint but the page and /health needs the token")
    s.add_argument("--device", default="cpu", help="cpu, cuda, auto, ...")
    s.add_argument("--learn-in", choices=["process", "thread"], default="process",
                   help="learn jobs in a lower-priority process (default) or a thread")
    s.add_argument("--learn-nice", type=int, default=19,
                   help="CPU priority decrease of a learn process (default 19: it uses only "
                        "the CPU time predictions leave)")
    from .images import Limits

    for f in fields(Limits):
        s.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default,
                       help=f"limit per request (default {f.default})")


def main(args: argparse.Namespace) -> None:
    if args.command == "predict":
        predict(args)
    else:
        serve(args)


def image_files(items: list[str]) -> list[Path]:
    out = []
    for item in map(Path, items):
        if item.is_dir():
            out += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                          and p.is_file())
        elif item.is_file():
            out.append(item)
        else:
            raise ConfigError(f"{item} is neither an image file nor a folder")
    if not out:
        raise ConfigError(f"no image found in {', '.join(items)} (looked for "
                          f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return out


def predict(args: argparse.Namespace) -> None:
    from .images import Limits, decode
    from .model import load_model

    files = image_files(args.images)
    model = load_model(args.run_dir, device=args.device)
    limits, rows = Limits(), []
    for start in range(0, len(files), 64):
        chunk = files[start : start + 64]
        uploads = [decode(f.read_bytes(), limits, str(f)) for f in chunk]
        rows += zip(chunk, model.top_k(uploads, args.top), strict=True)
    if args.json:
        print(json.dumps({"model": str(args.run_dir), "method": model.method.name,
                          "classes": len(model.class_names),
                          "predictions": [{"image": str(f), "top": t} for f, t in rows]},
                         indent=2))
    else:
        print(table(rows))


def table(rows) -> str:
    k = max(len(t) for _, t in rows)
    width = max(len(str(f)) for f, _ in rows)
    header = f"{'image':<{width}}  " + "  ".join(f"{f'top-{i + 1}':<12} {'score':>7}"
                                                   for i in range(k))
    lines = [header]
    for f, top in rows:
        cells = "  ".join(f"{t['class'][:12]:<12} {t['score']:>7.3f}" for t in top)
        lines.append(f"{str(f):<{width}}  {cells}")
    return "\n".join(lines)


def serve(args: argparse.Namespace) -> None:
    import logging

    from . import create_app
    from .images import Limits

    if args.run_dir is None and not args.state and not (args.method and args.backbone):
        raise ConfigError("pass a run folder, or --method and --backbone to start an empty "
                          "model, or --state of an existing state folder")
    if args.run_dir and args.method:
        raise ConfigError("pass a run folder or --method/--backbone, not both")
    params = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("params."):
            raise ConfigError(f"--set {item!r}: expected params.NAME=VALUE")
        params[key[len("params."):]] = value
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO)
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    app = create_app(args.run_dir, method=args.method, backbone=args.backbone, params=params,
                     weights=args.weights, image_size=args.image_size, state=args.state,
                     token=args.token or os.environ.get(TOKEN_ENV), token_all=args.token_all,
                     limits=limits, device=args.device, learn_in=args.learn_in,
                     nice=args.learn_nice)
    import uvicorn

    print(f"serving {app.state.server.spec.method} on http://{args.host}:{args.port}/ "
          f"(API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info")
