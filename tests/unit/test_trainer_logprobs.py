"""`response_log_probs` (issue 13): the chunked computation over response positions only
gives the log-probs, and the gradients of a loss on them, of the plain one (the logits of the
whole sequence, fp32 log-softmax), and never builds or keeps logits for the whole sequence.

Prompts are a text one and an image one of different lengths, responses of different lengths
(so both are padded), chunks of 4 tokens (several chunks, the last one partial)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image
from torch import Tensor

from lmmr1_trainer.models import (
    LOG_PROB_CHUNK_TOKENS,
    ChatEncoder,
    SequenceBatch,
    build_sequence_batch,
    response_log_probs,
)
from lmmr1_trainer.synthetic import chat_message
from lmmr1_trainer.tiny_model import build_model, build_processor, build_tokenizer

TEMPERATURE = 0.7
CHUNK = 4
# fp32 on CPU: the chunked LM head multiplies fewer rows at a time than the full one, so
# sums are blocked differently. Seen here: log-probs (-9..0) within 1e-6, gradients (up to
# 8.6) within 7e-6; a misaligned position or a wrong temperature is off by 0.1 or more.
ATOL, RTOL = 1e-5, 1e-4
GRAD_ATOL = 5e-5
RESPONSE_LENGTHS = (9, 23, 1)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    torch.set_num_threads(2)
    return build_tokenizer()


def _batch(tokenizer: Any, text_only: bool) -> SequenceBatch:
    """Three prompts (two texts of different lengths and, for Qwen2.5-VL, an image one),
    each with random response tokens of its own length."""
    image_pad = int(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    encoder = (
        ChatEncoder(tokenizer, None, None)
        if text_only
        else ChatEncoder(tokenizer, build_processor(tokenizer), image_pad)
    )
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (56, 84, 3), generator=generator, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    prompts = [
        encoder.encode(chat_message("What is 3 + 4?", None), []),
        encoder.encode(chat_message("Count the circles. Think step by step.", None), []),
        encoder.encode(chat_message("How many squares?", "file:///x.png"), [image])
        if not text_only
        else encoder.encode(chat_message("What is 10 * 2? Answer with the number.", None), []),
    ]
    # No vision placeholder in a response: the model would ask for image features.
    allowed = torch.tensor(sorted(set(range(len(tokenizer))) - set(encoder.vision_token_ids)))
    responses = [
        allowed[torch.randint(0, len(allowed), (n,), generator=generator)].tolist()
        for n in RESPONSE_LENGTHS
    ]
    return build_sequence_batch(prompts, responses, encoder.pad_token_id, encoder.image_token_id)


def _model(tokenizer: Any, text_only: bool) -> Any:
    model = build_model(tokenizer, text_only=text_only, seed=1)
    with torch.no_grad():  # random weights of a larger scale: peaked, varied distributions
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def full_logits_log_probs(model: Any, batch: SequenceBatch, temperature: float) -> Tensor:
    """The plain computation: every position's logits, log-softmax in fp32, then each row's
    response positions read one by one (zeros on padding)."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if batch.pixel_values is not None:
        inputs |= {"pixel_values": batch.pixel_values, "image_grid_thw": batch.image_grid_thw}
    if batch.mm_token_type_ids is not None:
        inputs["mm_token_type_ids"] = batch.mm_token_type_ids
    logits = model(**inputs, use_cache=False).logits
    log_softmax = torch.log_softmax(logits.float() / temperature, dim=-1)
    rows = []
    for i, length in enumerate(batch.response_mask.sum(1).tolist()):
        start = int(batch.prompt_lengths[i])
        row = [log_softmax[i, start + t - 1, batch.input_ids[i, start + t]] for t in range(length)]
        padding = [torch.zeros(())] * (batch.response_mask.size(1) - length)
        rows.append(torch.stack(row + padding))
    return torch.stack(rows)


