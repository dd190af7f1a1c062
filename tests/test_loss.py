"""The chunked lm_head + cross-entropy against transformers' full-logits loss: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora_lite import apply_lora, load_quantized
from qlora_lite.training.loss import IGNORE_INDEX, causal_lm_loss, chunked_cross_entropy, shift_labels
from tests.helpers import rel_err


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_chunked_matches_full_cross_entropy_in_fp32(softcap, trainable_head):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64).requires_grad_(trainable_head)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::5] = IGNORE_INDEX
    labels[8:16] = IGNORE_INDEX  # a whole chunk without targets is skipped

    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=8, softcap=softcap)
    (loss * 3.0).backward()  # a non-unit upstream gradient must scale the stored gradients

    h_ref = hidden.detach().clone().requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(trainable_head)
    logits = h_ref @ w_ref.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ref = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    (ref * 3.0).backward()

    assert abs(loss.item() - ref.item()) < 1e-6 * ref.item()
    assert rel_err(hidden.grad, h_ref.grad) < 1e-6
    if trainable_head:
        assert rel_err(weight.grad, w_ref.grad) < 1e-6


@pytest.mark.parametrize("head_dtype", [torch.bfloat16, torch.float32])
def test_chunked_under_bf16_autocast_computes_the_logits_as_autocast_does(head_dtype):
    # the chunk's matmul writes into a reused buffer (`out=`), which autocast does not cast for: the logits must still
    # be the bf16 product autocast gives, for a bf16 head and for a trainable fp32 one (modules_to_save)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g).bfloat16().requires_grad_(True)
    weight = (torch.randn(50, 16, generator=g) * 0.3).to(head_dtype).requires_grad_(head_dtype == torch.float32)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::5] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=8)
        h_ref = hidden.detach().clone().requires_grad_(True)
        w_ref = weight.detach().clone().requires_grad_(weight.requires_grad)
        logits = h_ref @ w_ref.t()
    assert logits.dtype == torch.bfloat16
    ref = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-6 * ref.item()  # fp32 logits differ here by 4e-5
    assert hidden.grad.dtype == torch.bfloat16 and rel_err(hidden.grad.float(), h_ref.grad.float()) < 1e-2
    if weight.requires_grad:
        assert weight.grad.dtype == torch.float32 and rel_err(weight.grad, w_ref.grad) < 1e-2


def test_shift_labels_pads_with_ignore():
    labels = torch.tensor([[5, 6, 7], [8, 9, IGNORE_INDEX]])
    assert shift_labels(labels).tolist() == [[6, 7, IGNORE_INDEX], [9, IGNORE_INDEX, IGNORE_INDEX]]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_model_loss_and_adapter_grads_match_transformers(tiny_model_dir, arch):
    model, _ = load_quantized(tiny_model_dir(arch), device="cpu")
    apply_lora(model, r=4, alpha=8, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()  # GPT-2 has dropout; gradients flow in eval mode too
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 259, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX

    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    loss = causal_lm_loss(model, ids, labels, chunk_size=7)
    loss.backward()
    assert rel_err(loss, ref) < 1e-3
    for name, grad in ref_grads.items():
        assert rel_err(model.get_parameter(name).grad.float(), grad.float()) < 2e-2, name


def test_normalizer_sums_micro_batches(tiny_model_dir):
    model, _ = load_quantized(tiny_model_dir("llama"), device="cpu")
    ids = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = causal_lm_loss(model, ids, ids)
        tokens = 4 * 15
        halves = causal_lm_loss(model, ids[:2], ids[:2], normalizer=tokens) + causal_lm_loss(
            model, ids[2:], ids[2:], normalizer=tokens
        )
    assert abs(whole.item() - halves.item()) < 1e-3 * whole.item()
