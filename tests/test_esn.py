"""ESN: the energy as coded, temperature selection, the stage vote, one trunk pass per image."""

from __future__ import annotations

import math

import numpy as np
import torch

from retain.context import Context
from retain.methods import create_method
from retain.methods.esn import stage_energies, vote

FAST = {"epochs": 3, "lr": 0.01, "batch_size": 4, "augment": False, "prompt_tokens": 4}


def test_energy_as_the_official_loss_computes_it(tiny_vit):
    m = create_method("esn", tiny_vit, energy_beta=2.0)
    z = torch.tensor([[1.0, 2.0], [0.0, -3.0]])
    by_hand = [-math.log(math.exp(-2) + math.exp(-4)) / 2, -math.log(1 + math.exp(6)) / 2]
    torch.testing.assert_close(m.energy(z), torch.tensor(by_hand))


def test_stage_energies_and_the_vote_by_hand():
    a = torch.tensor([[2.0, 0.0], [0.0, 0.1]])  # stage 0 logits for two images
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # stage 1
    e = stage_energies([a, b], 1.0)
    torch.testing.assert_close(e, torch.tensor([
        [math.log(math.exp(2) + 1), math.log(2 * math.e)],
        [math.log(1 + math.exp(0.1)), math.log(1 + math.e)]]))
    # tau -> 0: the largest logit decides (image 0: a 2.0 > b 1.0; image 1: b 1.0 > a 0.1)
    assert vote([a, b], [0.001]).tolist() == [0, 1]
    # tau = 1: image 0 picks stage 0 (2.31 > 1.69), image 1 stage 1; with both taus they agree
    assert vote([a, b], [0.001, 1.0]).tolist() == [0, 1]
    c = torch.tensor([[0.0, 1.5], [0.0, 0.0]])  # image 0: tau 0.001 -> a (2.0); tau 10 -> b/c
    assert vote([a, b, c], [0.001, 10.0]).tolist()[0] == 0  # a 1-1 tie goes to the lower stage


def test_temperature_is_the_best_separating_one(tiny_vit, scenario, monkeypatch):
    m = create_method("esn", tiny_vit, temperatures=(0.001, 1.0, 100.0))
    task = scenario[1]
    a = torch.tensor([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0]])
    b = torch.tensor([[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]])
    # energies: tau 0.001 -> a wins; tau 1 -> a 3.05 vs b 2.69: a; tau 100 -> b (sum of 2 terms)
    monkeypatch.setattr(m, "_stage_logits", lambda split, ctx: [a, b])
    assert m._temperature(task, Context()) == 100.0


def test_prompt_frozen_after_task_0_and_old_stages_unchanged(tiny_vit, scenario):
    m, ctx = create_method("esn", tiny_vit, **FAST), Context()
    m.learn(scenario[0], ctx)
    prompt, stage0 = m.prompt_.detach().clone(), {
        k: v.clone() for k, v in m.stages_[0].state_dict().items()}
    assert not torch.equal(prompt, torch.zeros_like(prompt))
    m.learn(scenario[1], ctx)
    assert torch.equal(m.prompt_, prompt)
    assert all(torch.equal(v, m.stages_[0].state_dict()[k]) for k, v in stage0.items())
    assert m.chosen_[0] == 0.001 and m.chosen_[1] in m.temperatures
    # the task token starts as the backbone's class token
    fresh = m._new_stage(2, torch.Generator())
    assert torch.equal(fresh.token.detach(), tiny_vit.model.cls_token.detach())


def test_released_option_keeps_training_the_prompt_and_predicts_with_the_last(tiny_vit,
                                                                             scenario):
    """prompt_training=every_task (the released main.py/trainer.py): the prompt moves in task 1
    too, old stages stay as they were, and every stage is then scored with the new prompt."""
    m, ctx = create_method("esn", tiny_vit, **FAST, prompt_training="every_task"), Context()
    m.learn(scenario[0], ctx)
    prompt = m.prompt_.detach().clone()
    stage0 = {k: v.clone() for k, v in m.stages_[0].state_dict().items()}
    m.learn(scenario[1], ctx)
    assert not torch.equal(m.prompt_, prompt) and not m.prompt_.requires_grad
    assert all(torch.equal(v, m.stages_[0].state_dict()[k]) for k, v in stage0.items())
    test = scenario[1].test
    with torch.no_grad():
        x = tiny_vit.preprocess(test, np.arange(len(test)))
        expected = m.stages_[0](m.tokens(x))  # stage 0's head on tokens made with the new prompt
    torch.testing.assert_close(m._stage_logits(test, ctx)[0], expected, rtol=1e-5, atol=1e-5)


def test_one_trunk_pass_per_image_whatever_the_stage_count(tiny_vit, scenario):
    m, ctx = create_method("esn", tiny_vit, **FAST), Context(batch_size=64)
    for task in scenario:
        m.learn(task, ctx)
    calls = []
    hook = m.vit_.patch_embed.register_forward_hook(lambda mod, a, out: calls.append(len(a[0])))
    try:
        test = scenario[2].test
        logits = m.predict(test, ctx)
    finally:
        hook.remove()
    assert sum(calls) == len(test)  # 3 stages, one pass
    stage_logits = m._stage_logits(test, ctx)
    chosen = vote(stage_logits, sorted(set(m.chosen_)))
    offsets = torch.tensor(m.offsets_)
    within = torch.stack([z.argmax(1) for z in stage_logits], 1)  # (N, T)
    expected = offsets[chosen] + within[torch.arange(len(test)), chosen]
    assert torch.equal(logits.argmax(1), expected)
    assert np.isfinite(logits.numpy()).all()
