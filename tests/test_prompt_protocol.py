"""The test-time protocol of the prompt methods (``shared/specs/protocol-pitfalls.md`` §1.1-1.2).

By default a prompt is chosen per sample, so a test image gets the same logits in a task-pure,
class-ordered batch (what the reference loaders produce, and what lets a batch vote recover the
task) as on its own. The batch votes of the reference code exist only as explicit options, and
a run that turns one on is labelled in its results and in ``retain show``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retain.cli import main as cli
from retain.config import make_config
from retain.context import Context
from retain.datasets.base import Split
from retain.methods import METHODS, create_method
from retain.runner import run
from tests.test_conformance import FAST, setup

PROMPT_METHODS = [n for n in ("l2p", "dualprompt", "coda_prompt", "dap", "apg", "sprompts")
                  if n in METHODS]
# the option that turns a batch vote on, per method that has one
VOTES = {"l2p": "batchwise_prompt", "dualprompt": "batchwise_prompt", "dap": "majority_vote"}


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_task_pure_batches_give_the_per_sample_logits(name, tiny_vit, scenario):
    backbone, scenario = setup(name, tiny_vit, scenario)
    m, ctx = create_method(name, backbone, **FAST[name]), Context(batch_size=64)
    for task in scenario[:2]:
        m.learn(task, ctx)
    assert not m.uses_batch_information
    tests = [t.test for t in scenario[:2]]
    if scenario.kind != "domain":  # class splits: one split, class-ordered across the tasks
        tests = [Split.concat(tests)]
    pure, alone = [], []
    for test in tests:
        order = np.argsort(test.targets, kind="stable")  # class-ordered, as reference loaders
        pure += [m.predict(test.subset(order[i : i + 6]), ctx)
                 for i in range(0, len(order), 6)]  # task-pure batches
        alone += [m.predict(test.subset(order[i : i + 1]), ctx) for i in range(len(order))]
    pure, alone = torch.cat(pure), torch.cat(alone)
    torch.testing.assert_close(pure, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in VOTES if n in METHODS])
def test_a_batch_vote_is_labelled_in_results_and_show(name, tiny_vit, tmp_path, capsys):
    assert create_method(name, tiny_vit, **{VOTES[name]: True}).uses_batch_information
    params = [f"params.{k}={v}" for k, v in FAST[name].items() if not isinstance(v, tuple)]
    params += [f"params.{k}=[{','.join(map(str, v))}]" for k, v in FAST[name].items()
               if isinstance(v, tuple)]
    flags = {"dataset": "digits", "backbone": "vit_tiny_random", "method": name,
             "scenario": "B0Inc5", "out": str(tmp_path / "run"), "cache_dir": str(tmp_path / "c")}
    res = run(make_config(flags=flags, sets=params + [f"params.{VOTES[name]}=true",
                                                      "params.epochs=1"]),
              echo=lambda *_: None, progress=False)
    assert res["uses_batch_information"]
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["uses_batch_information"]
    capsys.readouterr()
    cli(["show", str(tmp_path / "run")])
    assert "uses batch information" in capsys.readouterr().out

