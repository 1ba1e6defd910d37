"""StableAdamW (torch-optimi) as a YAML choice beside AdamW: the same update as the library used
directly, with norms and biases kept out of weight decay."""

from __future__ import annotations

import optimi
import pytest
import torch
from test_fast_paths import fixed_batches

from fillmask.architectures.bert import BertEncoder
from fillmask.objectives.base import MismatchError, build_optimizer, warmup_then_decay
from fillmask.objectives.mlm import MaskedLM
from fillmask.testing import fit_losses

OPTIONS = dict(learning_rate=3e-3, warmup_steps=2, total_steps=6, schedule="linear",
               betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True)
STEPS = 6


def tiny_encoder() -> BertEncoder:
    torch.manual_seed(0)
    return BertEncoder.preset("tiny", vocab_size=64, max_positions=32, dropout=0.0,
                              attention_dropout=0.0)


def fillmask_run(tmp_path, optimizer: str) -> tuple[list[float], MaskedLM]:
    model = MaskedLM(tiny_encoder(), optimizer=optimizer, **OPTIONS)
    return fit_losses(model, fixed_batches(STEPS), tmp_path, steps=STEPS), model


def reference_run() -> tuple[list[float], MaskedLM]:
    """The same model trained by hand, with StableAdamW set up as torch-optimi documents it:
    its own weight-decay groups and fully decoupled decay relative to the peak rate."""
    model = MaskedLM(tiny_encoder(), **OPTIONS)
    groups = optimi.param_groups_weight_decay(model, weight_decay=OPTIONS["weight_decay"])
    peak = OPTIONS["learning_rate"]
    optimizer = optimi.StableAdamW(groups, lr=peak, betas=OPTIONS["betas"], eps=OPTIONS["eps"],
                                   decouple_lr=True, max_lr=peak, triton=False)  # CPU
    scale = warmup_then_decay(OPTIONS["warmup_steps"], OPTIONS["total_steps"], "linear", 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
    losses = []
    for batch in fixed_batches(STEPS):
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(float(loss.detach()))
    return losses, model


@pytest.mark.filterwarnings("ignore:You are using weight_decay")  # 0.1: large, to be visible
def test_stableadamw_update_matches_the_librarys_reference(tmp_path):
    losses, model = fillmask_run(tmp_path, "stableadamw")
    expected, reference = reference_run()
    assert isinstance(model.trainer.optimizers[0], optimi.StableAdamW)
    assert losses == pytest.approx(expected, rel=1e-6)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], atol=1e-6, rtol=1e-5)


def test_stableadamw_is_not_adamw(tmp_path):
    """Update clipping changes the steps (so the test above could fail if the option were
    ignored): the weights after a few steps differ from AdamW's with the same settings."""
    _, stable = fillmask_run(tmp_path, "stableadamw")
    _, plain = fillmask_run(tmp_path, "adamw")
    assert isinstance(plain.trainer.optimizers[0], torch.optim.AdamW)
    gaps = [(value - plain.state_dict()[name]).abs().max().item()
            for name, value in stable.state_dict().items() if value.is_floating_point()]
    assert max(gaps) > 1e-4


def test_norms_and_biases_get_no_weight_decay():
    model = MaskedLM(tiny_encoder(), optimizer="stableadamw", **OPTIONS)
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    optimizer = build_optimizer(model._parameter_groups(), "stableadamw", lr=1e-3,
                                betas=(0.9, 0.98), eps=1e-6)
    decayed = {names[id(p)]: group["weight_decay"] > 0
               for group in optimizer.param_groups for p in group["params"]}
    assert set(decayed) == set(params)
    for name, decays in decayed.items():
        assert decays == (params[name].ndim >= 2 and "norm" not in name), name
    assert any(decayed.values()) and not all(decayed.values())


def test_an_unknown_optimiser_is_one_line():
    with pytest.raises(MismatchError, match=r"optimizer='lamb'.*adamw or stableadamw"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.ones(2))]}], "lamb", lr=1e-3,
                        betas=(0.9, 0.98), eps=1e-6)
