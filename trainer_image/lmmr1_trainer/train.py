"""python -m lmmr1_trainer.train --config /etc/lmmr1/stage.yaml

Runs one LMM-R1 stage: rule-based RL of the policy with DeepSpeed. Launched once per rank
(torchrun or an indexed Job: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK; without
them, a world of one). Rank 0 drives each step: prompts -> generation -> verifier -> group
baseline; every rank then computes old/reference log-probs (and with gae the critic's values)
and advantages for its share and trains (PPO-clip, several updates per rollout batch; with
gae the critic too, `lmmr1_trainer.critic`); the new weights go to the engines,
rank 0 reports progress and, every `checkpoint.every_steps`, everybody writes a checkpoint
to `<checkpoint.uri>/step-<N>/` (manifest last).

Generation (`rollout.mode`): `colocate` (default), every rank's own vLLM engine generates
its share of the prompts and takes the new weights in process (`rollout.colocate`);
`separate`, rank 0 sends the prompts to the rollout servers and pushes the weights to them
(`weight_sync`).

Start: resume from the newest committed checkpoint under `checkpoint.uri`, else load
`init_from`. End: final checkpoint committed -> progress with `final_checkpoint` ->
termination message (/dev/termination-log) -> exit 0. Exit 78 on a configuration error, with
the reason in the termination message (under `lmmr1_trainer.launch`, which runs torchrun, the
rank reports it to the launcher, which exits 78 with it: torchrun alone would exit 1).
Exit 1 with the reason in the termination message when a wait misses its deadline
(`deadline.AttemptFailed`, e.g. `WeightSyncTimeout`): the operator restarts the stage.
CPU: `trainer.gpus_per_node: 0` (DeepSpeed with DS_ACCELERATOR=cpu, gloo, ZeRO-2, fp32).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError

from lmmr1_trainer.config import CONFIG_PATH, Progress, StageConfig
from lmmr1_trainer.launch import config_error
from lmmr1_trainer.launch import write_termination_message as _write_termination_message
from lmmr1_trainer.scratch import Layout, checkpoint_bytes, shortfall

if TYPE_CHECKING:
    from lmmr1_trainer.config import EvaluationResult
    from lmmr1_trainer.engine import PolicyEngine
    from lmmr1_trainer.evaluation import Evaluator
    from lmmr1_trainer.experience import RolloutStats
    from lmmr1_trainer.rollout.colocate import ColocatedRollout
    from lmmr1_trainer.rollout.protocol import Rollouts
    from lmmr1_trainer.tracking import Tracker

logger = logging.getLogger("lmmr1_trainer.train")
THREADS_ENV = "LMMR1_TORCH_THREADS"
WORKDIR_ENV = "LMMR1_WORKDIR"
STEP_LOG_PREFIX = "lmmr1-train step "
WEIGHTS_LOG_PREFIX = "lmmr1-train weights "
# Set to 1: every rank logs a digest of its weights after each step, to check that data-
# parallel replicas stay identical (ZeRO <= 2, where every rank holds every weight).
WEIGHT_DIGEST_ENV = "LMMR1_WEIGHT_DIGEST"


class ConfigError(ValueError):
    """The stage cannot run as configured: exit 78, the operator fails the run at once."""


def _print_line(text: str) -> None:
    """One line to stdout in one write: the ranks share it, and two writes (the text, then
    the newline) from two ranks interleave into a line no one can parse."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def step_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The step records (`STEP_LOG_PREFIX` + JSON) among a trainer's output lines."""
    return [
        json.loads(line[len(STEP_LOG_PREFIX) :])
        for line in lines
        if line.startswith(STEP_LOG_PREFIX)
    ]


@contextmanager
def timed(into: dict[str, Any], key: str) -> Iterator[None]:
    """Store the seconds the block took as `into[key]` (a phase of the step log)."""
    started = time.monotonic()
    try:
        yield
    finally:
        into[key] = round(time.monotonic() - started, 3)


