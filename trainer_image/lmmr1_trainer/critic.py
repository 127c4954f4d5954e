"""PPO's critic, for `advantage_estimator: gae` (LMM-R1's MGT-Geo, Direct-RL and Sokoban).

As OpenRLHF's critic: the policy's backbone (vision tower included: the value depends on the
image), initialised from the stage's starting weights, with a value head (Linear hidden -> 1,
no bias) in place of the LM head. The value of response token t is the head's output on the
hidden state that predicts it (the state the token is sampled from), the same positions as
`models.response_log_probs`. It trains in its own DeepSpeed engine (the policy's wrapper,
with the critic's learning rate and warm-up), one micro-batch after the policy's, on the
clipped value loss against the GAE returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lmmr1_trainer.algorithms import value_loss
from lmmr1_trainer.config import AlgorithmConfig, CriticConfig
from lmmr1_trainer.models import SequenceBatch, load_model, model_inputs, vision_tower_runs

if TYPE_CHECKING:
    from lmmr1_trainer.engine import PolicyEngine
    from lmmr1_trainer.experience import MicroBatch

CRITIC_STATE_DIR = "critic"  # under the checkpoint's trainer_state/


class CriticModel(torch.nn.Module):
    """A causal LM's backbone with a value head: forward(**model inputs) -> values (B, L)."""

    def __init__(self, causal_lm: Any, seed: int) -> None:
        super().__init__()
        self.backbone = causal_lm.model  # the LM head is dropped with `causal_lm`
        self.config = causal_lm.config
        lm_head = causal_lm.lm_head
        hidden = int(lm_head.in_features)
        self.value_head: torch.nn.Linear = torch.nn.utils.skip_init(  # type: ignore[no-untyped-call]
            torch.nn.Linear,
            hidden,
            1,
            bias=False,
            dtype=lm_head.weight.dtype,
            device=lm_head.weight.device,
        )
        # OpenRLHF's initialisation (std 1/(hidden+1): values start near 0), from the run's
        # seed rather than the global generator, so building the critic draws no numbers
        # the rest of the step depends on.
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(self.value_head.weight.shape, generator=generator) / (hidden + 1)
        with torch.no_grad():
            self.value_head.weight.copy_(weight)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward(self, **inputs: Tensor) -> Tensor:
        # Image-free micro-batches run the vision tower too: under ZeRO-3 every rank must
        # gather the same parameters (see models._touch_vision_tower).
        with vision_tower_runs(self.backbone, inputs):
            hidden = self.backbone(**inputs, use_cache=False)[0]  # last_hidden_state (B, L, D)
        values: Tensor = self.value_head(hidden).squeeze(-1)
        return values


def load_critic(model_dir: Path, dtype: torch.dtype, seed: int) -> CriticModel:
    return CriticModel(load_model(model_dir, dtype), seed)


def critic_settings(algo: AlgorithmConfig, critic: CriticConfig) -> AlgorithmConfig:
    """The policy's engine settings with the critic's learning rate and warm-up (unset: the
    policy's, as OpenRLHF's one --lr_warmup_ratio serves both). `freeze_prefix` is the
    policy's alone, as OpenRLHF's --freeze_prefix freezes the actor only: the critic trains
    its whole backbone (its names, `backbone.*`, would not match the policy's prefixes)."""
    warmup = critic.warmup_ratio if critic.warmup_ratio is not None else algo.warmup_ratio
    update = {"learning_rate": critic.learning_rate, "warmup_ratio": warmup, "freeze_prefix": []}
    return algo.model_copy(update=update)


def response_values(critic: Any, batch: SequenceBatch) -> Tensor:
    """The critic's value for every response position, (B, T) in fp32 (0 on padding).
    `critic` is a `CriticModel` or the DeepSpeed engine around one."""
    device = next(critic.parameters()).device
    inputs = model_inputs(batch, device)
    values = critic(**inputs)  # (B, L)
    mask = batch.response_mask.to(device)
    rows, steps = mask.nonzero(as_tuple=True)
    positions = batch.prompt_lengths.to(device)[rows] + steps - 1
    picked: Tensor = values[rows, positions].float()
    return picked.new_zeros(mask.shape).index_put((rows, steps), picked)


def critic_update(
    engine: PolicyEngine, micro_batch: MicroBatch, critic: CriticConfig
) -> tuple[float, float]:
    """One micro-batch of the critic's training (DeepSpeed steps at the accumulation
    boundary, as the policy's). Returns the value loss, and the loss a critic that predicts 0
    (where it starts) would have on the same returns: the value loss alone follows the
    returns' spread, which changes as the policy learns; their ratio says how much of the
    returns the critic has learned."""
    if micro_batch.values is None or micro_batch.returns is None:
        raise ValueError("the critic trains on micro-batches prepared with its values")
    device = engine.engine.device
    values = response_values(engine.engine, micro_batch.batch)
    returns = micro_batch.returns.to(device)
    mask = micro_batch.batch.response_mask.to(device)
    loss = value_loss(values, micro_batch.values.to(device), returns, mask, critic.value_clip)
    engine.backward_and_step(loss)
    zero = value_loss(torch.zeros_like(returns), returns, returns, mask, None)
    return float(loss.detach()), float(zero)
