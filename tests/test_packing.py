"""Packing without cross-contamination: a packed sequence gives each record the logits and loss it has alone."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_lite.data.batching import IGNORE_INDEX, collate
from qlora_lite.data.encode import Example, _pack
from qlora_lite.model.tiny import tiny_config
from qlora_lite.training.loss import causal_lm_loss, packed_attention
from qlora_lite.training.step import forward_loss_sum
from tests.helpers import rel_err

LENGTHS = (7, 12, 5, 9, 3)  # packed into max_seq_len 24: [7, 12, 5], [9, 3]


def _records() -> list[Example]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(3, 259, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]  # a prompt without loss, then the target
        out.append(Example(ids, labels, f"r{i}"))
    return out


def _model(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation=impl, dtype=torch.float32)
    return model.eval()


def test_pack_restarts_positions_and_drops_cross_record_targets():
    records = _records()
    packs = _pack(records, 24)
    assert [len(p) for p in packs] == [24, 12]
    assert packs[0].position_ids == list(range(7)) + list(range(12)) + list(range(5))
    # the first token of a later record is never the target of the previous record's last token
    assert packs[0].labels[7] == IGNORE_INDEX and packs[0].labels[19] == IGNORE_INDEX
    assert packs[0].labels[:7] == records[0].labels
    batch = collate(packs, pad_token_id=0)
    assert batch["position_ids"][1].tolist() == list(range(9)) + list(range(3)) + list(range(12))  # padding apart
    assert "position_ids" not in collate(records, pad_token_id=0)  # unpacked batches are unchanged


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_logits_equal_records_run_alone(impl):
    model = _model(impl)
    records = _records()
    batch = collate(_pack(records, 24), pad_token_id=0)
    mask, positions = packed_attention(model, batch["position_ids"])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        starts = [(0, 0), (0, 7), (0, 19), (1, 0), (1, 9)]
        worst_plain = 0.0
        for (row, start), rec in zip(starts, records):
            alone = model(input_ids=torch.tensor([rec.input_ids])).logits[0]
            got = packed[row, start : start + len(rec)]
            assert rel_err(got, alone) < 1e-5, (impl, rec.source)
            worst_plain = max(worst_plain, rel_err(plain[row, start : start + len(rec)], alone))
    assert worst_plain > 1e-2  # plain packing (records attend to each other) would fail the check above


def test_block_mask_matches_transformers_own_packed_path():
    """sdpa without a mask (and without a cache) reads the packed layout from position_ids itself; our 4D mask agrees
    with it, and stays right where transformers' detection is skipped (a cache, as `use_cache` defaults to in eval)."""
    model = _model("sdpa")
    batch = collate(_pack(_records(), 24), pad_token_id=0)
    mask, positions = packed_attention(model, batch["position_ids"])
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits
        theirs = model(input_ids=batch["input_ids"], position_ids=positions, use_cache=False).logits
    real = batch["attention_mask"].bool()
    assert rel_err(ours[real], theirs[real]) < 1e-5
    assert packed_attention(type("M", (), {"config": type("C", (), {"_attn_implementation": "flash_attention_2"})})(),
                            positions)[0] is None  # fmt: skip


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_loss_sum_equals_records_run_alone(impl, chunk):
    model = _model(impl)
    records = _records()
    packed_batch = collate(_pack(records, 24), pad_token_id=0)
    with torch.no_grad():
        alone = sum(
            float(causal_lm_loss(model, torch.tensor([r.input_ids]), torch.tensor([r.labels]), normalizer=1.0,
                                 chunk_size=chunk))
            for r in records
        )  # fmt: skip
        packed = float(
            causal_lm_loss(model, packed_batch["input_ids"], packed_batch["labels"], normalizer=1.0, chunk_size=chunk,
                           position_ids=packed_batch["position_ids"])
        )  # fmt: skip
        # the trainer's path: forward_loss_sum on a collated packed batch (fp32, no autocast)
        trainer = float(forward_loss_sum(model, packed_batch, torch.device("cpu"), bf16=False, loss_chunk_tokens=chunk))
    assert abs(packed - alone) / alone < 1e-5
    assert abs(trainer - alone) / alone < 1e-5


def test_packing_raises_real_tokens_per_micro_batch():
    """Instruction-like lengths (log-normal, median ~150 tokens) at max_seq_len 512, micro-batch 4: packed rows
    carry about twice the non-padding tokens of padded single-record rows (greedy in-order packing)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(math.log(150) + 0.9 * torch.randn(4000, generator=g)).round().clamp(8, 512).int().tolist()
    records = [Example([1] * n, [1] * n, str(i)) for i, n in enumerate(lengths)]
    packs = _pack(records, 512)
    size = 4

    def per_batch(examples):
        real = [sum(len(e) for e in examples[i : i + size]) for i in range(0, len(examples), size)]
        computed = [max(len(e) for e in examples[i : i + size]) * size for i in range(0, len(examples), size)]
        return sum(real) / len(real), sum(real) / sum(computed)

    plain_tokens, plain_use = per_batch(records)
    packed_tokens, packed_use = per_batch(packs)
    print(
        f"\nnon-padding tokens per micro-batch of {size}: unpacked {plain_tokens:.0f} ({plain_use:.0%} of positions "
        f"real), packed {packed_tokens:.0f} ({packed_use:.0%}); x{packed_tokens / plain_tokens:.2f}; "
        f"steps per epoch x{len(packs) / len(records):.2f}"
    )
    assert packed_tokens > 1.8 * plain_tokens and packed_use > plain_use + 0.2
