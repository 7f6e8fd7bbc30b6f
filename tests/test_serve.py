"""retain predict / retain serve: predictions equal the protocol's, learning publishes versions
atomically, and every refusal answers with its status and names its limit."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from retain.backbones import create_backbone  # noqa: E402
from retain.cli import main  # noqa: E402
from retain.context import Context  # noqa: E402
from retain.datasets import Split, create_dataset  # noqa: E402
from retain.io import read_json  # noqa: E402
from retain.methods import create_method  # noqa: E402
from retain.runner import restore  # noqa: E402
from retain.serve import create_app  # noqa: E402
from retain.serve.images import Limits  # noqa: E402
from retain.serve.store import VersionStore  # noqa: E402
from retain.verify import load_results  # noqa: E402

TOKEN = {"Authorization": "Bearer s3cret"}


def png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG")
    return b.getvalue()


def pattern(kind: str, i: int) -> np.ndarray:
    """8x8 gray images of two shapes no digit looks like (noise makes each image different)."""
    a = np.random.RandomState(i).randint(0, 20, (8, 8)).astype(np.uint8)
    if kind == "star":
        a[3:5, :] = 250
        a[:, 3:5] = 250
    else:  # "moon": the left half lit
        a[:, :4] = 250
    return a


def files(kind: str, n: int, folder: bool = True) -> list:
    return [("files", (f"{kind}/{i}.png" if folder else f"{i}.png", png(pattern(kind, i)),
                       "image/png")) for i in range(n)]


def wait(client, job: str, timeout: float = 120) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        j = client.get(f"/jobs/{job}").json()
        if j["state"] in ("done", "failed"):
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job} still {j['state']} after {timeout}s")


@pytest.fixture(scope="module")
def digits():
    """Test images of the run's dataset (8x8 gray arrays) and their class names."""
    b = create_dataset("digits").load()
    pick = np.arange(0, len(b.test), 37)[:12]
    return b.test.data[pick], [b.class_names[int(t)] for t in b.test.targets[pick]]


@pytest.fixture
def client(serve_run, tmp_path):
    app = create_app(serve_run, state=tmp_path / "state", token="s3cret", learn_in="thread")
    with TestClient(app) as c:
        yield c


def direct_logits(run_dir, images: np.ndarray) -> torch.Tensor:
    """The run's last checkpoint through the protocol alone (no serve code)."""
    method = create_method("simplecil", create_backbone("vit_tiny_random", image_size=16))
    restore(method, run_dir, load_results(run_dir), 1)
    return method.predict(Split(images, np.zeros(len(images))), Context())


