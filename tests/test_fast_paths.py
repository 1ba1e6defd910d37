"""The fast paths give the plain path's losses and gradients: the last block computed for
masked tokens only, torch.compile, and fused AdamW (the sparse MLM head and unpadded attention
have their guards in test_mlm.py and test_mosaicbert.py)."""

from __future__ import annotations

import pytest
import torch
from test_mosaicbert import packed_batch, padded_batch, real_of, tiny

from fillmask.architectures.base import Encoder
from fillmask.architectures.bert import BertEncoder
from fillmask.masking.base import IGNORE_INDEX
from fillmask.objectives.base import MismatchError
from fillmask.objectives.mlm import MaskedLM
from fillmask.objectives.span_boundary import SpanBoundaryLM
from fillmask.testing import fit_losses


def selection(batch: dict[str, torch.Tensor], seed: int = 5) -> torch.Tensor:
    """About a third of the real tokens, at random: (B, T) boolean."""
    real = real_of(batch)
    chosen = torch.rand(real.shape, generator=torch.Generator().manual_seed(seed)) < 0.35
    return chosen & real


@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch], ids=["padded", "packed"])
@pytest.mark.parametrize("options", [
    {}, {"norm": "pre"}, {"unpad": True}, {"unpad": True, "norm": "pre", "ffn": "glu"},
    {"share_layers": True}, {"positions": "alibi", "unpad": True},
], ids=["bert", "pre-ln", "unpad", "mosaic", "albert", "alibi"])
def test_selected_states_equal_full_states_and_gradients(make_batch, options):
    batch = make_batch()
    selected = selection(batch)
    encoder = tiny(**options).train()
    weights = torch.randn(int(selected.sum()), 32, generator=torch.Generator().manual_seed(2))

    full = encoder(**batch)[selected]  # (K, C)
    (full * weights).sum().backward()
    expected = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    encoder.zero_grad()
    fast = encoder.selected_states(batch["input_ids"], selected,
                                   **{k: v for k, v in batch.items() if k != "input_ids"})
    (fast * weights).sum().backward()

    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    for name, parameter in encoder.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_selected_states_skip_the_last_blocks_feed_forward_for_other_tokens():
    encoder = tiny().eval()
    batch = padded_batch()
    selected = selection(batch)
    seen: list[int] = []
    handle = encoder.blocks[-1].ffn.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    encoder.selected_states(batch["input_ids"], selected, attention_mask=batch["attention_mask"])
    handle.remove()
    assert seen == [int(selected.sum())]


def test_the_default_encoder_contract_indexes_the_full_states():
    class Plain(Encoder):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Embedding(10, 4)

        def forward(self, input_ids, **_):
            return self.table(input_ids)

    encoder = Plain()
    ids = torch.randint(0, 10, (2, 5))
    selected = ids > 4
    torch.testing.assert_close(encoder.selected_states(ids, selected), encoder(ids)[selected])


def test_only_losses_that_read_masked_states_alone_take_the_fast_path():
    def encoder():
        return BertEncoder.preset("tiny", vocab_size=64, max_positions=32)

    assert not MaskedLM(encoder()).needs_every_state()
    assert MaskedLM(encoder(), pair_head=True).needs_every_state()
    assert SpanBoundaryLM(encoder()).needs_every_state()


# torch.compile and fused AdamW, through a Lightning fit.


def fixed_batches(count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(5, 64, (4, 16), generator=generator)
        labels = torch.full_like(ids, IGNORE_INDEX)
        chosen = torch.rand(ids.shape, generator=generator) < 0.2
        labels[chosen] = ids[chosen]
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def tiny_fit(tmp_path, **options) -> tuple[list[float], MaskedLM]:
    torch.manual_seed(0)
    encoder = BertEncoder.preset("tiny", vocab_size=64, max_positions=32, dropout=0.0,
                                 attention_dropout=0.0)
    model = MaskedLM(encoder, learning_rate=1e-3, warmup_steps=1, **options)
    return fit_losses(model, fixed_batches(), tmp_path, steps=4), model


def test_compiled_training_equals_eager(tmp_path):
    eager, eager_model = tiny_fit(tmp_path, compile=False)
    compiled, compiled_model = tiny_fit(tmp_path, compile=True)
    assert compiled_model.encoder._compiled_call_impl is not None  # it really ran compiled
    assert eager_model.encoder._compiled_call_impl is None
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert compiled[-1] < compiled[0]
    # Parameter names (and so checkpoints) are the eager model's.
    assert list(compiled_model.state_dict()) == list(eager_model.state_dict())
    for name, value in compiled_model.state_dict().items():
        torch.testing.assert_close(value, eager_model.state_dict()[name], atol=1e-4, rtol=1e-4)


def test_fused_adamw_is_the_default_and_matches_foreach(tmp_path):
    fused, fused_model = tiny_fit(tmp_path)
    plain, plain_model = tiny_fit(tmp_path, fused_adamw=False)
    assert fused_model.trainer.optimizers[0].defaults["fused"] is True
    assert not plain_model.trainer.optimizers[0].defaults["fused"]
    assert fused == pytest.approx(plain, rel=1e-5)
    for name, value in fused_model.state_dict().items():
        torch.testing.assert_close(value, plain_model.state_dict()[name], atol=1e-5, rtol=1e-4)


def test_compile_without_a_compiler_is_one_clear_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no C++ compiler on it
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(MismatchError, match=r"compile: true on a CPU needs a C\+\+ compiler"):
        tiny_fit(tmp_path, compile=True)
