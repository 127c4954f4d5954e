"""`algorithm.freeze_prefix` (LMM-R1's `--freeze_prefix visual`, issue 16): the parameters it
names keep their values through real DeepSpeed updates (ZeRO-0 and ZeRO-3, CPU, gloo) while
the others change, the optimizer holds no state for them, and they are still in what weight
sync and checkpoints read (`named_weights`, `full_state_dict`, the DeepSpeed state that a
resume loads). `visual` means the vision tower by the checkpoint's names (OpenRLHF's, what
LMM-R1's Sokoban script writes), as `model.visual` does by transformers 5's; a prefix that
matches nothing fails the engine with the model's real prefixes in the message."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from lmmr1_trainer.config import AlgorithmConfig
from lmmr1_trainer.engine import CPU_ZERO3_ENV, EngineConfigError
from lmmr1_trainer.models import checkpoint_names, freeze
from lmmr1_trainer.tiny_model import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    torch.set_num_threads(2)
    return build_tokenizer()


def _vision_names(model: Any) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith("model.visual.")}


def test_visual_is_the_vision_tower_by_either_name(tokenizer: Any) -> None:
    """transformers 5 calls the tower `model.visual.*` and the language model
    `model.language_model.*`; the checkpoint (and OpenRLHF) `visual.*` and `model.*`."""
    model = build_model(tokenizer)
    saved = checkpoint_names(model)
    assert saved["model.visual.patch_embed.proj.weight"] == "visual.patch_embed.proj.weight"
    assert saved["model.language_model.norm.weight"] == "model.norm.weight"
    vision = _vision_names(model)
    assert len(vision) > 10 and any(".merger." in n for n in vision)

    assert set(freeze(model, ["visual"])) == vision
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == vision
    assert set(freeze(build_model(tokenizer), ["model.visual"])) == vision
    # The language model by its checkpoint name: `model.` there is not the vision tower.
    language = set(freeze(build_model(tokenizer), ["model.layers"]))
    assert language and not language & vision
    assert language == set(freeze(build_model(tokenizer), ["model.language_model.layers"]))
    assert freeze(build_model(tokenizer), []) == []


def test_prefixes_match_whole_name_components() -> None:
    """`layers.1` is layer 1, not layer 10 (OpenRLHF's plain `startswith` would take both);
    a module without transformers' renaming keeps its own names."""
    model = torch.nn.ModuleDict({str(i): torch.nn.Linear(2, 2) for i in (1, 10, 11)})
    assert sorted(freeze(model, ["1"])) == ["1.bias", "1.weight"]
    assert model["10"].weight.requires_grad and not model["1"].weight.requires_grad
    assert freeze(torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2)}), ["a.weight"]) == ["a.weight"]


def test_an_unknown_prefix_names_itself_and_the_models_prefixes(tokenizer: Any) -> None:
    model = build_model(tokenizer)
    with pytest.raises(ValueError, match="'vision' matches no parameter") as raised:
        freeze(model, ["visual", "vision"])
    message = str(raised.value)
    assert "visual.patch_embed" in message and "model.embed_tokens" in message  # checkpoint
    assert "model.visual" in message and "model.language_model" in message  # transformers
    assert all(p.requires_grad for p in model.parameters())  # nothing half-frozen
    with pytest.raises(ValueError, match="freezes every parameter"):
        freeze(model, ["visual", "model"])


def test_the_engine_fails_on_an_unknown_prefix_before_deepspeed(tokenizer: Any) -> None:
    """The stage's own error: exit 78 via EngineConfigError, naming the field. DeepSpeed is
    not reached (no process group exists here)."""
    from lmmr1_trainer.engine import PolicyEngine

    algo = AlgorithmConfig(freeze_prefix=["visaul"], train_batch_size=2, micro_train_batch_size=2)
    with pytest.raises(EngineConfigError, match=r"algorithm\.freeze_prefix: 'visaul' matches"):
        PolicyEngine(build_model(tokenizer), algo, 1, 1, on_gpu=False)


# -- real DeepSpeed updates, one rank, in a fresh process per ZeRO stage ---------------------


