"""DAP (Jung et al., "Generating Instance-level Prompts for Rehearsal-free Continual Learning",
ICCV 2023; official code naver-ai/dap-cl ``src/models/vit_dap/vit.py``, ``src/engine/trainer.py``,
``configs/base-dap.yaml``, ``configs/dap/{cifar,imagenetr}.yaml``; Mammoth ``models/dap.py``).

The ViT is frozen. Every prompted block l has a generator (:mod:`retain.layers.dap`): the
sequence x_l entering it (without block l−1's DAP tokens) gives K tokens

    p_l = γ̂(e) ⊙ (W_l · LN_l(x_l) + b_l) + β̂(e),   [γ; β] = F_l e,  γ̂ = γ/‖γ‖, β̂ = β/‖β‖

(W_l: token mixing over the N positions, zero-initialised; norms detached), inserted after the
class token. e is a task embedding (E-d), one per task, picked through task keys k_i: the query
q(x) is the frozen ViT's feature, and sample b uses e_{i(b)}, i(b) = argmax_i cos(q_b, k_i).
The feature is the final class token (the backbone's own pooling once the DAP tokens are
dropped), scored by a linear head over all seen classes. Training on task t forces i = t and
minimises

    L = CE(z̃, y) − λ_sim · (1/B) Σ_b cos(q_b, k_t)

where z̃ keeps only task t's logits. Adam (β 0.9, 0.9, AMSGrad), lr 0.01 at a constant rate (the
official "linear" scheduler is ``WarmupConstantSchedule`` with 0 warm-up), gradient clipping 1.
The token mixers are frozen after the first task (official trainer and Mammoth alike).

Test time: per-sample top-1 key among the learned tasks' keys. ``majority_vote=True`` reproduces
the official batch vote (the most frequent top-1 key of the batch gives every sample its task
embedding); it leaks the task of task-pure batches, so such runs are labelled as using batch
information (protocol-pitfalls §1.1; Mammoth ``--enable_test_time_majority_voting``).

``optimizer_scope="run"`` is the official trainer's one optimiser for the whole run (made once
over every learned parameter, the token mixers included): its moments carry from task to task
(kept in the state, so a resumed run continues exactly), old keys, embeddings and head rows keep
moving on their momentum, and parameters left without a gradient get a zero one, as torch 1.11's
``zero_grad()`` did (``retain.layers.optim_state``), so the frozen mixers drift a little too.

Options of the official ImageNet-R config: ``last_block_tokens=False`` (the last block drops the
tokens and adds none), ``restrict_to_task=True`` (test logits outside the classes of the chosen
task are set to −1e10, as ``vit_models.py`` does for ``imagenet_r``), ``optimizer="sgd"``.

Deviations: per-sample selection by default; only the learned tasks' keys compete at test time
(the official code matches all pool keys); more tasks than keys is an error (the official code
falls back to the vote); the optimiser is re-created each task (Mammoth) unless
``optimizer_scope="run"`` (the official one lives across tasks); a linear head with nn.Linear's
initialisation (official: kaiming, bias −4.6); augmentation is a random 0.766-area square crop of
the original image (≈ resize 256 + random crop 224), resized, and flip; the token mixer's length
follows the ViT's patch grid + prefix tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..layers.dap import DAPGenerators
from ..layers.heads import IncrementalLinear
from ..layers.inject import frozen_copy, load_without_trunk, unwrap, without_trunk
from ..layers.optim_state import keep_zero_grads, load_by_name, state_by_name
from ..layers.prompts import (
    KeyedPool,
    block_inputs,
    num_prefix_tokens,
    pull_loss,
    remove_tokens,
    select,
)
from ..params import Interval
from ..scenarios.base import Task
from ..training import fit, predict_batches, query_inputs, task_cross_entropy
from ..transforms import Augment
from .base import VIT, Method, Needs, count, register_method

# official train transform: resize 256, random crop 224 (area (224/256)^2), flip
_CROP = Augment(scale=((224 / 256) ** 2, (224 / 256) ** 2), ratio=(1.0, 1.0))
_MASKED = -1e10  # logits outside the chosen task with restrict_to_task (official: -1e11)


@register_method("dap")
class DAP(Method):
    paper = "Jung et al., ICCV 2023 (naver-ai/dap-cl)"
    constraints = {"num_tokens": Interval(1, None), "task_dim": Interval(1, None),
                   "pool_size": Interval(1, None), "pull_coeff": Interval(0, None),
                   "epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "batch_size": Interval(1, None), "clip_grad": Interval(0, None, "neither")}

    @classmethod
    def requirements(cls, hp: dict) -> list[Needs]:
        return [Needs(VIT), Needs(VIT, max_tasks=hp["pool_size"],
                                  because=f"pool_size={hp['pool_size']}",
                                  fix="--set params.pool_size=N (one key per task)")]

    def __init__(self, backbone, *, num_tokens: int = 10, task_dim: int = 16,
                 pool_size: int = 10, pull_coeff: float = 0.1, epochs: int = 5,
                 lr: float = 0.01, optimizer: Literal["adam", "sgd"] = "adam",
                 batch_size: int = 128, clip_grad: float | None = 1.0, augment: bool = True,
                 last_block_tokens: bool = True, freeze_mixer_after_first: bool = True,
                 restrict_to_task: bool = False, majority_vote: bool = False,
                 optimizer_scope: Literal["task", "run"] = "task"):
        super().__init__(backbone)
        self.num_tokens = num_tokens  # K DAP tokens per block
        self.task_dim = task_dim  # E, size of the task embedding
        self.pool_size = pool_size  # task keys and embeddings: at most this many tasks
        self.pull_coeff = pull_coeff  # λ_sim: 0.1 (CIFAR), 2.0 (ImageNet-R)
        self.epochs = epochs
        self.lr = lr
        self.optimizer = optimizer  # adam: β (0.9, 0.9), AMSGrad; sgd: momentum 0.9
        self.batch_size = batch_size
        self.clip_grad = clip_grad
        self.augment = augment
        self.last_block_tokens = last_block_tokens  # False: the last block gets no DAP tokens
        self.freeze_mixer_after_first = freeze_mixer_after_first  # token mixer: task 0 only
        self.restrict_to_task = restrict_to_task  # test logits only for the chosen task
        self.majority_vote = majority_vote  # official batch vote (uses batch information)
        self.optimizer_scope = optimizer_scope  # run: one optimiser for all tasks (official)
        self.net_: _DAPNet | None = None
        self.opt_state_: dict[str, torch.Tensor] = {}  # scope "run": the optimiser's moments

    @property
    def uses_batch_information(self) -> bool:
        return self.majority_vote

    def _build(self, generator: torch.Generator | None = None) -> _DAPNet:
        vit = frozen_copy(self.backbone.model)
        depth, dim = len(vit.blocks), self.backbone.feature_dim
        blocks = range(depth if self.last_block_tokens else depth - 1)
        gens = DAPGenerators(depth, blocks, _seq_len(vit), self.num_tokens, dim, self.task_dim,
                             generator=generator)
        ph, pw = unwrap(vit).patch_embed.patch_size
        bound = (6.0 / (3 * ph * pw + dim)) ** 0.5  # official key init (xavier-like)
        keys = KeyedPool(self.pool_size, dim, init=(-bound, bound), generator=generator)
        emb = nn.Parameter(torch.randn(self.pool_size, self.task_dim, generator=generator))
        return _DAPNet(vit, gens, keys, emb, IncrementalLinear(dim), self)

    def _learn(self, task: Task, ctx: Context) -> None:
        if task.id >= self.pool_size:
            raise ValueError(f"dap: task {task.id} needs key {task.id} but pool_size="
                             f"{self.pool_size}; raise pool_size")
        if self.net_ is None:
            self.net_ = self._build(ctx.generator(0, 0))
        net = self.net_
        net.head.expand(task.num_seen, ctx.generator(task.id, 1))
        net.record_task(task)
        if task.id > 0 and self.freeze_mixer_after_first:
            for gen in net.gens.generators:
                gen.mixer.requires_grad_(False)
        if not self.epochs:
            return
        g = ctx.generator(task.id, 2)  # batch order and augmentation
        base = query_inputs(self.backbone, task.train, ctx,
                            augment=_CROP if self.augment else None, generator=g)

        def inputs(pos):  # (images, queries, forced key = t)
            return *base(pos), torch.full((len(pos),), task.id)

        def loss(out, y):
            logits, pull = out
            return task_cross_entropy(logits, y, task.classes) - self.pull_coeff * pull

        opt, named = self._optimizer(net)
        fit(net, inputs, torch.from_numpy(task.train.targets), ctx, epochs=self.epochs,
            batch_size=self.batch_size, generator=g, loss_fn=loss, clip_grad=self.clip_grad,
            optimizer=opt, desc=f"dap task {task.id}")
        if self.optimizer_scope == "run":
            self.opt_state_ = state_by_name(opt, named)

    def _optimizer(self, net: nn.Module) -> tuple[torch.optim.Optimizer, dict]:
        """This task's optimiser and its parameters by name; scope "run": over every learned
        parameter, with the moments of the earlier tasks."""
        run = self.optimizer_scope == "run"
        named = {n: p for n, p in net.named_parameters()
                 if not n.startswith("vit.") and (run or p.requires_grad)}
        opt = self._make_optimizer(list(named.values()))
        if run:
            load_by_name(opt, named, self.opt_state_)
            keep_zero_grads(opt)
        return opt, named

    def _make_optimizer(self, trainable: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(trainable, lr=self.lr, momentum=0.9)
        return torch.optim.Adam(trainable, lr=self.lr, betas=(0.9, 0.9), amsgrad=True)

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return predict_batches(self.net_, query_inputs(self.backbone, split, ctx), len(split), ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        return without_trunk(self.net_) | {f"opt.{k}": v for k, v in self.opt_state_.items()}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.opt_state_ = {k[4:]: v for k, v in state.items() if k.startswith("opt.")}
        state = {k: v for k, v in state.items() if not k.startswith("opt.")}
        self.net_ = self._build()
        self.net_.head.expand(state["head.weight"].shape[0])
        self.net_.class_task = torch.empty_like(state["class_task"])
        load_without_trunk(self.net_, state)

    def parameter_counts(self) -> dict[str, int]:
        """Learned: the generators, all keys and task embeddings, and the head."""
        base = count(self.backbone.model)
        if self.net_ is None:
            return {"trainable": 0, "total": base}
        learned = count(self.net_) - count(self.net_.vit)
        return {"trainable": learned, "total": base + learned}


def _seq_len(vit: nn.Module) -> int:
    """Tokens entering the first block: prefix (class, registers) + patches (197 for ViT-B/16)."""
    return unwrap(vit).patch_embed.num_patches + num_prefix_tokens(vit)


class _DAPNet(nn.Module):
    """The frozen ViT copy, the generators, task keys and embeddings, and the head:
    (images, queries[, forced task index]) -> (logits, pull)."""

    def __init__(self, vit: nn.Module, gens: DAPGenerators, keys: KeyedPool,
                 task_emb: nn.Parameter, head: IncrementalLinear, cfg: DAP):
        super().__init__()
        self.vit, self.gens, self.keys, self.task_emb, self.head = vit, gens, keys, task_emb, head
        self.vote, self.restrict = cfg.majority_vote, cfg.restrict_to_task
        self.register_buffer("learned", torch.zeros((), dtype=torch.long))  # keys that compete
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))  # (C,) task of class

    def train(self, mode: bool = True) -> _DAPNet:
        super().train(mode)
        self.vit.eval()  # the frozen ViT never trains (as the official ``froze_enc``)
        return self

    @torch.no_grad()
    def record_task(self, task: Task) -> None:
        """Let the keys of tasks 0..t compete, and note which task each new class belongs to."""
        self.learned.fill_(task.id + 1)
        grown = self.class_task.new_full((task.num_seen,), -1)  # (C,)
        grown[: len(self.class_task)] = self.class_task
        grown[list(task.classes)] = task.id
        self.class_task = grown

    def choose(self, sim: torch.Tensor) -> torch.Tensor:
        """(B, M) similarities -> (B, 1): each sample's top-1 learned key (or the batch vote)."""
        return select(sim, 1, batchwise=self.vote, allowed=int(self.learned))

    def features(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images, (B, E) task embeddings -> (B, D) features of the DAP pass."""
        at = num_prefix_tokens(self.vit)
        with block_inputs(self.vit, self.gens.edits(emb, at)):
            seq = self.vit.forward_features(x)  # (B, N[+K], D)
        if self.gens.ends_with_tokens:
            seq = remove_tokens(seq, at, self.gens.num_tokens)  # (B, N, D)
        return self.vit.forward_head(seq, pre_logits=True)  # (B, D) the class token

    def forward(self, x: torch.Tensor, q: torch.Tensor, forced: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        sim = self.keys.similarity(q)  # (B, M)
        idx = forced[:, None] if forced is not None else self.choose(sim)  # (B, 1)
        logits = self.head(self.features(x, self.task_emb[idx[:, 0]]))  # (B, C)
        if self.restrict and forced is None:
            keep = self.class_task[None, :] == idx  # (B, C) classes of the chosen task
            logits = logits.masked_fill(~keep, _MASKED)
        return logits, pull_loss(sim, idx)  # (B, C), ()
