"""python -m lmmr1_bench.verifier [--samples 512] [--workers 2] [--repeat 3]

Rewards per second for one mixed batch of unique samples, measured four ways in one run:
math-verify called directly in this process (the baseline: the LMM-R1 reference's per-sample
work), our Verifier inline (no pool), the pool with one worker, and the pool with `--workers`
workers. Prints a markdown section with the machine and the command; docs/benchmarks.md
holds one run.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata

from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify

from lmmr1_trainer.machine import cpu_model, load_average
from lmmr1_trainer.verifier.config import PoolSettings, VerifierConfig
from lmmr1_trainer.verifier.engine import Sample, Verifier


def _well_formed(answer: str) -> str:
    return f"<think>Let me work this out step by step.</think><answer>{answer}</answer>"


def _kinds(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """(response, label) pairs of one kind each, parameterised by n so all are unique."""
    a, b = n + 2, rng.randint(2, 9)
    return [
        (_well_formed(rf"\boxed{{{a * b}}}"), str(a * b)),  # right integer
        (_well_formed(rf"\boxed{{{a * b + 1}}}"), str(a * b)),  # wrong integer
        (_well_formed(rf"\boxed{{\frac{{{a}}}{{{2 * a}}}}}"), "0.5"),  # fraction vs decimal
        (_well_formed(rf"\boxed{{[{a}, {a + b})}}"), f"[{a},{a + b})"),  # interval
        (_well_formed(rf"\boxed{{\{{{a}, {b}\}}}}"), rf"\{{{b}, {a}\}}"),  # set
        (_well_formed(rf"\boxed{{(x+{a})^2}}"), f"x^2+{2 * a}x+{a * a}"),  # algebra
        (_well_formed(rf"\boxed{{{a}\%}}"), f"{a / 100}"),  # percentage
        (_well_formed(rf"\boxed{{{a}\sqrt{{2}}}}"), rf"\sqrt{{{2 * a * a}}}"),  # surd
        (_well_formed("ABCD"[n % 4]), "ABCD"[(n + n // 4) % 4]),  # multiple choice
        (f"The final answer is ${a - b}$.", str(a - b)),  # no format, anchored answer
        (_well_formed(rf"\boxed{{-\frac{{{b}}}{{{a}}}}}"), rf"-{b}/{a}"),  # negative fraction
        (_well_formed("I am not sure."), str(a)),  # no answer at all
    ]


def mixed_batch(size: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    n = 0
    while len(pairs) < size:
        pairs.extend(_kinds(rng, n))
        n += 1
    return pairs[:size]


_REFERENCE_ANSWER = [
    LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
]


def reference_accuracy(response: str, label: str) -> float:
    """The LMM-R1 reference's math-verify calls for one sample, in this process (including
    its argument order, verify(answer, gold))."""
    if not label.startswith("$"):
        label = f"${label}$"
    gold = parse(label, extraction_mode="first_match", extraction_config=[LatexExtractionConfig()])
    if not gold:
        return 1.0
    answer = parse(response, extraction_config=_REFERENCE_ANSWER, extraction_mode="first_match")
    return float(verify(answer, gold))


def _best_rate(run: Callable[[], object], count: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return count / min(times)


def _verifier(workers: int) -> Verifier:
    return Verifier(VerifierConfig(pool=PoolSettings(workers=workers)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmmr1_bench.verifier")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    pairs = mixed_batch(args.samples)
    samples = [Sample(response, label) for response, label in pairs]
    count = len(pairs)

    def baseline() -> None:
        for response, label in pairs:
            reference_accuracy(response, label)

    baseline()  # warm up math-verify's grammar and caches, as the workers do
    rates: list[tuple[str, float]] = [
        ("math-verify directly, one process (baseline)", _best_rate(baseline, count, args.repeat))
    ]
    for label, workers in (
        ("Verifier inline, no pool", 0),
        ("Verifier, pool of 1 worker", 1),
        (f"Verifier, pool of {args.workers} workers", args.workers),
    ):
        with _verifier(workers) as verifier:
            verifier.score(samples[:32])  # warm-up
            score = functools.partial(verifier.score, samples)
            rates.append((label, _best_rate(score, count, args.repeat)))

    base = rates[0][1]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = load_average()
    command = "python -m lmmr1_bench.verifier " + " ".join(
        [f"--samples {args.samples}", f"--workers {args.workers}", f"--repeat {args.repeat}"]
    )
    with _verifier(0) as inline:
        correct = sum(r.accuracy_score for r in inline.score(samples))
    print("## Verifier throughput\n")
    print(f"Command: `{command}`\n")
    print(
        f"Machine: {cpu_model()}, {os.cpu_count()} cores ({usable} usable), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"math-verify {metadata.version('math-verify')}, load average {load} at the end.\n"
    )
    print(
        f"Batch: {count} unique samples of 12 kinds (integers right and wrong, fraction vs "
        "decimal, interval, set, polynomial, percentage, surd, multiple choice, unformatted, "
        f"negative fraction, no answer; {correct:.0f} correct); best of {args.repeat} runs.\n"
    )
    print("| mode | rewards/s | vs baseline |")
    print("|---|---:|---:|")
    for label, rate in rates:
        print(f"| {label} | {rate:,.0f} | {rate / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