def total_steps(config: StageConfig, dataset_rows: int) -> int:
    per_episode = dataset_rows // config.algorithm.rollout_batch_size
    if per_episode < 1:
        raise ConfigError(
            f"algorithm.rollout_batch_size ({config.algorithm.rollout_batch_size}) is larger "
            f"than the dataset ({dataset_rows} rows)"
        )
    steps = per_episode * config.algorithm.episodes
    if config.algorithm.max_steps is not None:
        steps = min(steps, config.algorithm.max_steps)
    return steps


def node_workdir(config: StageConfig) -> Path:
    """Scratch space shared by the ranks of one node (checkpoint staging, resume download):
    DeepSpeed writes every rank's shard into one folder, uploaded by the node's local rank 0."""
    base = Path(os.environ.get(WORKDIR_ENV) or tempfile.gettempdir())
    run = config.run
    return base / f"lmmr1-{run.namespace}-{run.name}-{run.stage}"


def write_termination_message(message: dict[str, Any]) -> None:
    _write_termination_message(json.dumps(message))


class StageTrainer:
    """Wires data, rollouts, rewards, the DeepSpeed engine, weight sync and checkpoints."""

    def __init__(self, config: StageConfig) -> None:
        self.config = config
        self.algo = config.algorithm
        self.on_gpu = config.trainer.gpus_per_node > 0
        self.colocated: ColocatedRollout | None = None
        self.rollout_engine: str | None = None  # reported with the progress
        self.log_weight_digest = os.environ.get(WEIGHT_DIGEST_ENV) == "1"
        self.critic: PolicyEngine | None = None  # gae only
        self.evaluator: Evaluator | None = None  # rank 0, with stage.evaluation
        self.evaluated_step: int | None = None  # the last step this process evaluated
        self.tracker: Tracker | None = None  # rank 0, when the stage tracks experiments
        self.last_rollout: tuple[list[Any], list[Any]] = ([], [])  # rank 0: rows, samples

    # -- set-up -------------------------------------------------------------------------

    def _check_scratch(self, parameters: int, weight_bytes: int) -> None:
        """Fail now, not at the first checkpoint, when the node cannot stage one."""
        if self.local_rank != 0:
            return
        layout = Layout(
            world_size=self.world,
            ranks_on_node=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            first_node=self.rank == 0,
            zero_stage=self.algo.zero_stage,
            weight_bytes=weight_bytes,
        )
        # gae: the critic's weights and optimizer state go into the same checkpoint.
        models = 2 if self.config.critic is not None else 1
        needed = checkpoint_bytes(parameters, layout, models)
        problem = shortfall(self.workdir, needed, self.config.trainer.scratch_bytes)
        if problem:
            raise ConfigError(problem)

    def _setup(self) -> None:
        import torch

        from lmmr1_trainer.checkpoint import CheckpointStore
        from lmmr1_trainer.collectives import broadcast_object
        from lmmr1_trainer.data import ImageLoader, PromptSampler
        from lmmr1_trainer.engine import PolicyEngine, plan_batches, setup_distributed
        from lmmr1_trainer.evaluation import Ledger
        from lmmr1_trainer.experience import old_log_probs_from_update
        from lmmr1_trainer.models import ChatEncoder, load_model, resolve_model
        from lmmr1_trainer.preflight import checked_evaluation_rows, checked_rows
        from lmmr1_trainer.storage import open_storage

        if self.on_gpu and not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.gpus_per_node is {self.config.trainer.gpus_per_node} "
                "but no CUDA device is visible (use 0 for CPU)"
            )
        plan_batches(self.algo, int(os.environ.get("WORLD_SIZE", "1")))  # fail before init
        self.rank, self.local_rank, self.world = setup_distributed(
            self.on_gpu, self.config.trainer.collective_timeout_s
        )
        self.plan = plan_batches(self.algo, self.world)
        self.old_log_probs_from_update = old_log_probs_from_update(
            self.algo, self.plan.updates_per_rollout
        )
        torch.manual_seed(self.algo.seed + self.rank)
        random.seed(self.algo.seed + self.rank)
        self.store = CheckpointStore(open_storage(self.config.checkpoint.uri, self.config.s3))
        self.resume_step: int | None = broadcast_object(
            self.store.latest() if self.rank == 0 else None, self.rank
        )
        self.workdir = node_workdir(self.config)
        if self.local_rank == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)  # what a killed run left behind
            self.workdir.mkdir(parents=True)
        self._barrier()
        init_dir = resolve_model(self.config.init_from, self.config.s3)
        policy_dir = init_dir
        if self.resume_step is not None:
            policy_dir = self.workdir / "resume"
            if self.local_rank == 0 or self.world == 1:
                self.store.download(self.resume_step, policy_dir)
            self._barrier()
        self.policy_dir = policy_dir
        self.encoder = ChatEncoder.load(policy_dir)
        self.images = ImageLoader(self.config.s3)
        device = torch.device("cuda", self.local_rank) if self.on_gpu else torch.device("cpu")
        self.reference = None
        # bf16 on GPU, for the policy too: the published weights are bf16 (nothing is lost),
        # and an fp32 copy per rank would be 12 GB of host memory each for a 3B model;
        # DeepSpeed keeps the fp32 master weights in the optimizer.
        dtype = torch.bfloat16 if self.on_gpu and self.algo.bf16 else torch.float32
        if self.algo.kl_coef > 0:
            self.reference = load_model(init_dir, dtype).to(device).eval().requires_grad_(False)
        # Rank 0 checks every row, image and prompt length once, before the first rollout.
        self.rows, self.skipped_rows = (
            checked_rows(self.config, self.encoder) if self.rank == 0 else ([], 0)
        )
        # ... and every evaluation set's, as carefully: a bad one fails the stage now too.
        self.eval_sets, self.eval_skipped = (
            checked_evaluation_rows(self.config, self.encoder) if self.rank == 0 else ({}, {})
        )
        self.ledger = Ledger()  # rank 0's record of the evaluations, for the progress report
        self.total_steps: int = broadcast_object(
            total_steps(self.config, len(self.rows)) if self.rank == 0 else None, self.rank
        )
        self.sampler = PromptSampler(len(self.rows), self.algo.seed) if self.rank == 0 else None
        policy_model = load_model(policy_dir, dtype)
        self._check_scratch(sum(p.numel() for p in policy_model.parameters()), dtype.itemsize)
        self.policy = PolicyEngine(
            policy_model,
            self.algo,
            self.world,
            self.total_steps * self.plan.updates_per_rollout,
            self.on_gpu,
        )
        if self.config.critic is not None:
            self._setup_critic(init_dir, dtype)
        self.step = 0
        self.initial_reward: float | None = None
        self.last_checkpoint: str | None = None
        self.last_stats: RolloutStats | None = None
        if self.resume_step is not None:
            self._restore(policy_dir)

    def _setup_critic(self, init_dir: Path, dtype: Any) -> None:
        """The critic starts from the stage's starting weights (a resume then loads its own
        weights and optimizer from the checkpoint), with a fresh value head."""
        from lmmr1_trainer.critic import critic_settings, load_critic
        from lmmr1_trainer.engine import PolicyEngine

        assert self.config.critic is not None
        self.critic = PolicyEngine(
            load_critic(init_dir, dtype, self.algo.seed),
            critic_settings(self.algo, self.config.critic),
            self.world,
            self.total_steps * self.plan.updates_per_rollout,
            self.on_gpu,
        )

    def _barrier(self) -> None:
        from lmmr1_trainer.collectives import barrier

        barrier()

    def _restore(self, directory: Path) -> None:
        import torch

        from lmmr1_trainer.checkpoint import TRAINER_STATE_DIR
        from lmmr1_trainer.critic import CRITIC_STATE_DIR

        state_dir = directory / TRAINER_STATE_DIR
        self.policy.load_state(state_dir)
        if self.critic is not None:
            self.critic.load_state(state_dir / CRITIC_STATE_DIR)
        state = torch.load(state_dir / "state.pt", weights_only=False)
        self.step = int(state["step"])
        self.initial_reward = state.get("initial_reward")
        self.last_checkpoint = self.store.uri(self.step)
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"][self.rank % len(state["torch_rng"])])
        random.setstate(state["python_rng"])
        logger.info("resumed from %s (step %d)", self.last_checkpoint, self.step)

    def _start_colocated_engine(self) -> None:
        """Every rank: its own vLLM engine, serving the policy's starting weights."""
        from lmmr1_trainer.rollout.backends import BackendUnavailable
        from lmmr1_trainer.rollout.colocate import ColocatedRollout
        from lmmr1_trainer.rollout.vllm_backend import VllmEngine

        rollout = self.config.rollout
        try:
            engine = VllmEngine(
                self.policy_dir,
                tensor_parallel_size=rollout.tensor_parallel_size,
                gpu_memory_utilization=rollout.gpu_memory_utilization,
                cpu_kv_cache_gib=rollout.cpu_kv_cache_gib,
                max_model_len=self.algo.max_prompt_length + self.algo.max_generation_length,
                dtype="bfloat16" if self.on_gpu and self.algo.bf16 else "float32",
                seed=self.algo.seed + self.rank,
                colocated=True,
                distributed=self.world > 1,
            )
        except BackendUnavailable as err:
            raise ConfigError(str(err)) from err
        self.colocated = ColocatedRollout(engine, self.rank, self.world)
        self.rollout_engine = f"{engine.describe()}, colocate"

    def _connect(self) -> None:
        from lmmr1_trainer.progress import make_reporter
        from lmmr1_trainer.rollout.client import RewardClient, RolloutClient
        from lmmr1_trainer.weight_sync import make_weight_sync

        self.verifier = RewardClient(self.config.reward.resolved_url())
        self.reporter = make_reporter(self.config.progress)
        if self.colocated is not None:
            self.rollouts: Rollouts = self.colocated
            return
        token_file = Path(self.config.rollout.token_file)
        try:
            token = token_file.read_text().strip()
        except OSError as err:
            raise ConfigError(f"rollout.token_file: cannot read {token_file}: {err}") from err
        try:
            urls = self.config.rollout.urls
            self.client = RolloutClient(urls, token)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.client.wait_ready()
        self.rollouts = self.client
        self.rollout_engine = f"{self.config.rollout.backend}, separate ({len(urls)} servers)"
        self.weight_sync = make_weight_sync(
            self.client,
            self.config.rollout.backend,
            self.config.rollout.tensor_parallel_size,
            self.on_gpu,
            self.config.rollout.weight_sync_timeout_s,
        )

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        self._setup()
        if self.config.rollout.mode == "colocate":
            self._start_colocated_engine()
        if self.log_weight_digest and self.policy.zero_stage == 3:
            logger.warning("%s ignored: ZeRO-3 partitions the weights", WEIGHT_DIGEST_ENV)
            self.log_weight_digest = False
        if self.rank == 0:
            self._connect()
            self._start_evaluation()
            self._start_tracking()
        self._sync_weights()  # the servers serve init_from (or stale weights) until told
        if self.rank == 0:
            # Ready to train: a first report (the step it starts from) tells the operator's
            # stall watchdog that the download and the engine start are over.
            self._report(None)
        baseline_seconds = self._baseline()
        while self.step < self.total_steps:
            started = time.monotonic()
            stats, metrics = self._one_step()
            self.step += 1
            if self.log_weight_digest:
                self._log_weight_digest()
            with timed(metrics, "sync_seconds"):
                self._sync_weights()
            final = self.step == self.total_steps
            saved = final or self.step % self.config.checkpoint.every_steps == 0
            with timed(metrics, "checkpoint_seconds"):
                if saved:
                    self.last_checkpoint = self._save(final)
            if self._evaluation_due():
                with timed(metrics, "eval_seconds"):
                    self._evaluate(self.store.uri(self.step) if saved else None)
            if baseline_seconds is not None:
                metrics["baseline_eval_seconds"] = round(baseline_seconds, 3)
                baseline_seconds = None
            if self.rank == 0 and stats is not None:
                metrics["seconds"] = round(time.monotonic() - started, 3)
                # Tracked before the step is logged: once its line is out, so is the step's
                # tracking (and at a checkpoint its files), even if the pod dies right after.
                self._track(metrics, saved)
                _print_line(STEP_LOG_PREFIX + json.dumps(metrics))
                self._report(stats)
        if self.config.evaluation is not None and self.evaluated_step != self.total_steps:
            # A stage restarted after its final checkpoint: its final evaluation (read back
            # if the attempt that died had written it).
            self._evaluate(self.store.uri(self.total_steps))
        if self.rank == 0:
            if self.tracker is not None:
                self.tracker.close()
            final_uri = self.store.uri(self.total_steps)
            self.last_checkpoint = final_uri
            self._report(self.last_stats, final=final_uri)
            write_termination_message({"final_checkpoint": final_uri, "step": self.total_steps})
        self._barrier()
        if self.local_rank == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return 0

    # -- evaluation (`lmmr1_trainer.evaluation`) ---------------------------------------------

    def _start_evaluation(self) -> None:
        """Rank 0: the runner, and the results an earlier attempt stored up to this step."""
        from lmmr1_trainer.evaluation import Evaluator, stored, stored_steps

        evaluation = self.config.evaluation
        if evaluation is None or self.rank != 0:
            return
        self.evaluator = Evaluator(
            evaluation,
            self.eval_sets,
            self.eval_skipped,
            self.rollouts,
            self.verifier,
            self.encoder,
            self.images,
            self.config.reward,
            self.store.storage,
            max_tokens=self.algo.max_generation_length,
            seed=self.algo.seed,
        )
        for step in stored_steps(self.store.storage):
            if step <= self.step:
                self.ledger.record(stored(self.store.storage, step) or {}, self.total_steps)

    def _evaluation_due(self) -> bool:
        from lmmr1_trainer.evaluation import due

        evaluation = self.config.evaluation
        return evaluation is not None and due(self.step, self.total_steps, evaluation.every_steps)

    def _baseline(self) -> float | None:
        """Every rank, before this attempt's first step: the evaluation of the weights it
        starts from; the seconds it took. At step 0 the baseline; resumed from a checkpoint
        whose evaluation was due, that evaluation, since the attempt that committed the
        checkpoint may have died before measuring it (read back when it did not)."""
        evaluation = self.config.evaluation
        if evaluation is None:
            return None
        if self.step == 0 and evaluation.before_training:
            weights = self.config.init_from
        elif 0 < self.step < self.total_steps and self._evaluation_due():
            weights = self.store.uri(self.step)  # the checkpoint this attempt resumed from
        else:  # nothing due (the final step's evaluation follows the loop)
            return None
        started = time.monotonic()
        self._evaluate(weights)
        if self.rank == 0:
            self._report(None)
        return time.monotonic() - started

    def _evaluate(self, checkpoint: str | None) -> dict[str, EvaluationResult] | None:
        """Every rank: evaluate the current weights as step `self.step`, unless an earlier
        attempt stored that step's result (then rank 0 reads it back). The other ranks
        generate their share (colocate) in the one `generate` call an evaluation makes."""
        from lmmr1_trainer.collectives import broadcast_object
        from lmmr1_trainer.evaluation import stored, tracker_metrics

        results = None
        if self.rank == 0:
            results = stored(self.store.storage, self.step)
        measure: bool = broadcast_object(results is None if self.rank == 0 else None, self.rank)
        if measure and self.rank == 0 and self.evaluator is not None:
            weights = checkpoint or f"{self.config.checkpoint.uri} (policy after step {self.step})"
            results, _ = self.evaluator.evaluate(self.step, weights, checkpoint)
            if self.tracker is not None:  # measured now (a result read back was tracked then)
                self.tracker.log_evaluation(self.step, tracker_metrics(results))
        elif measure and self.colocated is not None:
            self.colocated.follow_step()
        if self.rank == 0 and results is not None:
            self.ledger.record(results, self.total_steps)
        self.evaluated_step = self.step
        return results

    def _one_step(self) -> tuple[RolloutStats | None, dict[str, Any]]:
        import torch

        from lmmr1_trainer.algorithms import kl_loss, policy_loss
        from lmmr1_trainer.collectives import all_reduce_sum, scatter_objects
        from lmmr1_trainer.critic import critic_update
        from lmmr1_trainer.experience import (
            collect_rollout,
            mean_kl,
            prepare_micro_batches,
            whiten_across_ranks,
        )
        from lmmr1_trainer.models import response_log_probs

        samples = stats = None
        rows: list[int] = []
        if self.rank == 0 and self.sampler is not None:
            rows = self.sampler.next_batch(self.algo.rollout_batch_size)
            batch = [self.rows[i] for i in rows]
            samples, stats = collect_rollout(
                batch,
                self.rollouts,
                self.verifier,
                self.encoder,
                self.images,
                self.algo,
                self.config.reward,
                seed=self.algo.seed * 100_003 + self.step,
            )
            if self.initial_reward is None:
                self.initial_reward = stats.reward
            if self.tracker is not None:  # for the samples table
                self.last_rollout = (batch, samples)
        elif self.colocated is not None:
            self.colocated.follow_step()
        if self.colocated is not None:
            self.colocated.sleep()  # the GPU is the policy's until the next generation
        mine = scatter_objects(samples, self.rank)
        engine = self.policy.engine
        metrics: dict[str, Any] = {"step": self.step + 1, "total_steps": self.total_steps}
        losses, clips, value_losses, zero_value_losses = [], [], [], []
        # The policy's entropy, estimated from the log-probs the update computes anyway:
        # the mean of -log p over the sampled response tokens (sampled from the policy).
        entropy_sum = response_tokens = 0.0
        with timed(metrics, "update_seconds"):  # old/ref log-probs, then every optimizer update
            micro_batches = prepare_micro_batches(
                mine,
                engine,
                self.reference,
                self.encoder,
                self.algo,
                skip_old_log_probs=self.old_log_probs_from_update,
                critic=self.critic.engine if self.critic is not None else None,
                critic_config=self.config.critic,
            )
            if self.algo.advantage_estimator != "grpo":
                whiten_across_ranks(micro_batches, engine.device)
            order = torch.Generator().manual_seed(self.algo.seed + self.step)
            engine.train()
            if self.critic is not None:
                self.critic.engine.train()
            for _ in range(self.algo.epochs_per_rollout):
                for index in torch.randperm(len(micro_batches), generator=order).tolist():
                    mb = micro_batches[index]
                    mask = mb.batch.response_mask.to(engine.device)
                    log_probs = response_log_probs(engine, mb.batch, self.algo.temperature)
                    loss, clip = policy_loss(
                        log_probs,
                        mb.old_or(log_probs),
                        mb.advantages.to(engine.device),
                        mask,
                        self.algo.clip_range,
                    )
                    if not self.algo.kl_in_reward and mb.ref_log_probs is not None:
                        ref = mb.ref_log_probs.to(engine.device)
                        loss = loss + self.algo.kl_coef * kl_loss(
                            log_probs, ref, mask, self.algo.kl_estimator
                        )
                    self.policy.backward_and_step(loss)
                    losses.append(float(loss.detach()))
                    clips.append(float(clip))
                    entropy_sum -= float((log_probs.detach() * mask).sum())
                    response_tokens += float(mask.sum())
                    if self.critic is not None and self.config.critic is not None:
                        value, zero = critic_update(self.critic, mb, self.config.critic)
                        value_losses.append(value)
                        zero_value_losses.append(zero)
        if stats is not None:
            metrics.update(
                reward=stats.reward,
                accuracy=stats.accuracy,
                format_reward=stats.format_reward,
                response_length=stats.response_length,
                rollout_seconds=round(stats.seconds, 3),
                generate_seconds=round(stats.generate_seconds, 3),
                reward_seconds=round(stats.reward_seconds, 3),
                weight_version=stats.weight_version,
                rows=rows,  # dataset rows of this step's prompts: the data order
            )
        # The whole rollout batch's means, not rank 0's share: every rank's micro-batches.
        kls = [mean_kl([mb]) for mb in micro_batches]
        sums = [sum(losses), len(losses), sum(clips), sum(kls), len(kls)]
        sums += [sum(value_losses), sum(zero_value_losses), entropy_sum, response_tokens]
        totals = torch.tensor(sums, dtype=torch.float64)
        loss_sum, updates, clip_sum, kl_sum, batches, value_sum, zero_sum, ent_sum, tokens = (
            all_reduce_sum(totals, engine.device).tolist()
        )
        metrics.update(
            policy_loss=loss_sum / max(1.0, updates),
            clip_fraction=clip_sum / max(1.0, updates),
            kl=kl_sum / max(1.0, batches),
            entropy=ent_sum / max(1.0, tokens),
            lr=self.policy.learning_rate(),
        )
        if self.critic is not None:
            metrics.update(
                value_loss=value_sum / max(1.0, updates),
                zero_value_loss=zero_sum / max(1.0, updates),
                critic_lr=self.critic.learning_rate(),
            )
        return stats, metrics

    def _start_tracking(self) -> None:
        from lmmr1_trainer.tracking import Tracker, TrackingConfigError

        try:
            self.tracker = Tracker.create(self.config, self.workdir)
        except TrackingConfigError as err:
            raise ConfigError(str(err)) from err

    def _track(self, metrics: dict[str, Any], saved: bool) -> None:
        """Rank 0: the step's record (and now and then a table of its samples) to the
        trackers; at a checkpoint, their local files to storage."""
        from lmmr1_trainer.tracking import rollout_samples

        if self.tracker is None:
            return
        self.tracker.log_step(self.step, metrics)
        if self.tracker.samples_due(self.step):
            rows, samples = self.last_rollout
            limit = self.config.tracking.samples_per_table
            self.tracker.log_samples(self.step, rollout_samples(self.encoder, rows, samples, limit))
        if saved:
            self.tracker.checkpoint()

    def _log_weight_digest(self) -> None:
        """Every rank logs a digest of its full weights (replicas must agree; ZeRO <= 2)."""
        from lmmr1_trainer.engine import weight_digest

        record = {"rank": self.rank, "step": self.step, "sha256": weight_digest(self.policy.module)}
        _print_line(WEIGHTS_LOG_PREFIX + json.dumps(record))

    def _sync_weights(self) -> None:
        if self.colocated is not None:
            self.colocated.push(self.policy.named_weights(), version=self.step)
            return
        state_dict = self.policy.full_state_dict(self.rank)
        if self.rank == 0 and state_dict is not None:
            self.weight_sync.push(state_dict, version=self.step)

    def _report(self, stats: RolloutStats | None, final: str | None = None) -> None:
        from lmmr1_trainer.progress import now

        self.last_stats = stats or self.last_stats
        stats = self.last_stats
        self.reporter.report(
            Progress(
                stage=self.config.run.stage,
                step=self.step,
                total_steps=self.total_steps,
                reward=stats.reward if stats else None,
                accuracy=stats.accuracy if stats else None,
                initial_reward=self.initial_reward,
                tokens_per_second=stats.generated_tokens / stats.seconds if stats else None,
                rollout_engine=self.rollout_engine,
                last_checkpoint=self.last_checkpoint,
                final_checkpoint=final,
                skipped_rows=self.skipped_rows or None,
                evaluation=self.ledger.report(),
                updated_at=now(),
            )
        )

    # -- checkpoints --------------------------------------------------------------------

    def _save(self, final: bool) -> str:
        import torch

        from lmmr1_trainer.checkpoint import TRAINER_STATE_DIR, FileEntry
        from lmmr1_trainer.collectives import all_gather_objects
        from lmmr1_trainer.critic import CRITIC_STATE_DIR

        local = self.workdir / f"save-{self.step}"
        state_dir = local / TRAINER_STATE_DIR
        state_dict = self.policy.full_state_dict(self.rank)
        if self.rank == 0 and state_dict is not None:
            self.policy.module.save_pretrained(local, state_dict=state_dict)
            owner = self.encoder.processor or self.encoder.tokenizer
            owner.save_pretrained(local)
        self.policy.save_state(state_dir)
        if self.critic is not None:  # weights + optimizer, committed with the same manifest
            self.critic.save_state(state_dir / CRITIC_STATE_DIR)
        rngs = all_gather_objects(torch.get_rng_state())
        if self.rank == 0:
            state = {
                "step": self.step,
                "sampler": self.sampler.state_dict() if self.sampler else None,
                "initial_reward": self.initial_reward,
                "torch_rng": rngs,
                "python_rng": random.getstate(),
            }
            torch.save(state, state_dir / "state.pt")
        self._barrier()
        entries: list[FileEntry] = []
        if self.local_rank == 0:
            entries = self.store.upload(self.step, local)
        gathered = all_gather_objects(entries)
        uri = self.store.uri(self.step)
        if self.rank == 0:
            unique = {e.path: e for part in gathered for e in part}
            uri = self.store.commit(self.step, list(unique.values()), final=final)
            protected = {self.step} | ({self.resume_step} if self.resume_step else set())
            removed = self.store.prune(self.config.checkpoint.keep_last, protected)
            logger.info("checkpoint %s committed; removed steps %s", uri, removed)
        self._barrier()
        if self.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
        return uri


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmmr1_trainer.train")
    parser.add_argument("--config", type=Path, default=CONFIG_PATH)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    threads = os.environ.get(THREADS_ENV)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from lmmr1_trainer.data import DatasetError
    from lmmr1_trainer.deadline import AttemptFailed
    from lmmr1_trainer.engine import EngineConfigError
    from lmmr1_trainer.models import ModelSourceError

    try:
        config = StageConfig.load(args.config)
        return StageTrainer(config).run()
    except (OSError, ValidationError) as err:
        if isinstance(err, OSError) and not Path(args.config).exists():
            return config_error(f"stage config: {err}")
        if isinstance(err, ValidationError):
            return config_error(f"stage config {args.config}: {err}")
        raise
    except (ConfigError, DatasetError, EngineConfigError, ModelSourceError) as err:
        return config_error(f"stage config: {err}")
    except AttemptFailed as err:
        # Another attempt may succeed: exit 1 with the reason where the operator reads it.
        # Exit at once: the thread that missed its deadline may be stuck for good (in NCCL,
        # say), and the interpreter's shutdown would wait for it or its CUDA teardown.
        logger.error("this attempt fails: %s", err)
        _write_termination_message(str(err))
        exit_now(1)


def exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, once everything this process owes is out:
    its checkpoints committed, its trackers closed, its report and termination message
    written. The teardown only frees memory, and can hang: the colocated vLLM engine's
    shutdown (which also collects every object: 6 s of a 40 s tiny stage on CPU), NCCL
    communicators, or a thread stuck in a collective."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
