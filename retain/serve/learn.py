"""A learn job: the next task of the served method, learned on a copy, published as a version.

The server writes the job's images (validated, under names it chose) and ``request.json`` into
a job folder, then runs ``run_job`` in a separate process (``python -m retain.serve.learn``, at
a lower CPU priority, killed with the server) or in a thread. The job rebuilds the method from
the base version's state (the protocol's ``load_state_dict``), builds a ``Task`` of the new
images, learns it, measures accuracy on the held-out images if the client asked for some, and
writes the new version atomically (``VersionStore.write``). The server then loads that version
from disk and swaps it in; until then every prediction is answered by the base version.

Labels: the classes the server knows keep their labels; new class names get the next labels in
order of first appearance, so a task's new classes are always ``range(known, known + new)``.
Images of a method with an exemplar memory keep one split key across all learn jobs (the run's
training split, or the server's own), with indices that never repeat, because an exemplar
memory concatenates exemplars of several tasks into one split; in file form their files are
kept in STATE/store/ since the memory refers to them by path.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from ..context import Context, resolve_device
from ..features import FeatureCache
from ..io import read_json, write_bytes, write_json
from ..runner import seed_everything
from ..scenarios.base import Task
from .images import Limits, Upload, decode
from .model import Spec, build, create_pristine, split_of
from .store import VersionStore

UNLIMITED = Limits(max_request_bytes=1 << 62, max_image_bytes=1 << 62, max_image_pixels=1 << 62)


def write_request(job_dir: Path, uploads: list[Upload], **request) -> None:
    """The job folder: each image under a server-chosen name, and request.json."""
    job_dir.mkdir(parents=True)
    files = []
    for i, u in enumerate(uploads):
        name = f"{i:06d}{u.extension}"
        write_bytes(job_dir / name, u.data)
        files.append({"file": name, "label": u.label})
    write_json(job_dir / "request.json", {**request, "images": files})


def holdout_mask(y: np.ndarray, fraction: float, rng: np.random.RandomState) -> np.ndarray:
    """(N,) True for the held-out images: ``fraction`` of each class, at least one image of
    every class kept for learning."""
    out = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        pos = np.flatnonzero(y == c)
        k = min(int(len(pos) * fraction), len(pos) - 1)
        out[rng.permutation(pos)[:k]] = True
    return out


def run_job(state_dir: str | Path, job_dir: str | Path, hook=None) -> dict:
    """Learn the job in ``job_dir`` on top of its base version; returns the new version's
    metadata. ``hook`` (tests) runs between writing the version's files and publishing it."""
    store, job_dir = VersionStore(state_dir), Path(job_dir)
    spec = Spec.from_dict(store.spec())
    req = read_json(job_dir / "request.json")
    state, base_meta = store.read(req["base"]) if req["base"] else (None, {"classes": []})
    method = build(spec, create_pristine(spec), state)
    uploads = [decode((job_dir / f["file"]).read_bytes(), UNLIMITED, f["file"], f["label"])
               for f in req["images"]]
    known = list(base_meta["classes"])
    labels = [u.label for u in uploads]
    new = [c for c in dict.fromkeys(labels) if c not in known]
    names = known + new
    label_of = {c: i for i, c in enumerate(names)}
    y = np.array([label_of[c] for c in labels], dtype=np.int64)  # (N,)

    start = req["store_next"]
    index = start + np.arange(len(uploads))
    split = split_of(uploads, spec.format, y, key=spec.store_key, index=index,
                     paths=image_paths(store, spec, job_dir, req, index))
    held = holdout_mask(y, req.get("holdout", 0.0), np.random.RandomState(req["version"]))
    train, test = split.subset(np.flatnonzero(~held)), split.subset(np.flatnonzero(held))
    task = Task(id=method.tasks_learned_, classes=tuple(sorted(set(train.targets.tolist()))),
                new_classes=tuple(range(len(known), len(names))),
                seen_classes=tuple(range(len(names))), train=train, test=test, kind="class",
                class_names=tuple(names))
    ctx = Context(device=resolve_device(req.get("device", "cpu")),
                  batch_size=req.get("batch_size", 32), seed=spec.seed,
                  cache=FeatureCache(None))
    seed_everything(spec.seed, task.id)
    t0 = time.perf_counter()
    method.learn(task, ctx)
    seconds = time.perf_counter() - t0
    accuracy = None
    if len(test):
        pred = method.predict(test, ctx).argmax(1).numpy()  # (N_test,)
        accuracy = float((pred == test.targets).mean())
    meta = {"kind": "learn", "parent": req["base"], "job": req["job"], "task": task.id,
            "tasks_learned": method.tasks_learned_, "classes": names, "new_classes": new,
            "updated_classes": [c for c in dict.fromkeys(labels) if c in known],
            "images": len(train), "held_out": len(test), "accuracy": accuracy,
            "seconds_learn": round(seconds, 3), "store_next": int(start + len(uploads))}
    return store.write(req["version"], method.state_dict(), meta, hook)


def image_paths(store: VersionStore, spec: Spec, job_dir: Path, req: dict,
                index: np.ndarray) -> list[str] | None:
    """Paths of the images in file form: kept in STATE/store/ for a method with an exemplar
    memory (its state refers to them), else the job folder's own files (removed after)."""
    if spec.format.kind != "file":
        return None
    if not spec.uses_memory:
        return [str((job_dir / f["file"]).absolute()) for f in req["images"]]
    out = []
    for i, f in zip(index, req["images"], strict=True):
        path = (store.root / "store" / f"{int(i):08d}{Path(f['file']).suffix}").absolute()
        write_bytes(path, (job_dir / f["file"]).read_bytes())
        out.append(str(path))
    return out


def die_with_parent(parent: int) -> None:
    """End this process when the server that started it dies (also after kill -9), so no
    orphaned job publishes a version behind a restarted server's back. (On Linux the server's
    launcher has already asked for SIGKILL on its death; this covers the moment before, and
    systems without prctl.)"""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """python -m retain.serve.learn STATE_DIR JOB_DIR PARENT_PID NICE (the server starts it
    through server.LAUNCH)"""
    state_dir, job_dir, parent, nice = (argv or sys.argv[1:])[:4]
    die_with_parent(int(parent))
    if int(nice):
        os.nice(int(nice))
    try:
        meta = run_job(state_dir, job_dir)
    except Exception as e:  # reported to the server, which marks the job failed
        write_json(Path(job_dir) / "result.json", {"ok": False,
                                                   "error": f"{type(e).__name__}: {e}"})
        return 1
    write_json(Path(job_dir) / "result.json", {"ok": True, "version": meta["version"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