def _loss_and_grads(model: Any, log_probs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    weights = torch.linspace(-1.0, 2.0, log_probs.numel()).reshape(log_probs.shape)
    model.zero_grad()
    (log_probs * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return log_probs.detach(), grads


@pytest.mark.parametrize(
    ("text_only", "chunk_tokens", "gradient_checkpointing"),
    [(True, CHUNK, False), (False, CHUNK, False), (False, LOG_PROB_CHUNK_TOKENS, True)],
    ids=["qwen2-text", "qwen25vl-image", "qwen25vl-one-chunk-hf-checkpointing"],
)
def test_log_probs_and_gradients_match_the_full_logits(
    tokenizer: Any, text_only: bool, chunk_tokens: int, gradient_checkpointing: bool
) -> None:
    model = _model(tokenizer, text_only)
    if gradient_checkpointing:  # as the trainer's engine sets the policy up
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = _batch(tokenizer, text_only)
    assert (batch.pixel_values is None) == text_only
    assert batch.response_mask.sum(1).tolist() == list(RESPONSE_LENGTHS)

    expected, expected_grads = _loss_and_grads(
        model, full_logits_log_probs(model, batch, TEMPERATURE)
    )
    got, grads = _loss_and_grads(
        model, response_log_probs(model, batch, TEMPERATURE, chunk_tokens=chunk_tokens)
    )
    assert got.shape == expected.shape == batch.response_mask.shape
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=ATOL, rtol=RTOL), (got - expected).abs().max()
    assert (got[batch.response_mask == 0] == 0).all()
    assert (got[batch.response_mask == 1] < 0).all()
    assert grads.keys() == expected_grads.keys() and len(grads) > 10
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, atol=GRAD_ATOL, rtol=RTOL), name
    with torch.no_grad():  # the old/ref log-prob pass: no autograd, same values
        no_grad = response_log_probs(model, batch, TEMPERATURE, chunk_tokens=chunk_tokens)
    assert torch.allclose(no_grad, expected, atol=ATOL, rtol=RTOL)


def test_no_logits_for_the_whole_sequence_are_built_or_kept(tokenizer: Any) -> None:
    """The LM head sees at most a chunk of hidden states at a time, and nothing as wide as
    the vocabulary is kept for backward: each chunk's logits are recomputed there."""
    model = _model(tokenizer, text_only=False).train()
    batch = _batch(tokenizer, text_only=False)
    vocab = model.config.get_text_config().vocab_size
    head_rows: list[int] = []
    model.lm_head.register_forward_hook(
        lambda _head, args, _out: head_rows.append(args[0].shape[:-1].numel())
    )
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: list[tuple[int, ...]] = []  # shapes of the activations autograd keeps for backward

    def pack(saved: Tensor) -> Tensor:
        if saved.untyped_storage().data_ptr() not in weights:  # e.g. the LM head's, transposed
            kept.append(tuple(saved.shape))
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        log_probs = response_log_probs(model, batch, TEMPERATURE, chunk_tokens=CHUNK)
    forward_calls = len(head_rows)
    log_probs.sum().backward()

    tokens = sum(RESPONSE_LENGTHS)
    chunks = -(-tokens // CHUNK)
    assert max(head_rows) <= CHUNK, head_rows  # the whole batch is 3 x 50+ positions
    # One call for the last position's logits (logits_to_keep=1), then one per chunk; in
    # backward each chunk once more.
    assert head_rows[0] == len(RESPONSE_LENGTHS) and forward_calls == 1 + chunks
    assert sum(head_rows[1:forward_calls]) == tokens and len(head_rows) == 1 + 2 * chunks
    assert kept and not [shape for shape in kept if vocab in shape[-1:]], kept


def test_rows_without_response_tokens(tokenizer: Any) -> None:
    """Zeros, and a loss on them still backpropagates (zeros) through the model."""
    model = _model(tokenizer, text_only=True)
    batch = _batch(tokenizer, text_only=True)
    batch.response_mask.zero_()
    log_probs = response_log_probs(model, batch, TEMPERATURE, chunk_tokens=CHUNK)
    assert (log_probs == 0).all()
    log_probs.sum().backward()
    assert model.lm_head.weight.grad is not None
    assert (model.lm_head.weight.grad == 0).all()


def test_rejects_a_model_without_an_lm_head(tokenizer: Any) -> None:
    backbone = _model(tokenizer, text_only=True).model
    with pytest.raises(TypeError, match="lm_head"):
        response_log_probs(backbone, _batch(tokenizer, text_only=True))
