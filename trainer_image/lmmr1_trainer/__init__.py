"""Everything that runs inside an LMM-R1 stage's pods: rollouts, verifier, trainer, checkpoints."""
