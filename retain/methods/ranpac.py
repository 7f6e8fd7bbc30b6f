"""RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual
Learning", NeurIPS 2023; official ``RanPAC.py``; LAMDA-PILOT ``models/ranpac.py``).

Phase 1 (first task only, optional): first-session adaptation of a PEFT module with a cosine
head, then the network is frozen. Phase 2 (every task): features h = ReLU(φ(x) W_rand) with a
fixed Gaussian W_rand (D x M, M = 10,000), accumulated G = Σ hᵀh and Q = Σ hᵀy, and the ridge
head W_o = (G + λI)⁻¹Q — equal to a joint ridge regression on all data seen, whatever the order.
λ is chosen from {1e-8, ..., 1e8} by the MSE on the last 20 % of the *current task's* shuffled
data after fitting on the first 80 % (as the official code), with one factorisation for all
candidates instead of 17 dense solves (``retain.layers.ridge``).

The VPT of phase 1 is RanPAC's (``inc_net.py``: ``build_promptmodel(Prompt_Token_num=5,
VPT_type="Deep")`` of sagizty/VPT, as APER's ``convs/vpt.py``): ``vpt_tokens`` = 5 zero-initialised
tokens appended after the patch tokens (``vpt_placement: pilot``, the default); ``official`` is
KMnP/vpt's placement (after the class token, uniform init; ``retain.layers.vpt``).

Head: ``linear`` (default, the official code: z = h W_o) or ``cosine`` (PILOT's CosineLinear:
z_c = cos(h, W_o[:, c])). W_rand is regenerated from a stored seed; G (M x M, float64) is part of
the state, so a checkpoint at M = 10,000 holds 800 MB.

Phase 1's cosine learning rate steps once per epoch (``schedule_unit="epoch"``, as the official
``RanPAC.py`` and PILOT: ``CosineAnnealingLR(T_max=tuned_epoch)``, so a 1-epoch run trains at the
full rate); ``"step"`` decays it after every batch instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..adaptation import adapt_for, load_tuned, tuned_state
from ..backbones import Backbone
from ..context import Context
from ..datasets.base import Split
from ..layers.ridge import RANPAC_LAMBDAS, RidgeStatistics, select_lambda
from ..params import Interval
from ..scenarios.base import Task
from ..training import ScheduleUnit
from .base import FROZEN_AFTER_FIRST, VIT_OR_CLIP, Method, Needs, count, register_method


@register_method("ranpac")
class RanPAC(Method):
    paper = "McDonnell et al., NeurIPS 2023 (arXiv 2307.02251)"
    tags = frozenset({FROZEN_AFTER_FIRST})
    constraints = {"epochs": Interval(0, None), "lr": Interval(0, None, "neither"),
                   "batch_size": Interval(1, None), "projection_dim": Interval(0, None),
                   "weight_decay": Interval(0, None), "vpt_tokens": Interval(1, None)}

    @classmethod
    def requirements(cls, hp: dict) -> list[Needs]:
        if hp["peft"] in ("none", "finetune"):
            return [Needs()]
        return [Needs(VIT_OR_CLIP, because=f"peft={hp['peft']}", fix="--set params.peft=none")]

    def __init__(self, backbone, *,
                 peft: Literal["none", "finetune", "adapter", "ssf", "vpt_shallow",
                               "vpt_deep"] = "adapter",
                 epochs: int = 20, lr: float = 0.01, batch_size: int = 48,
                 weight_decay: float = 5e-4, momentum: float = 0.9, augment: bool = True,
                 projection_dim: int = 10000, head: Literal["linear", "cosine"] = "linear",
                 vpt_tokens: int = 5, vpt_placement: Literal["pilot", "official"] = "pilot",
                 schedule_unit: ScheduleUnit = "epoch"):
        super().__init__(backbone)
        self.peft = peft
        self.epochs = epochs
        self.lr = lr
        self.vpt_tokens = vpt_tokens  # peft vpt_*: RanPAC's 5
        self.vpt_placement = vpt_placement  # pilot: zeros after the patches, as RanPAC's VPT
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.augment = augment
        self.projection_dim = projection_dim  # M: width of the random ReLU projection (0: none)
        self.head = head  # linear (official) or cosine (PILOT) ridge head
        self.schedule_unit = schedule_unit  # phase-1 cosine per epoch (official) or per batch
        self.body_: Backbone | None = None  # the (adapted) frozen network
        self.tuned_: torch.nn.Module | None = None
        self.stats_: RidgeStatistics | None = None
        self.weights_: torch.Tensor | None = None  # (M, C) ridge head
        self.seed_ = 0
        self.lambdas_: list[float] = []

    # -- learning -------------------------------------------------------------------------------
    def _learn(self, task: Task, ctx: Context) -> None:
        if task.id == 0:
            self.seed_ = int(torch.randint(0, 2**31, (1,), generator=ctx.generator(0, 7)))
            self.body_, self.tuned_ = adapt_for(self, task, ctx, self._options())
            self.stats_ = RidgeStatistics(self._dim())
        h = self._project(ctx.features(self.body_, task.train))  # (N, M)
        y = torch.from_numpy(task.train.targets)
        lam, _ = select_lambda(h, y, task.num_seen, ctx.generator(task.id, 8), RANPAC_LAMBDAS)
        self.lambdas_.append(lam)
        self.stats_.update(h, y, task.num_seen)
        self.weights_ = self.stats_.solve(lam).float()  # (M, C)

    def _options(self) -> dict | None:
        if self.peft.startswith("vpt"):
            return {"num_tokens": self.vpt_tokens, "placement": self.vpt_placement}
        return None

    def _dim(self) -> int:
        return self.projection_dim or self.backbone.feature_dim

    def _projection(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed_)
        return torch.randn(self.backbone.feature_dim, self.projection_dim, generator=g)  # (D, M)

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        """h = ReLU(f W_rand) (N, M); without projection (M = 0) the features themselves."""
        if not self.projection_dim:
            return feats
        return F.relu(feats @ self._projection())  # (N, M)

    # -- prediction -----------------------------------------------------------------------------
    def _predict(self, split: Split, ctx: Context) -> torch.Tensor:
        h = self._project(ctx.features(self.body_, split))  # (N, M)
        if self.head == "cosine":
            return F.normalize(h, dim=1) @ F.normalize(self.weights_, dim=0)  # (N, C)
        return h @ self.weights_  # (N, C)

    # -- state ----------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        return {"seed": torch.tensor(self.seed_), "weights": self.weights_,
                "lambdas": torch.tensor(self.lambdas_, dtype=torch.float64),
                **self.stats_.state("ridge."), **tuned_state(self.tuned_)}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.seed_ = int(state["seed"])
        self.weights_ = state["weights"]
        self.lambdas_ = state["lambdas"].tolist()
        self.stats_ = RidgeStatistics(self._dim())
        self.stats_.load(state, "ridge.")
        self.body_, self.tuned_ = load_tuned(self.backbone, self.peft, state, self._options())

    def parameter_counts(self) -> dict[str, int]:
        tuned = 0 if self.tuned_ is None else count(self.tuned_, trainable_only=False)
        if self.peft == "finetune":
            tuned = count(self.backbone.model)
        head = 0 if self.weights_ is None else self.weights_.numel()
        extra = 0 if self.peft == "finetune" else tuned
        return {"trainable": tuned + head,
                "total": count(self.backbone.model) + extra + head
                + self.backbone.feature_dim * self.projection_dim}
