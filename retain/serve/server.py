"""The server's state, independent of HTTP: the version store, the served model, learn jobs.

``Server.open`` locks the state folder, removes what an interrupted learn left behind, creates
the folder on first use (version 1 = the run's last checkpoint, or nothing for a server that
starts empty) and loads the highest-numbered complete version whose state verifies.

Concurrency: predictions read ``self.model`` once (the version that answers) and run one at a
time on it; a learn job never touches that object (it learns on a copy rebuilt from the state
on disk, by default in a separate, lower-priority process) and the finished version replaces
``self.model`` in one assignment. One state change at a time: while a job learns, a second
learn and a rollback are refused with 409 naming the running job (not queued: a queue would
learn on top of a version the client has not seen yet).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError, ServeError
from ..io import read_json
from .images import Limits, Upload
from .learn import run_job, write_request
from .model import (
    KNOWN_CLASS_METHODS,
    Model,
    Spec,
    build,
    create_pristine,
    fresh_spec,
    read_run,
    run_spec,
    run_state,
)
from .store import VersionStore

log = logging.getLogger("retain.serve")
# a learn process asks to be killed with the server before its first heavy import
# (PR_SET_PDEATHSIG; learn.main checks the parent again for the moments before that)
LAUNCH = ("import ctypes, signal, sys\n"
          "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
          "except (OSError, AttributeError):\n    pass\n"
          "from retain.serve.learn import main\n"
          "sys.exit(main(sys.argv[1:]))")


@dataclass
class Job:
    """One learn job, as GET /jobs/{id} shows it."""

    id: str
    version: int  # the version it will publish
    base: int | None  # the version it learns on top of
    new_classes: list[str]
    updated_classes: list[str]
    images: int
    state: str = "queued"  # queued, running, done, failed
    error: str | None = None
    accuracy: float | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def describe(self) -> dict:
        d = asdict(self)
        d["seconds"] = None if not self.finished else round(self.finished - self.created, 3)
        return d


@dataclass
class Settings:
    """How a server runs (not what it serves)."""

    token: str | None = None  # None: a random token is made and logged
    token_all: bool = False  # every endpoint but the page and /health needs the token
    limits: Limits = field(default_factory=Limits)
    device: str = "cpu"
    batch_size: int = 32
    learn_in: str = "process"  # process (lower priority, killed with the server) or thread
    nice: int = 19  # CPU priority decrease of a learn process (19: the lowest priority)


class Server:
    def __init__(self, store: VersionStore, spec: Spec, settings: Settings):
        self.store, self.spec, self.settings = store, spec, settings
        self.pristine = create_pristine(spec)
        self.model: Model | None = None
        self.jobs: dict[str, Job] = {}
        self.running: Job | None = None
        self._process: subprocess.Popen | None = None
        self._change = threading.Lock()  # one state change (learn start, rollback) at a time
        self._predict = threading.Lock()  # one forward pass at a time (CPU-bound)
        self._queue: list[_Pending] = []  # predictions waiting for the next forward pass
        self._queue_lock = threading.Lock()

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, state: str | Path, *, run_dir: str | Path | None = None,
             method: str | None = None, backbone: str | None = None,
             params: dict | None = None, weights: str | None = None,
             image_size: int | None = None, seed: int = 1993,
             settings: Settings | None = None) -> Server:
        store = VersionStore(state)
        store.lock()
        try:
            removed = store.clean()
            if removed:
                log.warning("removed what an interrupted learn left: %s", ", ".join(removed))
            if not store.exists:
                spec = create(store, run_dir, method, backbone, params, weights, image_size,
                              seed)
            else:
                spec = Spec.from_dict(store.spec())
                check_same(spec, store.root, run_dir, method, backbone)
            server = cls(store, spec, settings or Settings())
            server.model = server.load_latest()
        except BaseException:
            store.unlock()
            raise
        return server

    def load(self, v: int) -> Model:
        state, meta = self.store.read(v)
        method = build(self.spec, self.pristine, state)
        return Model(method, tuple(meta["classes"]), v, self.spec.format, self.settings.device,
                     self.settings.batch_size)

    def load_latest(self) -> Model | None:
        """The highest complete version whose state verifies (a damaged one is skipped)."""
        for v in reversed(self.store.numbers()):
            try:
                return self.load(v)
            except ServeError as e:
                log.error("version %d not served: %s", v, e)
        return None

    def close(self) -> None:
        p = self._process
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        self.store.unlock()

    # -- answers --------------------------------------------------------------------------------
    def predict(self, uploads: list[Upload], k: int) -> tuple[int, list[list[dict]]]:
        """Top-k of each image and the version that answered. Requests that arrive while a
        forward pass runs are answered together by the next one (group commit: each method's
        prediction of a sample is independent of its batch, a conformance property)."""
        mine = _Pending(uploads, k)
        with self._queue_lock:
            self._queue.append(mine)
        with self._predict:
            while not mine.done.is_set():  # answer the oldest requests until mine is
                with self._queue_lock:
                    batch = take(self._queue, MAX_BATCH)
                self._answer(batch)
        if mine.error is not None:
            raise mine.error
        return mine.version, mine.top

    def _answer(self, batch: list[_Pending]) -> None:
        model = self.model  # read once: this version answers, whatever a job does meanwhile
        try:
            if model is None:
                raise ServeError(409, "the server knows no class yet: teach it with "
                                      "POST /learn")
            top = model.top_k([u for p in batch for u in p.uploads], max(p.k for p in batch))
            for p in batch:
                p.top, top = [t[: p.k] for t in top[: len(p.uploads)]], top[len(p.uploads):]
                p.version = model.version
        except Exception as e:
            for p in batch:
                p.error = e
        for p in batch:
            p.done.set()

    def versions(self) -> list[dict]:
        out = []
        for v in self.store.numbers():
            try:
                out.append(read_json(self.store.folder(v) / "version.json"))
            except OSError:  # deleted meanwhile
                continue
        return out

    def health(self) -> dict:
        m = self.model
        return {"status": "ok", "version": m and m.version, "classes": len(m.class_names)
                if m else 0, "method": self.spec.method, "backbone": self.spec.backbone,
                "input": self.spec.format.describe(),
                "learning": self.running.id if self.running else None,
                "learns_known_classes": self.spec.learns_known_classes,
                "limits": self.settings.limits.describe()}

    # -- changes --------------------------------------------------------------------------------
    def learn(self, uploads: list[Upload], holdout: float = 0.0) -> Job:
        """Start learning ``uploads`` (labelled) as the next task; returns the queued job."""
        if not 0.0 <= holdout < 1.0:
            raise ServeError(422, f"holdout must lie in [0, 1), got {holdout}")
        if not uploads:
            raise ServeError(422, "no image to learn: send labelled images or a zip of "
                                  "<class>/<image> folders")
        with self._change:
            busy(self.running)
            model = self.model
            known = list(model.class_names) if model else []
            labels = list(dict.fromkeys(u.label for u in uploads))
            new = [c for c in labels if c not in known]
            updated = [c for c in labels if c in known]
            if updated and not self.spec.learns_known_classes:
                raise ServeError(422, f"{self.spec.method} learns a class once, from the task "
                                      f"that brings it, and would ignore new images of the "
                                      f"known class(es) {updated[:5]}; send new classes only "
                                      f"(methods that learn known classes: "
                                      f"{', '.join(sorted(KNOWN_CLASS_METHODS))})")
            job = Job(uuid.uuid4().hex[:12], self.store.next_number(),
                      model.version if model else None, new, updated, len(uploads))
            write_request(self.job_dir(job), uploads, job=job.id, version=job.version,
                          base=job.base, holdout=holdout, store_next=self.store_next(),
                          device=self.settings.device, batch_size=self.settings.batch_size)
            self.jobs[job.id] = job
            self.running = job
        threading.Thread(target=self._run, args=(job,), daemon=True,
                         name=f"learn-{job.id}").start()
        return job

    def job_dir(self, job: Job) -> Path:
        return self.store.root / "jobs" / job.id

    def store_next(self) -> int:
        """The first unused index of learned images (never reused while a version uses it)."""
        return max([self.spec.store_offset] + [m.get("store_next", 0) for m in self.versions()])

    def _run(self, job: Job) -> None:
        job.state, job.started = "running", time.time()
        state, error = "failed", None
        try:
            if self.settings.learn_in == "thread":
                run_job(self.store.root, self.job_dir(job))
            else:
                self._run_process(job)
            model = self.load(job.version)
            self.model = model  # the swap: later predictions are answered by the new version
            job.accuracy = self.store.meta(job.version).get("accuracy")
            state = "done"
            log.info("job %s done: version %d serves %d classes", job.id, job.version,
                     len(model.class_names))
        except Exception as e:
            error = f"{type(e).__name__}: {e}"[:2000]
            log.error("job %s failed: %s", job.id, error)
        finally:
            shutil.rmtree(self.job_dir(job), ignore_errors=True)
            job.finished = time.time()
            self.running = None
            job.error, job.state = error, state  # last: who sees the end may send the next job

    def _run_process(self, job: Job) -> None:
        import retain

        root = str(Path(retain.__file__).resolve().parents[1])
        env = os.environ | {"PYTHONPATH": os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        job_dir = self.job_dir(job)
        with open(job_dir / "log.txt", "wb") as out:
            self._process = subprocess.Popen(
                [sys.executable, "-c", LAUNCH, str(self.store.root.absolute()),
                 str(job_dir.absolute()), str(os.getpid()), str(self.settings.nice)],
                stdout=out, stderr=subprocess.STDOUT, env=env)
            rc = self._process.wait()
        self._process = None
        result = job_dir / "result.json"
        if result.is_file():
            r = read_json(result)
            if not r["ok"]:
                raise ServeError(500, r["error"])
        elif rc != 0:
            tail = (job_dir / "log.txt").read_text(errors="replace")[-800:]
            raise ServeError(500, f"the learn process ended with code {rc}: {tail}")

    def rollback(self, v: int) -> dict:
        """Serve version ``v`` again, as a new version holding its state."""
        with self._change:
            busy(self.running)
            meta = self.store.meta(v)  # 404 for an unknown version
            current = self.model.version if self.model else None
            if v == current:
                raise ServeError(409, f"version {v} is already served")
            new = self.store.next_number()
            keep = ("task", "tasks_learned", "classes", "accuracy", "held_out", "images")
            out = self.store.copy(new, v, {**{k: meta.get(k) for k in keep}, "kind": "rollback",
                                           "rollback_of": v, "parent": current,
                                           "new_classes": [], "store_next": self.store_next()})
            self.model = self.load(new)
            return out

    def delete(self, v: int) -> None:
        with self._change:
            busy(self.running)
            self.store.delete(v)


MAX_BATCH = 64  # images answered by one forward pass (at least one request)


@dataclass(eq=False)
class _Pending:
    """One /predict request waiting for a forward pass."""

    uploads: list[Upload]
    k: int
    done: threading.Event = field(default_factory=threading.Event)
    top: list | None = None
    version: int | None = None
    error: Exception | None = None


def take(queue: list[_Pending], most: int) -> list[_Pending]:
    """The first requests of ``queue`` (removed from it), at most ``most`` images (or one)."""
    n, images = 0, 0
    while n < len(queue) and (n == 0 or images + len(queue[n].uploads) <= most):
        images += len(queue[n].uploads)
        n += 1
    batch = queue[:n]
    del queue[:n]
    return batch


def busy(job: Job | None) -> None:
    if job is not None:
        raise ServeError(409, f"job {job.id} is learning version {job.version}; one learn job "
                              f"runs at a time: wait until GET /jobs/{job.id} says done or "
                              f"failed, then send again")


def create(store: VersionStore, run_dir, method, backbone, params, weights, image_size,
           seed) -> Spec:
    """A new state folder: from a run folder (version 1 = its last checkpoint) or empty."""
    if run_dir is not None:
        spec, names = run_spec(run_dir, learning=True)
        served = run_state(run_dir, spec, create_pristine(spec))
        _, results = read_run(run_dir)
        last = results["stages"][-1]
        shutil.rmtree(store.versions, ignore_errors=True)  # an interrupted creation's, if any
        store.write(1, served.state_dict(), {
            "kind": "run", "parent": None, "task": last["task"],
            "tasks_learned": served.tasks_learned_, "classes": list(names),
            "new_classes": list(names), "images": None, "held_out": None,
            "accuracy": sum(last["correct"]) / max(1, sum(last["total"])),
            "accuracy_on": "the run's test images of every seen class",
            "store_next": spec.store_offset, "source": str(Path(run_dir).absolute())})
        store.initialise(spec.to_dict())  # last: a folder with server.json has its version 1
        return spec
    if method is None or backbone is None:
        raise ConfigError(f"{store.root} is no state folder yet: pass a run folder, or "
                          f"--method and --backbone to start an empty model")
    spec = fresh_spec(method, backbone, params, weights=weights, image_size=image_size,
                      seed=seed)
    store.initialise(spec.to_dict())
    return spec


def check_same(spec: Spec, root: Path, run_dir, method, backbone) -> None:
    """A state folder serves what it was created for; refuse a conflicting request."""
    asked = {"method": method, "backbone": backbone}
    for key, value in asked.items():
        if value is not None and value != getattr(spec, key):
            raise ConfigError(f"{root} serves {key} {getattr(spec, key)!r}, not {value!r}; "
                              f"pass another --state folder to start another model")
    if run_dir is not None and spec.origin.get("run_dir") not in (None, str(Path(run_dir)
                                                                              .absolute())):
        raise ConfigError(f"{root} was created from {spec.origin['run_dir']}, not {run_dir}; "
                          f"pass another --state folder")