def _train_rank(rank: int, stage: int, out: Path) -> None:
    os.environ[CPU_ZERO3_ENV] = "1"
    from lmmr1_trainer.engine import PolicyEngine, setup_distributed
    from lmmr1_trainer.models import ChatEncoder, build_sequence_batch, response_log_probs
    from lmmr1_trainer.synthetic import chat_message
    from lmmr1_trainer.tiny_model import build_processor

    torch.set_num_threads(1)
    setup_distributed(on_gpu=False, collective_timeout_s=120)
    tokenizer = build_tokenizer()
    encoder = ChatEncoder(
        tokenizer, build_processor(tokenizer), tokenizer.convert_tokens_to_ids("<|image_pad|>")
    )
    model = build_model(tokenizer, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    algo = AlgorithmConfig(
        zero_stage=stage,  # type: ignore[arg-type]
        freeze_prefix=["visual"],
        train_batch_size=1,
        micro_train_batch_size=1,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        bf16=False,
        gradient_checkpointing=True,
    )
    policy = PolicyEngine(model, algo, 1, 4, on_gpu=False)
    assert policy.zero_stage == stage
    image = torch.randint(0, 256, (56, 56, 3), dtype=torch.uint8, generator=torch.Generator())
    from PIL import Image

    prompt = encoder.encode(
        chat_message("How many squares?", "file:///x.png"), [Image.fromarray(image.numpy())]
    )
    batch = build_sequence_batch(
        [prompt], [[40, 41, 42, 43]], encoder.pad_token_id, encoder.image_token_id
    )
    for _ in range(3):  # image micro-batches: the tower runs, with its gradients asked for
        policy.backward_and_step(-response_log_probs(policy.engine, batch).sum())
    after = policy.full_state_dict(0)
    synced = {n: t.to("cpu", copy=True) for n, t in policy.named_weights()}
    policy.save_state(out / "state")
    frozen = {n for n, p in policy.module.named_parameters() if not p.requires_grad}
    torch.save(
        {
            "before": before,
            "after": after,
            "synced": synced,
            "frozen": frozen,
            "optimizer_numel": _optimizer_numel(policy),
            "trainable_numel": sum(
                p.ds_numel if stage == 3 else p.numel()
                for p in policy.module.parameters()
                if p.requires_grad
            ),
        },
        out / "result.pt",
    )
    # A resume: a new engine on the saved weights loads the saved DeepSpeed state.
    reloaded = build_model(tokenizer, seed=1)
    reloaded.load_state_dict(after, strict=False)  # all but the tied LM head (no parameter)
    again = PolicyEngine(reloaded, algo, 1, 4, on_gpu=False)
    again.load_state(out / "state")
    torch.save(
        {"weights": again.full_state_dict(0), "optimizer_numel": _optimizer_numel(again)},
        out / "reloaded.pt",
    )


def _optimizer_numel(policy: Any) -> int:
    """Elements of the Adam moments the inner torch optimizer keeps (ZeRO-3 keys them by its
    flat fp32 partitions, ZeRO-0 by the parameters)."""
    inner = getattr(policy.optimizer, "optimizer", policy.optimizer)
    return sum(int(state["exp_avg"].numel()) for state in inner.state.values())


@pytest.mark.parametrize("stage", [0, 3])
def test_frozen_parameters_keep_their_values_and_get_no_optimizer_state(
    tmp_path: Path, stage: int
) -> None:
    mp.start_processes(_train_rank, args=(stage, tmp_path), nprocs=1, start_method="spawn")
    result = torch.load(tmp_path / "result.pt")
    before, after, frozen = result["before"], result["after"], result["frozen"]
    assert frozen == {n for n in before if n.startswith("model.visual.")} and frozen
    # Every parameter (and under ZeRO <= 2 the tied LM head too, from the state dict).
    assert before.keys() <= after.keys() and before.keys() <= result["synced"].keys()
    for name in before:
        unchanged = torch.equal(after[name], before[name])
        assert unchanged == (name in frozen), name
        assert torch.equal(result["synced"][name], after[name]), name  # what sync sends
    # Adam moments for the trainable parameters only (ZeRO-3 pads its flat partition).
    assert result["trainable_numel"] <= result["optimizer_numel"]
    assert result["optimizer_numel"] < result["trainable_numel"] + 64
    frozen_numel = sum(before[n].numel() for n in frozen)
    assert frozen_numel > 64
    reloaded = torch.load(tmp_path / "reloaded.pt")
    assert reloaded["optimizer_numel"] == result["optimizer_numel"]
    for name in before:
        assert torch.equal(reloaded["weights"][name], after[name]), name


def test_the_critic_trains_its_whole_backbone_whatever_the_policy_freezes() -> None:
    """LMM-R1's Sokoban script: gae with --freeze_prefix visual. OpenRLHF freezes the actor
    only; applied to the critic (`backbone.visual…`) the prefix matched nothing and the stage
    stopped at start with exit 78."""
    from lmmr1_trainer.config import AlgorithmConfig, CriticConfig
    from lmmr1_trainer.critic import critic_settings

    algo = AlgorithmConfig(advantage_estimator="gae", freeze_prefix=["visual"])
    settings = critic_settings(algo, CriticConfig(learning_rate=5e-6))
    assert (settings.freeze_prefix, settings.learning_rate) == ([], 5e-6)
    assert algo.freeze_prefix == ["visual"]
