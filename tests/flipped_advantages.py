"""The real trainer with the sign of every advantage flipped in the policy loss.

The negative control of the learning test: the same code, data and seeds, but the update
pushes probability away from rewarded samples, so mean reward must not rise. If it did, the
rise would come from something other than the RL update (and the test would be worthless).
Usage: python tests/flipped_advantages.py --config stage.yaml
"""

from __future__ import annotations

from torch import Tensor

import lmmr1_trainer.algorithms as algorithms
from lmmr1_trainer import train

_policy_loss = algorithms.policy_loss


def _flipped_policy_loss(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, Tensor]:
    return _policy_loss(log_probs, old_log_probs, -advantages, mask, clip_range)


# train.py imports policy_loss from the module at each step, so this reaches the loop.
algorithms.policy_loss = _flipped_policy_loss

if __name__ == "__main__":
    train.exit_now(train.main())
