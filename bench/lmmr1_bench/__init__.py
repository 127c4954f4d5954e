"""The project's benchmarks: never part of an image (`make bench`, `bench/gpu.sh`).

- `lmmr1_bench.trainer` (+ `trainer_trl`): one RL step of our trainer (colocated vLLM)
  against TRL's GRPOTrainer, with and without its vLLM colocate mode, on CPU;
- `lmmr1_bench.verifier`: the verifier's rewards per second;
- `lmmr1_bench.logprob_memory`: peak memory of the log-prob pass against sequence length,
  full logits against the trainer's chunked pass (prints a table for docs/benchmarks.md);
- `lmmr1_bench.gpu` (+ `gpu_phases`, `gpu_colocate`): rollout, update and weight sync on a
  GPU; the colocated engine against bare vLLM.

They import `lmmr1_trainer` (installed, or `trainer_image` on PYTHONPATH) and are found with
`bench` on PYTHONPATH (the Makefile, bench/gpu.sh and pytest's `pythonpath` set it).
"""
