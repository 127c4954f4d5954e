"""The blank-image forward of the vision tower on image-free micro-batches (issue 16).

Under ZeRO-3 a rank gathers each module's parameter shards from the other ranks when the
module runs. In a stage that mixes text-only and image rows, a rank whose micro-batch has no
image skipped the vision tower while another ran it, and their gathers no longer matched:
with gloo the step died at once (rank 1: "Received data size doesn't match expected size.
Is there a distributed collective mismatch in your code?", then rank 0: "Connection reset
by peer"); NCCL waits instead, until the collective timeout. `response_log_probs` now runs
the tower on a blank image for such micro-batches, adding zero times its features to the
token embeddings (LMM-R1 does the same with fake pixel values).

Here: (a) on one process, the log-probs and the language model's gradients of a text-only
micro-batch are those of the plain forward (no tower), and the tower's parameters get
gradients of zero instead of none; (b) two real ranks under DeepSpeed ZeRO-3 (CPU, gloo),
rank 0 with an image and rank 1 without, finish the no-grad pass and two updates, with rank
1's log-probs those of the unpartitioned model; a hang fails the test at its deadline.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from tests.trainer_harness import free_port
from tests.unit.test_trainer_logprobs import ATOL, GRAD_ATOL, RTOL, full_logits_log_probs

from lmmr1_trainer.config import AlgorithmConfig
from lmmr1_trainer.engine import CPU_ZERO3_ENV
from lmmr1_trainer.models import (
    ChatEncoder,
    SequenceBatch,
    build_sequence_batch,
    response_log_probs,
)
from lmmr1_trainer.synthetic import chat_message
from lmmr1_trainer.tiny_model import build_model, build_processor, build_tokenizer

WORLD = 2
# Two ranks on two shared CPU cores: DeepSpeed's start, a no-grad pass and two updates take
# a minute or two here. A hang is stopped at this deadline (and by the process group's
# timeout, COLLECTIVE_TIMEOUT_S, inside the ranks).
DEADLINE_S = 420
COLLECTIVE_TIMEOUT_S = 120


def _encoder(tokenizer: Any) -> ChatEncoder:
    image_pad = int(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    return ChatEncoder(tokenizer, build_processor(tokenizer), image_pad)


def _batch(encoder: ChatEncoder, with_image: bool, seed: int = 0) -> SequenceBatch:
    generator = torch.Generator().manual_seed(seed)
    if with_image:
        pixels = torch.randint(0, 256, (56, 84, 3), generator=generator, dtype=torch.uint8)
        prompt = encoder.encode(
            chat_message("How many squares?", "file:///x.png"), [Image.fromarray(pixels.numpy())]
        )
    else:
        prompt = encoder.encode(chat_message("What is 3 + 4?", None), [])
    allowed = torch.tensor(
        sorted(set(range(len(encoder.tokenizer))) - set(encoder.vision_token_ids))
    )
    response = allowed[torch.randint(0, len(allowed), (7,), generator=generator)].tolist()
    return build_sequence_batch([prompt], [response], encoder.pad_token_id, encoder.image_token_id)


def _model(tokenizer: Any) -> Any:
    model = build_model(tokenizer, seed=1)
    with torch.no_grad():  # larger random weights: peaked, varied distributions
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def _grads(model: Any, log_probs: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    (
        log_probs * torch.linspace(-1.0, 2.0, log_probs.numel()).reshape(log_probs.shape)
    ).sum().backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_a_text_only_micro_batch_runs_the_tower_without_changing_the_result() -> None:
    torch.set_num_threads(2)
    tokenizer = build_tokenizer()
    model = _model(tokenizer).train()
    batch = _batch(_encoder(tokenizer), with_image=False)
    assert batch.pixel_values is None
    tower_calls: list[int] = []
    model.model.visual.register_forward_hook(lambda *_: tower_calls.append(1))

    plain = full_logits_log_probs(model, batch, 1.0)  # the model's own forward: no tower
    plain_grads = _grads(model, plain)
    assert tower_calls == []
    got = response_log_probs(model, batch)
    grads = _grads(model, got)
    assert tower_calls == [1]

    torch.testing.assert_close(got, plain.detach(), atol=ATOL, rtol=RTOL)
    vision = [n for n in grads if n.startswith("model.visual.")]
    assert len(vision) > 10
    for name, grad in grads.items():
        if name in vision:
            assert plain_grads[name] is None, name
            assert grad is not None and torch.count_nonzero(grad) == 0, name
        else:
            expected = plain_grads[name]
            assert grad is not None and expected is not None, name
            torch.testing.assert_close(grad, expected, atol=GRAD_ATOL, rtol=RTOL)
    with torch.no_grad():  # the old/reference log-prob pass: the tower runs there too
        torch.testing.assert_close(
            response_log_probs(model, batch), plain.detach(), atol=ATOL, rtol=RTOL
        )
    assert tower_calls == [1, 1]


def test_an_image_micro_batch_runs_the_tower_once() -> None:
    tokenizer = build_tokenizer()
    model = _model(tokenizer)
    batch = _batch(_encoder(tokenizer), with_image=True)
    tower_calls: list[int] = []
    model.model.visual.register_forward_hook(lambda *_: tower_calls.append(1))
    with torch.no_grad():
        got = response_log_probs(model, batch)
    assert tower_calls == [1]
    torch.testing.assert_close(got, full_logits_log_probs(model, batch, 1.0), atol=ATOL, rtol=RTOL)


# -- two ranks under ZeRO-3 -----------------------------------------------------------------


def _zero3_rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "LOCAL_WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            CPU_ZERO3_ENV: "1",
        }
    )
    from lmmr1_trainer.engine import PolicyEngine, setup_distributed

    torch.set_num_threads(1)
    setup_distributed(on_gpu=False, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    tokenizer = build_tokenizer()
    model = _model(tokenizer)  # the same weights on both ranks (seeded)
    batch = _batch(_encoder(tokenizer), with_image=rank == 0, seed=rank)
    with torch.no_grad():
        expected = full_logits_log_probs(copy.deepcopy(model), batch, 1.0)
    algo = AlgorithmConfig(
        zero_stage=3,
        train_batch_size=WORLD,
        micro_train_batch_size=1,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        bf16=False,
        gradient_checkpointing=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy = PolicyEngine(model, algo, WORLD, 4, on_gpu=False)
    assert policy.zero_stage == 3
    with torch.no_grad():  # the old-log-prob pass
        first = response_log_probs(policy.engine, batch)
    losses = []
    for _ in range(2):
        loss = -response_log_probs(policy.engine, batch).sum()
        policy.backward_and_step(loss)
        losses.append(float(loss))
    after = policy.full_state_dict(rank)
    torch.save({"first": first, "expected": expected, "losses": losses}, out / f"rank-{rank}.pt")
    if rank == 0:
        assert after is not None
        torch.save({"before": before, "after": after}, out / "weights.pt")
    torch.distributed.destroy_process_group()


def test_image_and_text_only_ranks_finish_a_zero3_step(tmp_path: Path) -> None:
    context = mp.start_processes(
        _zero3_rank,
        args=(free_port(), tmp_path),
        nprocs=WORLD,
        start_method="spawn",
        join=False,
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the ZeRO-3 ranks were still running after {DEADLINE_S} s (a hang)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank-{rank}.pt")
        torch.testing.assert_close(result["first"], result["expected"], atol=ATOL, rtol=RTOL)
        assert result["losses"][1] < result["losses"][0], result["losses"]
    weights = torch.load(tmp_path / "weights.pt")
    changed = {n for n, p in weights["before"].items() if not torch.equal(weights["after"][n], p)}
    assert "model.visual.patch_embed.proj.weight" in changed  # rank 0's image trained the tower
    assert "model.language_model.norm.weight" in changed


def test_the_critics_text_only_forward_runs_the_tower_too() -> None:
    """The critic (gae) is a second ZeRO-3 engine on the same backbone: the same gathers."""
    from lmmr1_trainer.critic import CriticModel, response_values

    tokenizer = build_tokenizer()
    critic = CriticModel(_model(tokenizer), seed=0)
    batch = _batch(_encoder(tokenizer), with_image=False)
    tower_calls: list[int] = []
    critic.backbone.visual.register_forward_hook(lambda *_: tower_calls.append(1))
    values = response_values(critic, batch)
    assert tower_calls == [1]
    values.sum().backward()
    vision = [p for n, p in critic.named_parameters() if n.startswith("backbone.visual.")]
    assert vision and all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in vision)
    with torch.no_grad():  # the value is the plain forward's: the blank image adds zero
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        hidden = critic.backbone(**inputs, use_cache=False)[0]
        plain = critic.value_head(hidden).squeeze(-1)
    mask = batch.response_mask
    rows, steps = mask.nonzero(as_tuple=True)
    expected = plain[rows, batch.prompt_lengths[rows] + steps - 1]
    torch.testing.assert_close(values[rows, steps], expected, atol=ATOL, rtol=RTOL)
