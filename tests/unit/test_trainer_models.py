"""The tiny Qwen2.5-VL / Qwen2 builders, prompt encoding, response log-probs, and the
transformers rollout server with its client (in-process, on a loopback port)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from lmmr1_trainer.data import ImageLoader
from lmmr1_trainer.models import (
    ChatEncoder,
    build_sequence_batch,
    is_multimodal,
    load_model,
    resolve_model,
    response_log_probs,
)
from lmmr1_trainer.rollout.backends import TransformersBackend
from lmmr1_trainer.rollout.client import RolloutClient, RolloutError
from lmmr1_trainer.rollout.protocol import SamplingParams
from lmmr1_trainer.rollout.server import RolloutServer
from lmmr1_trainer.synthetic import chat_message, generate_rows, write_dataset
from lmmr1_trainer.tiny_model import SPECIAL_TOKENS, build_tiny_model
from lmmr1_trainer.weight_sync import HttpWeightSync

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vl"))


@pytest.fixture(scope="module")
def image_chat(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    from lmmr1_trainer.config import DatasetConfig
    from lmmr1_trainer.data import load_dataset

    out = tmp_path_factory.mktemp("data")
    write_dataset("counting", 1, 0, str(out))
    row = load_dataset(DatasetConfig(uri=str(out / "train.jsonl"), type="multimodal"))[0]
    return row.messages


@pytest.fixture(scope="module")
def server(vl_dir: Path) -> Iterator[RolloutServer]:
    rollout = RolloutServer(("127.0.0.1", 0), TransformersBackend(vl_dir), TOKEN)
    thread = threading.Thread(target=rollout.serve_forever, daemon=True)
    thread.start()
    yield rollout
    rollout.shutdown()
    rollout.server_close()


def test_tiny_vl_model_has_qwen_tokens_template_and_processor(vl_dir: Path) -> None:
    assert is_multimodal(vl_dir) and resolve_model(str(vl_dir)) == vl_dir
    encoder = ChatEncoder.load(vl_dir)
    vocab = encoder.tokenizer.get_vocab()
    assert all(token in vocab for token in SPECIAL_TOKENS)
    text = encoder.prompt_text(chat_message("What is 1 + 1?", "file:///x.png"))
    assert text.endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is 1 + 1?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text.startswith("<|im_start|>system\nYou should first think")
    model = load_model(vl_dir)
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_text_only_model_generates_and_reloads(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path / "text", text_only=True)
    assert not is_multimodal(path)
    encoder = ChatEncoder.load(path)
    model = load_model(path)
    inputs = encoder.encode(chat_message("What is 3 + 4?", None), [])
    out = model.generate(**inputs, do_sample=True, max_new_tokens=5, pad_token_id=0)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    with pytest.raises(ValueError, match="text-only"):
        encoder.encode(chat_message("x", "file:///x.png"), [object()])


def test_generation_log_probs_match_the_trainers_recomputation(
    vl_dir: Path, image_chat: list[dict[str, object]]
) -> None:
    """The rollout server's per-token log-probs and the trainer's forward pass agree: the
    prompt encoding, image features, mrope positions and response alignment are the same."""
    backend = TransformersBackend(vl_dir)
    loader = ImageLoader()
    from lmmr1_trainer.rollout.protocol import GenerateRequest

    request = GenerateRequest(
        prompts=[loader.inline(image_chat)],
        sampling=SamplingParams(n=3, max_tokens=6, seed=1),
    )
    result = backend.generate(request)[0]
    encoder = backend.encoder
    from lmmr1_trainer.data import decode_images

    encoded = encoder.encode(image_chat, decode_images(image_chat, loader))
    assert encoded["input_ids"][0].tolist() == result.prompt_token_ids
    assert "pixel_values" in encoded and encoded["image_grid_thw"].tolist() == [[1, 8, 8]]
    batch = build_sequence_batch(
        [encoded] * 3,
        [s.token_ids for s in result.samples],
        encoder.pad_token_id,
        encoder.image_token_id,
    )
    with torch.no_grad():
        recomputed = response_log_probs(backend.model, batch)
    for row, sample in enumerate(result.samples):
        n = len(sample.token_ids)
        assert torch.allclose(recomputed[row, :n], torch.tensor(sample.logprobs), atol=1e-4)
        assert sample.finish_reason in ("stop", "length")
        assert not set(sample.token_ids) & set(encoder.vision_token_ids)


def test_server_generates_for_images_and_guards_weight_updates(
    server: RolloutServer, image_chat: list[dict[str, object]], vl_dir: Path
) -> None:
    client = RolloutClient([server.url], TOKEN)
    client.wait_ready(timeout_s=10)
    health = requests.get(f"{server.url}/health", timeout=5).json()
    assert health == {"status": "ok", "backend": "transformers", "weight_version": 0}
    chats = [ImageLoader().inline(image_chat), chat_message("What is 2 + 2?", None)]
    results, version = client.generate(chats, SamplingParams(n=2, max_tokens=4, seed=0))
    assert version == 0 and [len(r.samples) for r in results] == [2, 2]
    assert all(1 <= len(s.token_ids) <= 4 for r in results for s in r.samples)

    denied = requests.post(f"{server.url}/update_weights", data=b"x", timeout=5)
    assert denied.status_code == 401 and "bearer token" in denied.json()["error"]
    wrong = RolloutClient([server.url], "nope", retries=1, backoff_s=0)
    with pytest.raises(RolloutError, match="401"):
        wrong.update_weights(b"x", 1)

    model = load_model(vl_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(0.0)  # every logit equal: each token has log-prob -log(vocab)
    HttpWeightSync(client).push(model.state_dict(), version=7)
    results, version = client.generate(chats[1:], SamplingParams(n=1, max_tokens=3, seed=0))
    assert version == 7
    vocab = model.config.get_text_config().vocab_size
    expected = -torch.log(torch.tensor(float(vocab)))
    assert torch.allclose(torch.tensor(results[0].samples[0].logprobs), expected, atol=1e-4)
    metrics = requests.get(f"{server.url}/metrics", timeout=5).text
    assert "lmmr1_rollout_weight_version 7.0" in metrics

    # Weights as a trainer would have them after an update: the server's log-probs for an
    # image prompt must equal the trainer's own forward pass with those weights.
    torch.manual_seed(3)
    trained = load_model(vl_dir)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(0.02 * torch.randn_like(param))
    HttpWeightSync(client).push(trained.state_dict(), version=8)
    results, version = client.generate(chats[:1], SamplingParams(n=2, max_tokens=5, seed=4))
    assert version == 8
    loader = ImageLoader()
    from lmmr1_trainer.data import decode_images

    encoder = ChatEncoder.load(vl_dir)
    encoded = encoder.encode(image_chat, decode_images(image_chat, loader))
    samples = results[0].samples
    batch = build_sequence_batch(
        [encoded] * 2,
        [s.token_ids for s in samples],
        encoder.pad_token_id,
        encoder.image_token_id,
    )
    with torch.no_grad():
        ours = response_log_probs(trained.eval(), batch)
        before = response_log_probs(load_model(vl_dir).eval(), batch)
    for row, sample in enumerate(samples):
        n = len(sample.token_ids)
        served = torch.tensor(sample.logprobs)
        assert torch.allclose(ours[row, :n], served, atol=1e-4)
        assert not torch.allclose(before[row, :n], served, atol=1e-3)  # the push mattered


def test_server_errors_are_json(server: RolloutServer) -> None:
    bad = requests.post(f"{server.url}/generate", json={"prompts": []}, timeout=5)
    assert bad.status_code == 422 and bad.json()["error"].startswith("prompts")
    assert requests.get(f"{server.url}/nope", timeout=5).status_code == 404
    assert requests.get(f"{server.url}/generate", timeout=5).status_code == 405
    url = f"{server.url}/update_weights"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    garbage = requests.post(url, data=b"not safetensors", headers=headers, timeout=5)
    assert garbage.status_code == 400


def test_client_retries_on_another_server(server: RolloutServer, vl_dir: Path) -> None:
    client = RolloutClient(["http://127.0.0.1:9", server.url], TOKEN, retries=2, backoff_s=0)
    prompts = [chat_message(row.question, None) for row in generate_rows("arithmetic", 4, 0)]
    results, _ = client.generate(prompts, SamplingParams(n=1, max_tokens=2))
    # Each result is its own prompt's: the server's prompt tokens are that prompt's encoding.
    encoder = ChatEncoder.load(vl_dir)
    expected = [encoder.encode(chat, [])["input_ids"][0].tolist() for chat in prompts]
    assert [r.prompt_token_ids for r in results] == expected
    assert len(set(map(tuple, expected))) == 4  # distinct prompts, so the check can fail