# -- retain predict ------------------------------------------------------------------------------
def test_predict_cli_equals_the_protocol(serve_run, digits, tmp_path, capsys):
    images, _ = digits
    for i, a in enumerate(images):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        (tmp_path / "imgs" / f"{i:02d}.png").write_bytes(png(a))
    assert main(["predict", str(serve_run), str(tmp_path / "imgs"), "--json", "-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    logits = direct_logits(serve_run, images)  # (12, 10)
    names = read_json(serve_run / "results.json")["class_names"]
    for p, row in zip(out["predictions"], logits, strict=True):
        scores, labels = row.topk(3)
        assert [t["class"] for t in p["top"]] == [names[int(c)] for c in labels]
        assert np.allclose([t["score"] for t in p["top"]], scores.numpy(), atol=1e-6)
    assert main(["predict", str(serve_run), str(tmp_path / "imgs" / "00.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["image", "top-1", "score"] and len(table) == 2
    assert main(["predict", str(serve_run), str(tmp_path / "none.png")]) == 2
    assert "neither an image file nor a folder" in capsys.readouterr().err


# -- the service ---------------------------------------------------------------------------------
def test_predict_learn_versions_rollback(client, serve_run, digits, caplog):
    images, _ = digits
    caplog.set_level(logging.INFO, logger="retain.serve")
    h = client.get("/health").json()
    assert h["version"] == 1 and h["classes"] == 10 and h["input"].startswith("8x8")
    multi = client.post("/predict", files=[("files", (f"{i}.png", png(a), "image/png"))
                                           for i, a in enumerate(images)]).json()
    js = client.post("/predict", json={"images": [base64.b64encode(png(a)).decode()
                                                  for a in images], "k": 5}).json()
    assert multi["version"] == js["version"] == 1
    top1 = direct_logits(serve_run, images).argmax(1)
    names = client.get("/classes").json()["classes"]
    assert [p["top"][0]["class"] for p in multi["predictions"]] == [names[int(c)] for c in top1]
    assert [p["top"] for p in multi["predictions"]] == [p["top"] for p in js["predictions"]]
    assert "POST /predict 200" in caplog.text

    r = client.post("/learn", files=files("star", 6), data={"holdout": "0.34"}, headers=TOKEN)
    assert r.status_code == 202 and r.json()["version"] == 2
    job = wait(client, r.json()["job"])
    assert job["state"] == "done" and job["new_classes"] == ["star"], job
    assert job["accuracy"] == 1.0  # the 2 held-out stars are recognised
    star = client.post("/predict", files=[("files", ("s.png", png(pattern("star", 99)),
                                                     "image/png"))]).json()
    assert star["version"] == 2 and star["predictions"][0]["top"][0]["class"] == "star"
    versions = client.get("/versions").json()
    assert versions["current"] == 2
    v2 = versions["versions"][1]
    assert (v2["parent"], v2["images"], v2["held_out"], v2["classes"][-1]) == (1, 4, 2, "star")

    r = client.post("/rollback/1", headers=TOKEN).json()
    assert r["version"] == 3 and "star" not in r["classes"]
    after = client.post("/predict", files=[("files", ("s.png", png(pattern("star", 99)),
                                                      "image/png"))]).json()
    assert after["version"] == 3 and after["predictions"][0]["top"][0]["class"] != "star"
    assert client.delete("/versions/2", headers=TOKEN).json() == {"deleted": 2}
    assert [v["version"] for v in client.get("/versions").json()["versions"]] == [1, 3]
    assert client.delete("/versions/3", headers=TOKEN).status_code == 409  # the one served
    r = client.post("/learn", files=files("moon", 3), headers=TOKEN)  # next number: never reused
    assert r.json()["version"] == 4 and wait(client, r.json()["job"])["state"] == "done"


def zipped(entries: dict[str, bytes]) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return b.getvalue()


def test_learn_from_a_zip_and_raw_body(client):
    z = zipped({f"shapes/{k}/{i}.png": png(pattern(k, i)) for k in ("star", "moon")
                for i in range(3)} | {"__MACOSX/shapes/._x": b"junk", "shapes/.DS_Store": b""})
    r = client.post("/learn", content=z, headers=TOKEN | {"content-type": "application/zip"})
    assert r.status_code == 202, r.text
    assert sorted(r.json()["new_classes"]) == ["moon", "star"] and r.json()["images"] == 6
    assert wait(client, r.json()["job"])["state"] == "done"
    body = png(pattern("moon", 50))
    p = client.post("/predict", content=body, headers={"content-type": "image/png"}).json()
    assert p["predictions"][0]["top"][0]["class"] == "moon"


@pytest.mark.parametrize("request_kwargs,status,text", [
    ({}, 401, "Authorization: Bearer"),
    ({"headers": {"Authorization": "Bearer nope"}}, 401, "wrong token"),
    ({"headers": TOKEN, "files": [("files", ("x/a.png", b"not an image", "image/png"))]}, 422,
     "is not an image"),
    ({"headers": TOKEN, "files": [("files", ("a.png", png(pattern("star", 0)), "image/png"))]},
     422, "not inside a class folder"),
    ({"headers": TOKEN, "files": [("files", ("z.zip", zipped({"../evil/a.png": png(
        pattern("star", 0))}), "application/zip"))]}, 422, "escape the upload folder"),
    ({"headers": TOKEN, "files": [("files", ("z.zip", zipped({"/abs/a.png": png(
        pattern("star", 0))}), "application/zip"))]}, 422, "escape the upload folder"),
    ({"headers": TOKEN, "files": files("3", 2)}, 422, "known class(es) ['3']"),
    ({"headers": TOKEN, "files": files("star", 2), "data": {"holdout": "1.5"}}, 422, "holdout"),
    ({"headers": TOKEN | {"content-type": "application/json"}, "content": b"{"}, 422,
     "not valid JSON"),
    ({"headers": TOKEN | {"content-type": "text/plain"}, "content": b"x"}, 415, "multipart"),
])
def test_learn_refusals(client, request_kwargs, status, text):
    r = client.post("/learn", **request_kwargs)
    assert r.status_code == status and text in r.json()["detail"], r.text
    assert client.get("/health").json()["version"] == 1  # nothing changed


def png_header(width: int, height: int) -> bytes:
    """A PNG that announces width x height 8-bit gray pixels (and holds none)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_limits_answer_413_naming_the_limit(serve_run, tmp_path):
    limits = Limits(max_request_bytes=20_000, max_image_bytes=5_000, max_image_pixels=4096,
                    max_predict_images=3, max_learn_images=4)
    app = create_app(serve_run, state=tmp_path / "s", token="s3cret", limits=limits,
                     learn_in="thread")
    with TestClient(app) as c:
        def predict(**kw):
            r = c.post("/predict", **kw)
            return r.status_code, r.json()["detail"]

        huge = os.urandom(30_000)
        assert predict(content=huge, headers={"content-type": "image/png"}) == (
            413, "the request body is 30000 bytes, over the limit max_request_bytes=20000")
        status, text = predict(files=[("files", ("a.png", os.urandom(6_000), "image/png"))])
        assert status == 413 and "max_image_bytes=5000" in text
        big = png(np.zeros((100, 100), np.uint8))  # 10,000 pixels, a few hundred bytes
        status, text = predict(files=[("files", ("a.png", big, "image/png"))])
        assert status == 413 and "100x100 = 10000 pixels" in text and "max_image_pixels" in text
        bomb = png_header(30_000, 30_000)  # 900 Mpixels announced: Pillow's guard answers
        status, text = predict(files=[("files", ("bomb.png", bomb, "image/png"))])
        assert status == 413 and "decompression bomb" in text and "max_image_pixels" in text
        for n in (4, 9):  # counted by us, or already by the multipart parser
            status, text = predict(files=files("star", n))
            assert status == 413 and "max_predict_images=3" in text
        r = c.post("/learn", files=files("star", 5), headers=TOKEN)
        assert r.status_code == 413 and "max_learn_images=4" in r.json()["detail"]

        def chunks():  # no content-length: counted while it arrives
            for _ in range(4):
                yield b"\0" * 8_000
        r = c.post("/predict", content=chunks(), headers={"content-type": "image/png"})
        assert r.status_code == 413 and "max_request_bytes=20000" in r.json()["detail"]


def test_learn_while_learning_is_refused_and_predictions_do_not_wait(client, monkeypatch):
    import retain.serve.server as server_module

    gate, real = threading.Event(), server_module.run_job
    monkeypatch.setattr(server_module, "run_job", lambda *a: (gate.wait(60), real(*a)))
    r = client.post("/learn", files=files("star", 3), headers=TOKEN)
    job = r.json()["job"]
    second = client.post("/learn", files=files("moon", 3), headers=TOKEN)
    assert second.status_code == 409 and job in second.json()["detail"]
    assert client.post("/rollback/1", headers=TOKEN).status_code == 409
    assert client.get("/health").json()["learning"] == job
    p = client.post("/predict", files=files("star", 1))  # answered now, by version 1
    assert p.status_code == 200 and p.json()["version"] == 1
    gate.set()
    assert wait(client, job)["state"] == "done"
    assert client.post("/predict", files=files("star", 1)).json()["version"] == 2


def test_a_failed_job_publishes_nothing(client, monkeypatch):
    import retain.serve.server as server_module

    def fail(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(server_module, "run_job", fail)
    r = client.post("/learn", json={"images": [{"data": base64.b64encode(png(pattern(
        "star", 0))).decode(), "label": "star"}]}, headers=TOKEN)
    job = wait(client, r.json()["job"])
    assert job["state"] == "failed" and job["error"] == "RuntimeError: out of memory"
    assert client.get("/health").json()["learning"] is None
    assert [v["version"] for v in client.get("/versions").json()["versions"]] == [1]
    r = client.post("/learn", json={"images": [{"data": "AAAA"}]}, headers=TOKEN)
    assert r.status_code == 422 and "has no label" in r.json()["detail"]


def test_concurrent_predictions_share_a_forward_pass(client, digits):
    """Requests that wait for a forward pass are answered by one (the answers equal those of
    one request each, and name the same version)."""
    from retain.serve.images import decode

    server, images = client.app.state.server, digits[0]
    uploads = [[decode(png(a), Limits(), f"{i}.png")] for i, a in enumerate(images)]
    alone = [server.predict(u, 3) for u in uploads]
    calls, top_k = [], server.model.top_k
    server.model.top_k = lambda ups, k: (calls.append(len(ups)), top_k(ups, k))[1]
    answers = [None] * len(uploads)

    def ask(i):
        answers[i] = server.predict(uploads[i], 2 + i % 2)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(uploads))]
    with server._predict:  # a forward pass is running: every request waits
        for t in threads:
            t.start()
        while len(server._queue) < len(uploads):
            time.sleep(0.01)
    for t in threads:
        t.join()
    assert calls == [len(uploads)]
    for i, (version, top) in enumerate(answers):
        expected = alone[i][1][0][: 2 + i % 2]  # equal up to float summation order
        assert version == 1 and [t["class"] for t in top[0]] == [t["class"] for t in expected]
        assert np.allclose([t["score"] for t in top[0]], [t["score"] for t in expected],
                           atol=1e-5)


def test_other_refusals(client, serve_run, tmp_path):
    assert client.post("/rollback/9", headers=TOKEN).status_code == 404
    assert client.post("/rollback/1", headers=TOKEN).status_code == 409  # already served
    assert client.get("/jobs/nope").status_code == 404
    assert client.delete("/versions/1").status_code == 401
    r = client.post("/predict", files=[("files", ("a.txt", b"hello", "text/plain"))])
    assert r.status_code == 422 and "not an image" in r.json()["detail"]
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, "TIFF")  # an image, but not an accepted format
    r = client.post("/predict", files=[("files", ("a.tif", gif.getvalue(), "image/tiff"))])
    assert r.status_code == 422 and "PNG, JPEG" in r.json()["detail"]
    b64 = base64.b64encode(png(pattern("star", 0))).decode()
    for k in ("x", 0, 2.5):
        r = client.post("/predict", json={"images": [b64], "k": k})
        assert r.status_code == 422 and "k must be" in r.json()["detail"]
    r = client.post("/predict", json={"images": ["not base64!"]})
    assert r.status_code == 422 and "not valid base64" in r.json()["detail"]
    assert client.get("/openapi.json").json()["paths"]["/learn"]
    assert "<title>retain serve</title>" in client.get("/").text


def test_token_all_guards_reads_and_state_folder_is_locked(serve_run, tmp_path):
    app = create_app(serve_run, state=tmp_path / "s", token="s3cret", token_all=True,
                     learn_in="thread")
    with TestClient(app) as c:
        assert c.post("/predict", files=files("star", 1)).status_code == 401
        assert c.get("/versions").status_code == 401
        assert c.post("/predict", files=files("star", 1), headers=TOKEN).status_code == 200
        assert c.get("/health").status_code == 200
        from retain.errors import ServeError

        with pytest.raises(ServeError, match="another server is using"):
            create_app(serve_run, state=tmp_path / "s", token="x", learn_in="thread")


# -- the version store -----------------------------------------------------------------------------
KILL_MID_WRITE = """
import os, signal, sys
from retain.serve.learn import run_job
run_job(sys.argv[1], sys.argv[2], hook=lambda: os.kill(os.getpid(), signal.SIGKILL))
"""


def test_a_learn_killed_mid_write_leaves_the_previous_version_served(serve_run, tmp_path):
    from retain.serve.images import decode
    from retain.serve.learn import write_request

    with TestClient(create_app(serve_run, state=tmp_path / "s", token="s3cret")) as c:
        server = c.app.state.server
        uploads = [decode(png(pattern("star", i)), Limits(), f"{i}.png", "star")
                   for i in range(3)]
        job_dir = server.store.root / "jobs" / "killed"
        write_request(job_dir, uploads, job="killed", version=2, base=1, holdout=0.0,
                      store_next=server.store_next())
        env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
        p = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(server.store.root),
                            str(job_dir)], env=env, capture_output=True, timeout=300)
        assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
        left = sorted(x.name for x in server.store.versions.iterdir())
        assert left[0].startswith(".v0002.") and left[1:] == ["v0001"]  # written, unpublished
        assert server.store.numbers() == [1]
    # a restart on the same folder (no run folder needed any more)
    with TestClient(create_app(state=tmp_path / "s", token="s3cret", learn_in="thread")) as c:
        assert c.get("/health").json()["version"] == 1
        assert [v["version"] for v in c.get("/versions").json()["versions"]] == [1]
        assert sorted(x.name for x in (tmp_path / "s" / "versions").iterdir()) == ["v0001"]
        assert not (tmp_path / "s" / "jobs" / "killed").exists()
        r = c.post("/learn", files=files("star", 3), headers=TOKEN)
        assert r.json()["version"] == 2 and wait(c, r.json()["job"])["state"] == "done"


def test_store_skips_damaged_and_incomplete_versions(client):
    store: VersionStore = client.app.state.server.store
    state, meta = store.read(1)
    store.write(2, state, {**meta, "kind": "copy"})
    store.write(3, state, {**meta, "kind": "copy"})
    (store.folder(3) / "state.safetensors").write_bytes(b"x" * meta["bytes"])  # same size
    (store.folder(2) / "version.json").unlink()  # incomplete: not a version
    assert store.numbers() == [1, 3]
    assert client.app.state.server.load_latest().version == 1  # 3 fails its sha256
    assert store.next_number() == 4


# -- methods: known classes, memory, learning in a process ---------------------------------------
def test_known_class_methods_learn_and_simplecil_is_refused(tmp_path):
    """A method listed in KNOWN_CLASS_METHODS changes its predictions after images of a known
    class; the server accepts them for it (here ranpac, closed-form after its first task)."""
    app = create_app(method="ranpac", backbone="vit_tiny_random", state=tmp_path / "s",
                     params={"peft": "none", "projection_dim": 64}, image_size=16,
                     token="s3cret", learn_in="thread")
    with TestClient(app) as c:
        r = c.post("/learn", files=files("star", 4) + files("moon", 4), headers=TOKEN)
        assert wait(c, r.json()["job"])["state"] == "done"
        probe = [("files", ("p.png", png(pattern("moon", 77) // 2 + pattern("star", 77) // 2),
                            "image/png"))]
        before = c.post("/predict", files=probe).json()["predictions"][0]["top"]
        r = c.post("/learn", files=[("files", (f"moon/x{i}.png", png(pattern("moon", i) // 2 +
                                                                      pattern("star", i) // 2),
                                               "image/png")) for i in range(8)], headers=TOKEN)
        assert r.json()["updated_classes"] == ["moon"] and r.json()["new_classes"] == []
        assert wait(c, r.json()["job"])["state"] == "done"
        after = c.post("/predict", files=probe).json()
        assert after["version"] == 2 and after["predictions"][0]["top"] != before
        assert after["predictions"][0]["top"][0]["class"] == "moon"


def test_memory_method_keeps_its_images_across_learns_and_restarts(tmp_path):
    """replay's exemplars of two learn jobs share one split (one key, distinct indices) and
    refer to image files kept in STATE/store/, which a restarted server reads again."""
    params = {"epochs": 2, "lr": 0.05, "batch_size": 4, "memory_size": 4,
              "memory_batch_size": 2}
    kw = dict(method="replay", backbone="vit_tiny_random", params=params, image_size=16,
              state=tmp_path / "s", token="s3cret", learn_in="thread")
    with TestClient(create_app(**kw)) as c:
        for kind in ("star", "moon"):
            r = c.post("/learn", files=files(kind, 4), headers=TOKEN)
            assert wait(c, r.json()["job"])["state"] == "done", c.get(f"/jobs/{r.json()['job']}")
        stored = sorted(p.name for p in (tmp_path / "s" / "store").iterdir())
        assert stored == [f"{i:08d}.png" for i in range(8)]
    with TestClient(create_app(**kw)) as c:
        assert c.get("/classes").json() == {"version": 2, "classes": ["star", "moon"]}
        r = c.post("/learn", files=files("star", 3, folder=True), headers=TOKEN)  # known class
        assert wait(c, r.json()["job"])["state"] == "done"
        assert c.get("/health").json()["version"] == 3


def test_learning_in_a_process(serve_run, tmp_path):
    app = create_app(serve_run, state=tmp_path / "s", token="s3cret", nice=0)
    with TestClient(app) as c:
        r = c.post("/learn", files=files("star", 3), headers=TOKEN)
        job = wait(c, r.json()["job"], timeout=300)
        assert job["state"] == "done", job
        p = c.post("/predict", files=files("star", 1)).json()
        assert p["version"] == 2 and p["predictions"][0]["top"][0]["class"] == "star"
