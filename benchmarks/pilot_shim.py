"""Run LAMDA-PILOT's own trainer on the parity stream (``benchmarks/parity_pilot.py`` starts this
file with PILOT's interpreter and a PILOT checkout; nothing of PILOT is copied here).

PILOT's files are not modified. This process imports them and, before training, points them at
what the benchmark wrote (all of it visible in this file):

* data: the dataset name ``parity`` resolves to PILOT's own ``iCIFAR224`` class (so its
  ``build_transform`` / ``build_transform_coda_prompt`` transforms), reading the benchmark's
  ``.npz`` arrays, with the transforms' sizes scaled from 224 to the stream's image size S
  (``Resize(int(256/224·S))``, ``CenterCrop(S)``, ``RandomResizedCrop(S)``; at S = 224 PILOT's
  own numbers);
* weights: every ViT PILOT builds gets the benchmark's architecture (``img_size``,
  ``patch_size``, ``depth``; width 768 and 12 heads stay PILOT's) and the benchmark's weights,
  loaded through the building module's own ``checkpoint_filter_fn`` where it has one, instead of
  a hub download (``timm.create_model``; the architecture through each module's
  ``build_model_with_cfg`` and the classes ``vit_adapter``, ``vit_ease`` and ``vpt`` build
  directly);
* CPU: ``device: [-1]`` (PILOT's own CPU switch), ``num_workers=0`` in every DataLoader;
* CODA-Prompt on the CPU: ``backbone/vit_coda_promtpt.py`` starts its prompt loss as
  ``torch.zeros((1,), requires_grad=True).to(device)`` and adds to it in place; on a GPU
  ``.to`` returns a copy (not a leaf), on the CPU the leaf itself, and the in-place add fails.
  That module's ``torch.zeros`` is given a non-leaf result (``zeros(...) * 1``: the same value
  and gradient as the GPU copy); nothing else in it changes;
* top-1 only: ``topk = 1`` (PILOT's top-5 needs at least 5 classes; the first stage has fewer;
  its top-5 curve then logs the top-1);
* the top-1 accuracy of every stage is written to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pilot-root", required=True)
    p.add_argument("--config", required=True, help="JSON: {'args': PILOT args, 'data', ...}")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    cfg = json.load(open(a.config))
    sys.path.insert(0, a.pilot_root)
    import torch

    torch.set_num_threads(cfg.get("threads", 1))
    stages = _patch(cfg)
    import trainer

    trainer.train(cfg["args"])
    json.dump({"top1": stages}, open(a.out, "w"))


def _patch(cfg: dict) -> list:
    """Point PILOT at the benchmark's data and weights, on the CPU; returns the list that
    collects each stage's top-1 accuracy."""
    import numpy as np
    import timm
    import torch
    import torch.utils.data

    size, weights = cfg["image_size"], torch.load(cfg["weights"], map_location="cpu")
    arch = {"img_size": size, "patch_size": cfg["patch_size"], "depth": cfg["depth"]}

    # -- data -------------------------------------------------------------------------------
    import utils.data as D
    import utils.data_manager as DM

    class ParityData(D.iCIFAR224):
        def __init__(self, args):
            super().__init__(args)  # PILOT's transforms for its 224-px datasets
            self.class_order = list(range(cfg["num_classes"]))
            for t in [*self.train_trsf, *self.test_trsf]:
                name = type(t).__name__
                if name == "Resize":  # 256 of 224 (or 224 of 224 for CODA-Prompt)
                    t.size = int(t.size * size / 224) if t.size != 224 else size
                elif name in ("CenterCrop", "RandomResizedCrop"):
                    t.size = (size, size)

        def download_data(self):
            z = np.load(cfg["data"])
            self.train_data, self.train_targets = z["train_x"], z["train_y"]
            self.test_data, self.test_targets = z["test_x"], z["test_y"]

    original_idata = DM._get_idata
    DM._get_idata = lambda name, args=None: (ParityData(args) if name == "parity"
                                             else original_idata(name, args))

    loader_init = torch.utils.data.DataLoader.__init__

    def no_workers(self, *args, **kwargs):
        kwargs["num_workers"] = 0
        loader_init(self, *args, **kwargs)

    torch.utils.data.DataLoader.__init__ = no_workers

    # -- weights ----------------------------------------------------------------------------
    def load(model: torch.nn.Module) -> torch.nn.Module:
        module = sys.modules[type(model).__module__]
        state = dict(weights)
        if hasattr(module, "checkpoint_filter_fn"):
            state = module.checkpoint_filter_fn(state, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise RuntimeError(f"weights do not fit {type(model)}: unexpected {unexpected[:5]}")
        print(f"[shim] {module.__name__}: weights loaded, new parameters: {missing}")
        return model

    create_model = timm.create_model

    def create(name, pretrained=False, **kwargs):
        model = create_model(name, pretrained=False, **kwargs)
        return load(model) if pretrained else model

    timm.create_model = create
    import importlib

    for name in ("timm.models.vision_transformer", "backbone.vit_l2p", "backbone.vit_dualprompt",
                 "backbone.vit_coda_promtpt", "backbone.vit_lae", "backbone.vit_ssf"):
        module = importlib.import_module(name)
        module.build_model_with_cfg = _shaped_builder(module.build_model_with_cfg, arch)
    for name, cls in (("backbone.vit_adapter", "VisionTransformer"),
                      ("backbone.vit_ease", "VisionTransformer"), ("backbone.vpt", "VPT_ViT")):
        module = importlib.import_module(name)
        setattr(module, cls, _shaped(getattr(module, cls), arch))

    coda = importlib.import_module("backbone.vit_coda_promtpt")
    coda.torch = _NonLeafZeros(torch)

    # -- evaluation -------------------------------------------------------------------------
    from models.base import BaseLearner

    stages: list = []
    base_init, eval_task = BaseLearner.__init__, BaseLearner.eval_task

    def init(self, args):
        base_init(self, args)
        self.topk = 1

    def evaluate(self):
        cnn, nme = eval_task(self)
        stages.append(float(cnn["top1"]))
        for accy in (cnn, nme or {}):  # the trainer logs a top-5 curve
            accy.setdefault("top5", accy.get(f"top{self.topk}"))
        return cnn, nme

    BaseLearner.__init__, BaseLearner.eval_task = init, evaluate
    return stages


class _NonLeafZeros:
    """``torch`` whose ``zeros(..., requires_grad=True)`` is not a leaf (as after ``.to(cuda)``)."""

    def __init__(self, torch_module):
        self._torch = torch_module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def zeros(self, *args, requires_grad: bool = False, **kwargs):
        out = self._torch.zeros(*args, requires_grad=requires_grad, **kwargs)
        return out * 1 if requires_grad else out


def _shaped(cls, arch: dict):
    """``cls`` built with the benchmark's ``arch`` (image size, patch size, depth)."""

    class Shaped(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **(kwargs | arch))

    Shaped.__name__ = Shaped.__qualname__ = cls.__name__
    Shaped.__module__ = cls.__module__
    return Shaped


def _shaped_builder(build, arch: dict):
    """timm's ``build_model_with_cfg`` with the benchmark's ``arch``, never downloading."""

    def shaped(model_cls, variant, pretrained, **kwargs):
        return build(model_cls, variant, False, **(kwargs | arch))

    return shaped


if __name__ == "__main__":
    main()
