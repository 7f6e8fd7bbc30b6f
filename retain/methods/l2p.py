"""L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022; PyTorch port
JH-LEE-KR/l2p-pytorch, LAMDA-PILOT ``models/l2p.py``, ``backbone/prompt.py::Prompt``).

A pool of M prompts P_i (L tokens each) with keys k_i is shared by all tasks; the ViT is frozen.
For an image x the query q(x) is the frozen ViT's feature; each sample picks the N keys of
highest cos(q, k_i) and its prompts enter the sequence after the class token,
``[CLS, P_{i1}, …, P_{iN}, patches]``, each prompt token with the class token's positional
embedding. The feature is the mean of the final-layer outputs at the N·L prompt positions
(``head_type="prompt"``; ``"token"``: the class token) and a linear head over all seen classes
scores it (its rows start as the timm ViT head of l2p-pytorch and PILOT: N(0, 0.02²), bias 0).
Training minimises

    L = CE(z̃, y) − λ · (1/B) Σ_b Σ_{i∈sel(b)} cos(q_b, k_i)

where z̃ keeps only the current task's logits (old and future classes are set to −∞), with
Adam at a constant rate, re-created each task, and gradient clipping at ``clip_grad`` = 1.0
(L2P-pytorch's ``--clip-grad``; ``None``: no clipping, as PILOT's ``models/l2p.py``). Predictions
score the classes seen so far; L2P-pytorch's ``engine.py::evaluate`` scores a class-incremental
test image over every head row, the untrained rows of future classes included (no class mask),
so its intermediate-stage accuracies differ from these (not the last stage's, when every row is
trained).

The query is the cached frozen feature whenever the image is not augmented (every test image,
and training without augmentation), so a test image costs one prompted pass plus a cached
feature. Selection is per sample; ``batchwise_prompt=True`` reproduces the reference code's
batch vote and labels the run as using batch information.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..context import Context
from ..datasets.base import Split
from ..layers.heads import IncrementalLinear
from ..layers.inject import frozen_copy, load_without_trunk, without_trunk
from ..layers.prompts import (
    PromptPool,
    block_inputs,
    class_position,
    insert_tokens,
    num_prefix_tokens,
    pull_loss,
    select,
)
from ..params import Interval
from ..scenarios.base import Task
from ..training import fit, predict_batches, query_inputs, task_cross_entropy
from ..transforms import Augment
from .base import VIT, Method, Needs, count, register_method


@register_method("l2p")
class L2P(Method):
    paper = "Wang et al., CVPR 2022 (arXiv 2112.08654)"
    needs = Needs(VIT)
    constraints = {"pool_size": Interval(1, None), "prompt_length": Interval(1, None),
                   "top_k": Interval(1, None), "pull_coeff": Interval(0, None),
                   "epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "batch_size": Interval(1, None), "clip_grad": Interval(0, None, "neither")}

    def __init__(self, backbone, *, pool_size: int = 10, prompt_length: int = 5, top_k: int = 5,
                 pull_coeff: float = 0.1, head_type: Literal["prompt", "token"] = "prompt",
                 epochs: int = 5, lr: float = 0.001875, batch_size: int = 16,
                 clip_grad: float | None = 1.0, augment: bool = True,
                 batchwise_prompt: bool = False):
        super().__init__(backbone)
        self.pool_size = pool_size  # M: prompts in the shared pool
        self.prompt_length = prompt_length
        self.top_k = top_k  # N: prompts each sample picks by key-query cosine
        self.pull_coeff = pull_coeff  # lambda of the key-query pull term
        self.head_type = head_type  # feature: mean of the prompt outputs, or the class token
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.clip_grad = clip_grad  # None: no clipping (PILOT); l2p-pytorch clips at 1.0
        self.augment = augment
        self.batchwise_prompt = batchwise_prompt
        self.net_: _L2PNet | None = None

    @property
    def uses_batch_information(self) -> bool:
        return self.batchwise_prompt

    def _build(self, generator: torch.Generator | None = None) -> _L2PNet:
        if self.top_k > self.pool_size:
            raise ValueError(f"l2p: top_k={self.top_k} exceeds pool_size={self.pool_size}")
        pool = PromptPool(self.pool_size, self.prompt_length, self.backbone.feature_dim,
                          generator=generator)
        return _L2PNet(frozen_copy(self.backbone.model), pool,
                       IncrementalLinear(self.backbone.feature_dim, init="timm"), self)

    def _learn(self, task: Task, ctx: Context) -> None:
        if self.net_ is None:
            self.net_ = self._build(ctx.generator(0, 0))
        self.net_.head.expand(task.num_seen, ctx.generator(task.id, 1))
        if not self.epochs:
            return
        g = ctx.generator(task.id, 2)  # batch order and augmentation
        inputs = query_inputs(self.backbone, task.train, ctx,
                              augment=Augment() if self.augment else None, generator=g)

        def loss(out, y):
            logits, pull = out
            return task_cross_entropy(logits, y, task.classes) - self.pull_coeff * pull

        trainable = [p for p in self.net_.parameters() if p.requires_grad]
        fit(self.net_, inputs, torch.from_numpy(task.train.targets), ctx, epochs=self.epochs,
            batch_size=self.batch_size, generator=g, loss_fn=loss, clip_grad=self.clip_grad,
            optimizer=torch.optim.Adam(trainable, lr=self.lr), desc=f"l2p task {task.id}")

    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        return predict_batches(self.net_, query_inputs(self.backbone, split, ctx), len(split), ctx)

    def _state(self) -> dict[str, torch.Tensor]:
        return without_trunk(self.net_)

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.net_ = self._build()
        self.net_.head.expand(state["head.weight"].shape[0])
        load_without_trunk(self.net_, state)

    def parameter_counts(self) -> dict[str, int]:
        base = count(self.backbone.model)
        learned = 0 if self.net_ is None else count(self.net_, trainable_only=True)
        return {"trainable": learned, "total": base + learned}


class _L2PNet(nn.Module):
    """The frozen ViT copy, the prompt pool and the head: (images, queries) -> (logits, pull)."""

    def __init__(self, vit: nn.Module, pool: PromptPool, head: IncrementalLinear, cfg: L2P):
        super().__init__()
        self.vit, self.pool, self.head = vit, pool, head
        self.top_k, self.head_type, self.batchwise = cfg.top_k, cfg.head_type, cfg.batchwise_prompt

    def train(self, mode: bool = True) -> _L2PNet:
        super().train(mode)
        self.vit.eval()  # the frozen ViT never trains (no dropout, as the reference)
        return self

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sim = self.pool.similarity(q)  # (B, M)
        idx = select(sim, self.top_k, batchwise=self.batchwise)  # (B, k)
        tokens = self.pool.tokens(idx) + class_position(self.vit)  # (B, k·L, D)
        at, n = num_prefix_tokens(self.vit), tokens.shape[1]
        with block_inputs(self.vit, {0: lambda seq: insert_tokens(seq, tokens, at)}):
            seq = self.vit.forward_features(x)  # (B, P+k·L+N, D)
        feat = seq[:, at:at + n].mean(1) if self.head_type == "prompt" else seq[:, 0]  # (B, D)
        return self.head(feat), pull_loss(sim, idx)  # (B, C), ()
