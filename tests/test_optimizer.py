"""AdamW weight decay applies to weight matrices only."""

from __future__ import annotations

import torch

from recsys.config import Config
from recsys.losses import SampledSoftmaxLoss
from recsys.model import build_two_tower
from recsys.train import TrainStep, param_groups


def test_biases_layernorm_and_temperature_are_not_decayed(tiny_model: str) -> None:
    cfg = Config()
    cfg.model.name_or_path = tiny_model
    module = TrainStep(build_two_tower(cfg.model), SampledSoftmaxLoss(0.05, learn_temperature=True))
    groups = param_groups(module, 0.01)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(module.named_parameters())
    assert set(by_id) == {id(p) for p in names.values()}  # every parameter in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(names)
    for name, p in names.items():
        no_decay = name.endswith(".bias") or "LayerNorm" in name or name == "loss.tau.log_value"
        assert by_id[id(p)] == (0.0 if no_decay else 0.01), name
    # One step with a zero gradient leaves the un-decayed parameters exactly where they were.
    opt = torch.optim.AdamW(groups, lr=0.1)
    before = {n: p.detach().clone() for n, p in names.items()}
    for p in names.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(names["loss.tau.log_value"], before["loss.tau.log_value"])
    ln = next(n for n in names if "LayerNorm.weight" in n)
    assert torch.equal(names[ln], before[ln])
    w = next(n for n in names if n.endswith("query.weight"))
    assert not torch.equal(names[w], before[w])
