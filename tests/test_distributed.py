"""Runs over 2 gloo processes on the CPU equal runs in one process (retain.distributed).

One spawn of 2 processes runs every job of ``JOBS`` (tests/distributed_jobs.py); each test
compares its job's output on both ranks with the same job run here, in one process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_jobs import max_difference, run_job, same, spawn

from retain.distributed import REFUSED, Dist, check_method, refusal
from retain.errors import ConfigError

STEP = {"epochs": 1, "batch_size": 24}  # the 24 images of task 0 in one global batch
JOBS = {
    # whole runs of the closed-form methods on frozen features (SimpleCIL on a disk cache)
    "simplecil": ("run", "simplecil", {}, True),
    "ranpac": ("run", "ranpac", {"peft": "none", "projection_dim": 256}, False),
    "layup": ("run", "layup", {"peft": "none", "layers": 2}, False),
    "ease": ("run", "ease", {"epochs": 0}, False),
    # ... and with first-session adaptation (trained over 2 ranks, then closed form)
    "ranpac-adapted": ("run", "ranpac", {"peft": "finetune", "epochs": 1, "batch_size": 8,
                                         "projection_dim": 256}, False),
    # one training step: 2 ranks x 12 images against 1 process x 24
    "finetune": ("learn", "finetune", {"lr": 0.05} | STEP, 1),
    "l2p": ("learn", "l2p", {"lr": 0.01, "augment": False, "pool_size": 4, "top_k": 2,
                             "prompt_length": 2, "head_type": "token"} | STEP, 1),
    "coda_prompt": ("learn", "coda_prompt", {"layers": (0, 1), "pool_size": 6, "num_tasks": 3,
                                             "prompt_length": 4, "lr": 0.01} | STEP, 1),
    "aper": ("learn", "aper", {"peft": "adapter", "augment": True} | STEP, 1),
    "slca": ("learn", "slca", {"lr": 0.05, "augment": False, "ca_samples": 32,
                               "ca_epochs": 1} | STEP, 1),
    # exemplar memories over 3 tasks
    "icarl": ("learn", "icarl", {"epochs": 2, "lr": 0.05, "batch_size": 4, "memory_size": 12}, 3),
    "replay": ("learn", "replay", {"epochs": 2, "lr": 0.05, "batch_size": 4, "memory_size": 12,
                                   "memory_batch_size": 4}, 3),
    # -- branch distA: own loops, teachers, growth, memories, coupled batches over 2 tasks --
    "dytox": ("learn-with", "pixels", "dytox", {
        "embed_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 4, "epochs": 1,
        "finetune_epochs": 1, "batch_size": 24, "lr": 0.05, "finetune_lr": 0.05,
        "warmup_epochs": 0, "memory_size": 6, "drop_path": 0.5, "mixup": 0.8}, 2),
    "zscl": ("learn-with", "clip_tiny_random", "zscl", {
        "iterations": 3, "batch_size": 10, "lr": 1e-3, "warmup": 0, "avg_freq": 1,
        "reference": "current"}, 1),
    "zscl-gradients": ("last-gradients", "clip_tiny_random", "zscl", {
        "iterations": 2, "batch_size": 10, "lr": 1e-3, "warmup": 0, "reference": "current"}),
    "apg": ("learn-with", "vit_tiny_random", "apg", {
        "immediate_layer": 0, "epochs": 1, "batch_size": 24, "lr": 1e-3, "warmup_epochs": 0,
        "center_samples": 16, "finetune_epochs": 1, "finetune_epochs_per_task": 0,
        "proxies_per_class": 2, "augment": False}, 2),
    "hide_prompt": ("learn-with", "vit_tiny_random", "hide_prompt", {
        "e_layers": (0,), "prompt_length": 2, "epochs": 1, "batch_size": 24, "lr": 0.01,
        "tii_epochs": 1, "n_centroids": 2, "ca_epochs": 1, "ca_samples": 8,
        "tii_ca_samples": 8}, 2),
    "proof": ("learn-with", "clip_tiny_random", "proof", {
        "epochs": 1, "batch_size": 24, "lr": 0.05, "memory_size": 6}, 2),
    # one backward of an in-batch contrastive loss under each way of sharding a batch
    **{f"coupled-{mode}-{n}": ("coupled", mode, n) for mode in ("loss", "outputs", "replicate")
       for n in (7, 1)},
    # branch distB: methods with their own loops (tiny nets on 16 px raw pixels)
    # SupSup GG, one step of RMSprop on the global batch of 24; per-task BN: whole batches
    "supsup": ("learn-on", "supsup", {"batchnorm": True, "lr": 0.01} | STEP, 1, "pixels",
               "TIL-B0Inc2"),
    # SupSup NNs, 3 tasks of 6 steps, a new-mask decision every 3 (SGD: see its test)
    "supsup_gn": ("learn-on", "supsup_gn", {"mode": "NNs", "net": "fc300x100", "output_size": 6,
                                            "optimizer": "sgd", "lr": 0.1, "epochs": 2,
                                            "batch_size": 8, "nns_every": 3,
                                            "nns_threshold": 1.01}, 3, "pixels", "B0Inc2"),
    # DEN over 3 tasks: always expands (tau 0) and splits (sigma 0)
    "den": ("learn-on", "den", {"hidden": (16, 8), "steps": 6, "batch_size": 8,
                                "loss_threshold": 0.0, "split_threshold": 0.0,
                                "expand_units": 2}, 3, "pixels", "TIL-B0Inc2"),
    # APD over 2 tasks: best-epoch pick on validation, then one k-means consolidation
    "apd": ("learn-on", "apd", {"conv_channels": (), "hidden": (16,), "epochs": 2,
                                "batch_size": 8, "select_last": 2, "cluster_every": 2,
                                "k_centroids": 1}, 2, "pixels", "TIL-B0Inc2"),
    # a whole SupSup GN run: training, then task inference and logits split over the ranks
    "supsup_gn-run": ("run", "supsup_gn", {"net": "fc300x100", "output_size": 2, "epochs": 2,
                                           "batch_size": 8, "optimizer": "sgd", "lr": 0.1},
                      False),
}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """Per rank, {job: output} of a 2-process run of every job."""
    outputs, _ = spawn(JOBS, world=2)
    return outputs


@functools.cache
def alone(job: str):
    """The job in this one process (on one thread, as each rank: LAPACK's solves of RanPAC's
    ill-conditioned ridge systems, λ = 1e-8, differ in the last digits with the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_job(job, JOBS[job], Dist(), tempfile.mkdtemp(prefix="retain-one-"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["simplecil", "ranpac", "layup", "ease", "ranpac-adapted"])
def test_closed_form_runs_equal_one_process(ranks, method):
    one = alone(method)
    for rank in ranks:
        np.testing.assert_array_equal(np.array(rank[method]["matrix"], dtype=float),
                                      np.array(one["matrix"], dtype=float))
        assert [s["correct"] for s in rank[method]["stages"]] == \
            [s["correct"] for s in one["stages"]]
    for a, b, want in zip(ranks[0][method]["states"], ranks[1][method]["states"], one["states"],
                          strict=True):
        assert max_difference(a, b) == 0.0  # every rank solves the identical head
        if method != "ranpac-adapted":
            assert max_difference(a, want) < 1e-6
        else:  # trained: float sums in another order, then a ridge solve
            assert max_difference(a, want, relative=True) < 1e-4
    assert [s["images_embedded"] for s in ranks[0][method]["stages"]] == \
        [s["images_embedded"] for s in one["stages"]]
    # every image embedded once in total across ranks, as by one process
    assert sum(r[method]["embedded"] for r in ranks) == one["embedded"]
    assert all(0 < r[method]["embedded"] < one["embedded"] for r in ranks)


def test_simplecil_embeds_each_image_once(ranks):
    one = alone("simplecil")
    assert one["embedded"] == 6 * (12 + 6)  # every train and test image of the tiny stream
    assert sum(r["simplecil"]["embedded"] for r in ranks) == one["embedded"]


@pytest.mark.parametrize("method", ["finetune", "l2p", "coda_prompt", "aper", "slca"])
def test_one_step_of_two_ranks_equals_one_process_with_twice_the_batch(ranks, method):
    one = alone(method)[0]
    assert max_difference(ranks[0][method][0], ranks[1][method][0]) == 0.0
    assert max_difference(ranks[0][method][0], one) < 1e-5
    moved = learn_nothing(method)
    assert max_difference(one, moved) > 1e-4  # the step moved parameters 10x the tolerance


@pytest.mark.parametrize("n", [7, 1])
@pytest.mark.parametrize("mode", ["outputs", "replicate"])
def test_losses_that_couple_a_batch_get_one_process_gradients(ranks, mode, n):
    """Gathered outputs (B x B contrast) and replicated batches (dropout of the batch's shape)
    give the one-process gradient and loss on every rank; a batch of 1 row is replicated."""
    one = alone(f"coupled-{mode}-{n}")
    for rank in ranks:
        assert max_difference(rank[f"coupled-{mode}-{n}"], one) < 1e-6


def test_splitting_the_loss_of_a_coupled_batch_is_not_one_process(ranks):
    """The default ("loss") is wrong for an in-batch contrast: what the other modes are for."""
    assert max_difference(ranks[0]["coupled-loss-7"], alone("coupled-loss-7")) > 1e-3
    assert max_difference(ranks[0]["coupled-loss-1"], alone("coupled-loss-1")) < 1e-6


@pytest.mark.parametrize("method", ["icarl", "replay"])
def test_memories_are_identical_on_both_ranks_after_every_task(ranks, method):
    for a, b in zip(ranks[0][method], ranks[1][method], strict=True):
        memory = {k: v for k, v in a.items() if k.startswith("memory.")}
        assert memory and same(memory, {k: b[k] for k in memory})
        assert same(a, b)


# -- branch distB: supsup, supsup_gn, den, apd (own loops, decisions on rank 0) -------------

def one_process(method: str, **change) -> list[dict]:
    kind, name, params, *rest = JOBS[method]
    return run_job(method, (kind, name, params | change, *rest), Dist(), tempfile.mkdtemp())


def test_supsup_step_of_two_ranks_equals_one_process(ranks):
    """One RMSprop step on 24 images with per-task BN: each rank runs the whole batch
    ("replicate": BN's batch statistics are the batch's), so masks and BN statistics equal one
    process's bit for bit."""
    one = alone("supsup")[0]
    assert same(ranks[0]["supsup"][0], ranks[1]["supsup"][0])
    assert same(ranks[0]["supsup"][0], one)
    moved = one_process("supsup", lr=1e-9)[0]
    assert not torch.equal(one["masks.0"], moved["masks.0"])  # the step flipped mask entries
    assert one["bn.0.mean"].abs().min() > 0  # BN statistics of the step's batch


@pytest.mark.parametrize("method", ["supsup_gn", "den", "apd"])
def test_decisions_on_rank_0_give_one_process_states(ranks, method):
    """Several tasks with decisions (SupSup NNs: new mask or which; DEN: expansion, selection,
    split, dead units; APD: best epoch, k-means): both ranks hold the same state after every
    task, equal to one process's (to 1e-5: float sums in another order), the same structure."""
    one = alone(method)
    for a, b, want in zip(ranks[0][method], ranks[1][method], one, strict=True):
        assert same(a, b)
        assert a.keys() == want.keys()
        assert all(torch.equal(a[k], want[k]) for k in a if not a[k].is_floating_point())
        assert max_difference(a, want) < 1e-5
    grown = {"supsup_gn": lambda s: 2 <= len(s["slot_task"]) < 18 // 3,  # new masks, reused
             "den": lambda s: (s["stamps"][-1] > s["stamps"][0]).all(),  # expanded and split
             "apd": lambda s: "local.0.0" in s}  # consolidated
    assert grown[method](one[-1])


def test_supsup_gn_run_with_split_task_inference_equals_one_process(ranks):
    """Task inference (alpha gradients per sample) and logits through predict_batches, each
    rank on its share of the test images: the 1-process matrix and per-task correct counts."""
    one = alone("supsup_gn-run")
    for rank in ranks:
        np.testing.assert_array_equal(np.array(rank["supsup_gn-run"]["matrix"], dtype=float),
                                      np.array(one["matrix"], dtype=float))
        assert [s["correct"] for s in rank["supsup_gn-run"]["stages"]] == \
            [s["correct"] for s in one["stages"]]
    for a, b, want in zip(*(r["supsup_gn-run"]["states"] for r in ranks), one["states"],
                          strict=True):
        assert same(a, b) and same({k: v for k, v in a.items() if k.startswith("masks.")},
                                   {k: v for k, v in want.items() if k.startswith("masks.")})


def test_rmsprop_amplifies_the_float_order_of_a_split_batch():
    """Why the SupSup NNs job trains with SGD: one process summing the gradients of two
    half-batches (what 2 ranks do) differs from the whole batch's by float rounding (~1e-9),
    and RMSprop's first step lr·g/(sqrt(0.01 g²) + 1e-8) multiplies that by up to lr/eps = 1e6
    where |g| is near eps (many mask scores): ~1e-5, though no rank is wrong."""
    import torch.nn.functional as F
    from conftest import tiny_bundle

    from retain.backbones import create_backbone
    from retain.methods import create_method

    m = create_method("supsup_gn", create_backbone("pixels", image_size=16), mode="NNs",
                      net="fc300x100", output_size=6)
    m.seed_, pos = 123, np.arange(0, 24, 3)
    m.net_ = m._make_net()
    scores, split = m.net_.add_slot(0), tiny_bundle().train
    x, y = m.backbone.preprocess(split, pos), torch.from_numpy(split.targets[pos])

    def grad(parts) -> torch.Tensor:  # the first layer's score gradient
        scores[0].grad = None
        for rows, w in parts:
            (F.cross_entropy(m.net_(x[rows], 0), y[rows]) * w).backward()
        return scores[0].grad.clone()

    whole, halves = grad([(slice(0, 8), 1.0)]), grad([(slice(0, 4), 0.5), (slice(4, 8), 0.5)])
    assert 0 < (whole - halves).abs().max() < 1e-7

    def step(g):
        return 0.01 * g / ((0.01 * g * g).sqrt() + 1e-8)

    assert (step(whole) - step(halves)).abs().max() > 1e-6


OWN = ["dytox", "zscl", "apg", "hide_prompt", "proof"]  # branch distA
# softmax is blind to a bias of its keys: the gradient of APG's key bias is 0 up to rounding,
# which Adam scales to steps of up to lr·0.1, a different rounding (summation order) another
NOISE = {"apg": ("generator.k.bias",)}


@pytest.mark.parametrize("method", OWN)
def test_own_loops_on_two_ranks_equal_one_process_after_every_task(ranks, method):
    """DyTox (teacher, growth, memory, finetuning, stochastic depth, MixUp), ZSCL (replicated
    steps), APG (dropout, library finetuning), HiDe-Prompt (gathered in-batch contrast, k-means)
    and PROOF (replicated CLIP loss with dropout, memory): both ranks hold the same state after
    every task, that of one process with the same global batches."""
    one, noise = alone(method), NOISE.get(method, ())
    for a, b, want in zip(ranks[0][method], ranks[1][method], one, strict=True):
        assert max_difference(a, b) == 0.0
        assert max_difference(*({k: v for k, v in s.items() if k not in noise}
                                 for s in (a, want))) < 1e-5
    kind, backbone, name, params, tasks = JOBS[method]
    slow = run_job(method, (kind, backbone, name, params | {"lr": 1e-9}, 1), Dist(),
                   tempfile.mkdtemp())[0]
    assert max_difference(one[0], slow) > 1e-4  # task 0 moved parameters 10x the tolerance


def test_zscl_gradients_of_two_ranks_are_those_of_one_process(ranks):
    """The text tower and the L2 term (second step: away from its anchor), computed whole on
    every rank, count once (Adam's steps would hide a factor 2: gradients are compared)."""
    one, (a, b) = alone("zscl-gradients"), (r["zscl-gradients"] for r in ranks)
    assert len(one) > 10 and max_difference(a, b) == 0.0
    assert max_difference(a, one, relative=True) < 1e-6  # gradients up to ~1e2 here
    assert max(float(g.abs().max()) for g in one.values()) > 1e-3


def test_row_keyed_draws_of_a_split_batch_are_those_of_the_whole_batch():
    """Dropout / stochastic depth told their rows (retain.layers.rows) draw, on each share of a
    batch, the masks one process draws for the whole batch; untold, they are the plain layers."""
    from timm.layers import DropPath

    from retain.layers.rows import RowDropout, RowDropPath, global_rows, keyed_draws, row_ids

    x, ids = torch.randn(7, 3, 5), row_ids(7)
    for keyed, plain in ((RowDropout(0.3), torch.nn.Dropout(0.3)),
                         (RowDropPath(0.3), DropPath(0.3))):
        torch.manual_seed(0)
        whole = plain(x)
        torch.manual_seed(0)
        assert torch.equal(keyed(x), whole)
        shares = []
        for part in (slice(0, 3), slice(3, 7)):  # each rank from the same generator state
            torch.manual_seed(0)
            with global_rows(keyed, ids[part]):
                shares.append(keyed(x[part]))
        assert torch.equal(torch.cat(shares), whole) and keyed.rows is None
        torch.manual_seed(0)
        assert not torch.equal(plain(x[3:7]), whole[3:7])  # what a plain layer would draw
    net = keyed_draws(torch.nn.Sequential(torch.nn.Dropout(0.1), DropPath(0.2)))
    assert [type(m) for m in net] == [RowDropout, RowDropPath]


def learn_nothing(method: str) -> dict:
    """The state after task 0 at a learning rate of 1e-9 (about where the step starts)."""
    kind, name, params, tasks = JOBS[method]
    return run_job(method, (kind, name, params | {"lr": 1e-9}, tasks), Dist(),
                   tempfile.mkdtemp())[0]


# -- without processes ------------------------------------------------------------------------

def test_one_process_is_a_no_op():
    d = Dist()
    t = torch.arange(5.0)
    assert not d.active and d.is_main and d.shard(7) == slice(0, 7)
    assert d.all_reduce_(t) is t and torch.equal(t, torch.arange(5.0))
    assert d.gather_rows(t) is t and d.sum(2.5) == 2.5 and d.any(False) is False
    x, y, share = d.batch_share(t, t)
    assert x is t and share == 1.0


def test_shares_partition_every_batch():
    for world in (2, 3, 4):
        for n in (0, 1, 5, 24):
            for unit in (1, 4, 16):
                parts = [Dist(rank=r, world_size=world).shard(n, unit) for r in range(world)]
                assert [p.start for p in parts] == [0] + [p.stop for p in parts[:-1]]
                assert parts[-1].stop == n
                assert all(p.start % unit == 0 for p in parts)
            shares = [Dist(rank=r, world_size=world).batch_share(torch.arange(n),
                                                                  torch.arange(n))[2]
                      for r in range(world)]
            assert n == 0 or sum(shares) == pytest.approx(1.0)


def test_methods_with_their_own_loops_are_refused_by_name(monkeypatch):
    """Every method still in REFUSED (and one added here: REFUSED may be empty) is refused
    with one line naming it; the others run."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(REFUSED, "finetune", "is refused by this test")


    monkeypatch.setitem(REFUSED, "no_such_method", "trains in a loop of its own")
    assert not set(REFUSED) & {"dytox", "zscl", "apg", "hide_prompt", "proof"}  # (distA)
    for name in REFUSED:
        with pytest.raises(ConfigError, match=f"method {name} cannot run in several processes"):
            check_method(name)
    for name in ("simplecil", "supsup", "supsup_gn", "den", "apd"):
        check_method(name)
        assert refusal(name) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_method("finetune")  # one process: every method runs


def test_run_refuses_a_refused_method_under_torchrun(monkeypatch, tmp_path, tiny_dataset):
    from retain.config import RunConfig
    from retain.runner import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(REFUSED, "finetune", "is refused by this test")
    config = RunConfig(method="finetune", dataset=tiny_dataset, backbone="vit_tiny_random",
                       image_size=16, out=str(tmp_path / "ft"), cache=False)
    with pytest.raises(ConfigError, match="method finetune cannot run in several processes"):
        run(config, echo=lambda *_: None)
    assert not (tmp_path / "ft").exists()


# -- torchrun: kill -9 mid-stream, then the same command resumes ------------------------------

RESUMED = ["--method", "ranpac", "--set", "params.peft=none", "--set", "params.projection_dim=256",
           "--dataset", "digits", "--backbone", "vit_tiny_random", "--image-size", "16",
           "--scenario", "B0Inc2", "--set", "subset.train=30", "--set", "subset.test=10",
           "--device", "cpu", "--quiet"]


def torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "retain", "run", *args]


@pytest.mark.slow
def test_kill_9_of_two_processes_then_torchrun_resumes_to_the_same_results(tmp_path):
    out, cache = tmp_path / "victim", ["--cache-dir", str(tmp_path / "cache")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(torchrun(RESUMED + cache + ["--out", str(out)]), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline, done = time.time() + 240, 0
    while time.time() < deadline and victim.poll() is None:  # one finished task, then kill -9
        if (out / "results.json").is_file():
            done = len(json.loads((out / "results.json").read_text())["stages"])
            if done >= 1:
                break
        time.sleep(0.05)
    for pid in [victim.pid, *descendants(victim.pid)]:  # torchrun's agent and both workers
        with contextlib.suppress(ProcessLookupError):  # (each worker has its own session)
            os.kill(pid, signal.SIGKILL)
    victim.wait()
    done = len(json.loads((out / "results.json").read_text())["stages"])
    assert 1 <= done < 5
    again = subprocess.run(torchrun(RESUMED + cache + ["--out", str(out)]), env=env,
                           capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count(f"resuming {out}: {done} of 5 tasks") == 1  # rank 0 alone prints
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["environment"]["processes"] == 2 and len(resumed["stages"]) == 5
    assert_same_as_one_process(resumed, tmp_path / "ref")


@pytest.mark.slow
def test_two_torchrun_agents_meet_as_two_nodes_and_equal_one_process(tmp_path):
    """Multi-node launch (``--nnodes=2``, c10d rendezvous), both "nodes" on this machine: rank 0
    on one agent writes the run, and the results equal one process's."""
    from distributed_jobs import free_port

    out, port = tmp_path / "nodes", free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=retain-test",
           "-m", "retain", "run", *RESUMED, "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    for a in agents:
        _, err = a.communicate(timeout=400)
        assert a.returncode == 0, err[-2000:]
    got = json.loads((out / "results.json").read_text())
    assert got["environment"]["processes"] == 2
    assert_same_as_one_process(got, tmp_path / "ref")


def assert_same_as_one_process(results: dict, out: Path) -> None:
    """``results`` have the accuracy matrix and per-stage correct counts of RESUMED's stream run
    uninterrupted in this one process (on one thread, as each rank)."""
    from retain.config import make_config
    from retain.runner import run

    flags, sets = _flags(RESUMED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run(make_config(flags=flags | {"out": str(out)}, sets=sets),
                  echo=lambda *_: None, progress=False)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(np.array(results["accuracy_matrix"], dtype=float),
                                  np.array(ref["accuracy_matrix"], dtype=float))
    assert [s["correct"] for s in results["stages"]] == [s["correct"] for s in ref["stages"]]


def descendants(pid: int) -> list[int]:
    """The pids of every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _flags(args: list[str]) -> tuple[dict, list[str]]:
    """Command-line ``args`` as make_config's flags and sets (no cache: a fresh pass)."""
    flags, sets, it = {"cache": False}, [], iter(args)
    for a in it:
        if a == "--quiet":
            continue
        value = next(it)
        if a == "--set":
            sets.append(value)
        else:
            key = a[2:].replace("-", "_")
            flags[key] = int(value) if key == "image_size" else value
    return flags, sets


def test_python_m_retain_is_the_command():
    done = subprocess.run([sys.executable, "-m", "retain", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "Continual learning" in done.stdout
