"""The dataset's pre-flight check: every row is read, every image opened and every prompt
measured once, before the stage's first rollout, so that a bad row fails the stage in
minutes instead of crashing it hours in (and again on every resume, at the same row).

A row is bad when it cannot be parsed (not JSON, a `message` string that is not a JSON chat
list, no label), when one of its images is missing or does not decode, when the model is
text-only and the row has images, or when its prompt (chat template, image placeholders
expanded as the processor expands them) is longer than `algorithm.max_prompt_length`.
`dataset.on_bad_row: fail` (the default) raises `DatasetError` naming up to
`MAX_EXAMPLES` rows (file:line, field, reason) and the count, which the trainer turns into
exit 78 (the operator fails the run at once with the message); `skip` keeps the good rows
and reports how many were left out.

Cost: the file is read once (`data.read_rows`); each distinct image is read and decoded
once, by a bounded thread pool (decoding releases the GIL); prompts are tokenized in
batches, and an image's token count comes from its size, not from running the processor.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmmr1_trainer.config import StageConfig
from lmmr1_trainer.data import (
    DatasetError,
    ImageLoader,
    ImageMissing,
    PromptRow,
    RowProblem,
    decode_images,
    image_refs,
    read_rows,
)

if TYPE_CHECKING:
    from lmmr1_trainer.models import ChatEncoder

logger = logging.getLogger("lmmr1_trainer.preflight")
MAX_EXAMPLES = 10  # rows named in a report; the kubelet keeps 4 KiB of termination message
MAX_REASON_CHARS = 300
IMAGE_THREADS = 16
TOKENIZE_BATCH = 256

ImageSize = tuple[int, int]  # (height, width), as the processor counts image tokens


@dataclass(frozen=True)
class PreflightReport:
    rows: list[PromptRow]  # the good rows, re-indexed from 0
    problems: list[RowProblem]  # one per bad row, in file order
    images: int  # distinct images opened

    @property
    def checked(self) -> int:
        return len(self.rows) + len(self.problems)

    def summary(self, max_examples: int = MAX_EXAMPLES) -> str:
        """`N of M rows are bad`, then at most `max_examples` of them, one per line."""
        lines = [f"{len(self.problems)} of {self.checked} dataset rows are bad:"]
        for problem in self.problems[:max_examples]:
            text = str(problem)
            cut = text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
            lines.append(f"  {cut}")
        if len(self.problems) > max_examples:
            lines.append(f"  … and {len(self.problems) - max_examples} more")
        return "\n".join(lines)


def inspect_image(loader: ImageLoader, ref: str) -> ImageSize:
    """Read and fully decode one image; its (height, width). Raises on any failure."""
    from PIL import Image

    data = loader.read(ref)
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # structure and checksums (PNG CRCs) without decoding
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # a truncated or corrupt body fails only when decoded
        return image.height, image.width


def _bounded_map(
    pool: ThreadPoolExecutor, work: Any, items: Iterable[str], window: int
) -> Iterator[tuple[str, Future[ImageSize]]]:
    """(item, future) in order, with at most `window` submitted and not yet consumed: a
    million images never become a million pending futures."""
    pending: deque[tuple[str, Future[ImageSize]]] = deque()
    for item in items:
        pending.append((item, pool.submit(work, item)))
        if len(pending) >= window:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def check_images(
    rows: list[PromptRow], loader: ImageLoader, threads: int = IMAGE_THREADS
) -> tuple[dict[str, ImageSize], dict[str, str]]:
    """Every distinct image of `rows`, opened once: sizes of the good, reasons for the bad."""
    refs = list(dict.fromkeys(ref for row in rows for ref in image_refs(row.messages)))
    sizes: dict[str, ImageSize] = {}
    failures: dict[str, str] = {}
    if not refs:
        return sizes, failures
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="preflight") as pool:
        for ref, future in _bounded_map(
            pool, lambda r: inspect_image(loader, r), refs, threads * 4
        ):
            try:
                sizes[ref] = future.result()
            except ImageMissing:
                failures[ref] = "no such file"
            except Exception as err:  # any reader or decoder error makes the row bad
                failures[ref] = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return sizes, failures


def _image_tokens(encoder: ChatEncoder, sizes: list[ImageSize]) -> list[int] | None:
    """Placeholder tokens the processor expands each image into, from the sizes alone; None
    where the processor cannot tell (then the row is encoded in full)."""
    count = getattr(encoder.processor, "_get_num_multimodal_tokens", None)
    if count is None:
        return None
    found = count(image_sizes=[list(s) for s in sizes])
    tokens = getattr(found, "num_image_tokens", None)
    return [int(t) for t in tokens] if tokens is not None else None


def prompt_lengths(
    rows: list[PromptRow],
    encoder: ChatEncoder,
    sizes: dict[str, ImageSize],
    loader: ImageLoader,
) -> list[int]:
    """Each row's prompt length in tokens, as `ChatEncoder.encode` would make it: the chat
    template's text, each image placeholder expanded to the image's tokens."""
    lengths: list[int] = []
    for start in range(0, len(rows), TOKENIZE_BATCH):
        batch = rows[start : start + TOKENIZE_BATCH]
        texts = [encoder.prompt_text(row.messages) for row in batch]
        ids = encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for row, token_ids in zip(batch, ids, strict=True):
            refs = image_refs(row.messages)
            if not refs:
                lengths.append(len(token_ids))
                continue
            expanded = _image_tokens(encoder, [sizes[r] for r in refs])
            placeholders = sum(1 for t in token_ids if t == encoder.image_token_id)
            if expanded is None or placeholders != len(refs):
                encoded = encoder.encode(row.messages, decode_images(row.messages, loader))
                lengths.append(int(encoded["input_ids"].shape[-1]))
            else:
                lengths.append(len(token_ids) - placeholders + sum(expanded))
    return lengths


def check_rows(
    rows: list[PromptRow],
    problems: list[RowProblem],
    encoder: ChatEncoder,
    loader: ImageLoader,
    max_prompt_length: int,
    threads: int = IMAGE_THREADS,
) -> PreflightReport:
    """Images and prompt lengths of the parsed `rows`; `problems` are the unparsed ones."""
    sizes, failures = check_images(rows, loader, threads)
    bad: dict[str, RowProblem] = {p.where: p for p in problems}
    measurable: list[PromptRow] = []
    for row in rows:
        refs = image_refs(row.messages)
        broken = next((r for r in refs if r in failures), None)
        if broken is not None:
            bad[row.where] = RowProblem(row.where, "image", f"{failures[broken]}: {broken}")
        elif refs and encoder.processor is None:
            bad[row.where] = RowProblem(row.where, "image", "the model is text-only")
        else:
            measurable.append(row)
    for row, length in zip(
        measurable, prompt_lengths(measurable, encoder, sizes, loader), strict=True
    ):
        if length > max_prompt_length:
            bad[row.where] = RowProblem(
                row.where,
                "message",
                f"prompt of {length} tokens > algorithm.max_prompt_length ({max_prompt_length})",
            )
    good = [row for row in rows if row.where not in bad]
    return PreflightReport(
        [dataclasses.replace(row, index=i) for i, row in enumerate(good)],
        sorted(bad.values(), key=_file_order),
        len(sizes) + len(failures),
    )


def _file_order(problem: RowProblem) -> tuple[str, int]:
    """Files in the order they are read (sorted by name), then by line."""
    name, _, line = problem.where.rpartition(":")
    return name, int(line) if line.isdigit() else 0


def checked_rows(
    config: StageConfig, encoder: ChatEncoder, threads: int = IMAGE_THREADS
) -> tuple[list[PromptRow], int]:
    """The stage's rows once every one passed (or, with `dataset.on_bad_row: skip`, the rows
    that passed) and how many were skipped. Raises `DatasetError` (exit 78) naming the bad
    rows in `fail` mode, or when no row is left."""
    dataset = config.dataset
    rows, problems = read_rows(dataset, config.s3)
    # A loader of its own, without a cache: the trainer's keeps what it reads for rollouts.
    loader = ImageLoader(config.s3, cache_size=0)
    report = check_rows(
        rows, problems, encoder, loader, config.algorithm.max_prompt_length, threads
    )
    logger.info(
        "dataset pre-flight: %d rows, %d images checked, %d bad",
        report.checked,
        report.images,
        len(report.problems),
    )
    if report.problems and dataset.on_bad_row == "fail":
        raise DatasetError(
            f"{report.summary()}\nfix the rows, or set dataset.onBadRow: skip to train without them"
        )
    if report.problems:
        logger.warning("skipping bad rows (dataset.onBadRow: skip): %s", report.summary())
    if not report.rows:
        raise DatasetError(f"{dataset.uri}: no row is left to train on\n{report.summary()}")
    return report.rows, len(report.problems)


def checked_evaluation_rows(
    config: StageConfig, encoder: ChatEncoder, threads: int = IMAGE_THREADS
) -> tuple[dict[str, list[PromptRow]], dict[str, int]]:
    """Every evaluation set's rows, checked as the training data's are, and how many each
    skipped. A set that cannot be read (missing, empty, unreachable) fails the stage whatever
    its `on_bad_row`: an evaluation that silently measures nothing would report no gain. Bad
    rows follow the set's own `on_bad_row`. Raises `DatasetError` (exit 78) naming the set."""
    from lmmr1_trainer.storage import StorageError

    sets: dict[str, list[PromptRow]] = {}
    skipped: dict[str, int] = {}
    if config.evaluation is None:
        return sets, skipped
    loader = ImageLoader(config.s3, cache_size=0)
    for dataset in config.evaluation.datasets:
        what = f"evaluation dataset {dataset.name!r} ({dataset.uri})"
        try:
            rows, problems = read_rows(dataset, config.s3)
        except (DatasetError, StorageError, OSError, UnicodeDecodeError) as err:
            raise DatasetError(f"{what} cannot be read: {err}") from err
        report = check_rows(
            rows, problems, encoder, loader, config.algorithm.max_prompt_length, threads
        )
        logger.info(
            "%s pre-flight: %d rows, %d images checked, %d bad",
            what,
            report.checked,
            report.images,
            len(report.problems),
        )
        if report.problems and dataset.on_bad_row == "fail":
            raise DatasetError(
                f"{what}: {report.summary()}\nfix the rows, or set onBadRow: skip on "
                f"evaluation dataset {dataset.name!r} to evaluate without them"
            )
        if not report.rows:
            raise DatasetError(f"{what}: no row is left to evaluate on\n{report.summary()}")
        if report.problems:
            logger.warning("%s: skipping bad rows: %s", what, report.summary())
        sets[dataset.name] = report.rows
        skipped[dataset.name] = len(report.problems)
    return sets, skipped
