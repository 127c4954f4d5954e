"""Models through transformers: where the weights come from, how prompts are encoded, and
per-token log-probs of responses.

Two kinds of model: Qwen2.5-VL (images + text, `AutoModelForImageTextToText`, encoded by its
processor) and text-only causal LMs (`AutoModelForCausalLM`, encoded by the tokenizer's
chat template). Sources: `hf://org/name[@revision]` (huggingface_hub, real clusters only),
`s3://bucket/prefix` (downloaded), `pvc://claim/path`, `file://` or a local path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor

from lmmr1_trainer.algorithms import token_log_probs
from lmmr1_trainer.config import S3Settings
from lmmr1_trainer.data import ChatMessage
from lmmr1_trainer.filelock import exclusive
from lmmr1_trainer.storage import (
    ObjectInfo,
    Storage,
    download_objects,
    list_tree,
    local_path,
    open_storage,
)

MODEL_CACHE_ENV = "LMMR1_MODEL_CACHE"
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


class ModelSourceError(RuntimeError):
    """A model URI that cannot be resolved or loaded."""


def _cache_root() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV, Path.home() / ".cache" / "lmmr1" / "models"))


def resolve_model(uri: str, settings: S3Settings | None = None) -> Path:
    """A local directory holding the HF model files of `uri` (downloading when needed)."""
    parts = urlsplit(uri)
    if parts.scheme == "hf":
        from huggingface_hub import snapshot_download

        repo, _, revision = (parts.netloc + parts.path).partition("@")
        target = _cache_root() / "hf" / repo.replace("/", "--") / (revision or "main")
        with exclusive(target.parent / ".lock", f"downloading {uri}"):
            snapshot_download(repo_id=repo, revision=revision or None, local_dir=str(target))
        return target
    if parts.scheme == "s3":
        return _cached_s3_model(uri, settings)
    path = local_path(uri)
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{uri}: no config.json in {path}")
    return path


def _cached_s3_model(uri: str, settings: S3Settings | None) -> Path:
    """The model under `uri`, downloaded once per *content*: the cache folder is named after
    the URI and a digest of the object listing (keys, sizes, ETags), so a model re-uploaded
    to the same URI is downloaded again instead of served stale from a node's cache. Each
    download goes to a private folder renamed into place, so a trainer and a rollout server
    sharing a node's cache never read a half-written copy, and the ranks of a pod download
    it once (a file lock: the others wait for the first)."""
    storage = open_storage(uri, settings)
    # A checkpoint is an HF model directory plus trainer state the policy never needs.
    objects = list_tree(storage, "", exclude=("trainer_state/",))
    if not objects:
        raise ModelSourceError(f"{uri}: no objects under this prefix")
    listing = "\n".join(f"{o.key}\t{o.size}\t{o.version}" for o in objects)
    home = _cache_root() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = home / hashlib.sha256(listing.encode()).hexdigest()[:16]
    if target.is_dir():
        return target
    # One download per pod: the other ranks wait, then find the finished copy.
    with exclusive(home.parent / f".{home.name}.lock", f"downloading {uri}"):
        return _download_model(storage, objects, home, target)


def _download_model(storage: Storage, objects: list[ObjectInfo], home: Path, target: Path) -> Path:
    if target.is_dir():  # another rank of this pod downloaded it while this one waited
        return target
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=home))
    try:
        download_objects(storage, objects, "", staging)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():  # not another process that got there first: a real error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for older in home.iterdir():  # earlier contents of the same URI (or an older layout)
        if older.is_file():
            older.unlink(missing_ok=True)
        elif older != target and not older.name.startswith(".download-"):
            shutil.rmtree(older, ignore_errors=True)
    return target


def is_multimodal(model_dir: Path) -> bool:
    config = json.loads((model_dir / "config.json").read_text())
    return "vision_config" in config


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The model in `dtype`: bf16 for a GPU trainer's policy and reference (fp32 master
    weights are the optimizer's), fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if is_multimodal(model_dir) else AutoModelForCausalLM
    return auto.from_pretrained(str(model_dir), dtype=dtype)


def checkpoint_names(model: Any) -> dict[str, str]:
    """Each parameter's name as the model's checkpoint files spell it (what `save_pretrained`
    writes), by its name in the loaded model. transformers 5 renames some on load: for
    Qwen2.5-VL, `visual.*` becomes `model.visual.*` and the language model's `model.*`
    becomes `model.language_model.*`; OpenRLHF and LMM-R1 (older transformers) use the
    checkpoint's names. A name transformers cannot map back stays as it is."""
    from transformers.core_model_loading import revert_weight_conversion

    names = {}
    for name, _ in model.named_parameters():
        try:
            saved = list(revert_weight_conversion(model, {name: torch.empty(0)}))
        except Exception:  # a converter that needs real tensors (fused experts): keep the name
            saved = []
        names[name] = saved[0] if len(saved) == 1 else name
    return names


def _has_prefix(name: str, prefix: str) -> bool:
    """Whole dotted components: `model.layers.1` holds `model.layers.1.mlp…`, not `…10…`."""
    return name == prefix or name.startswith(prefix + ".")


def _name_prefixes(names: list[str], limit: int = 12) -> list[str]:
    """The first two components of `names`, in order, at most `limit` of them."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(".".join(name.split(".")[:2]), None)
    return list(seen)[:limit]


def freeze(model: Any, prefixes: list[str]) -> list[str]:
    """Set requires_grad False on every parameter whose name, in the model or in its
    checkpoint files (`checkpoint_names`), starts with one of `prefixes`; the names (in the
    model) of the parameters frozen. Raises ValueError for a prefix that matches nothing,
    naming the prefixes the model has, and when nothing would be left to train."""
    if not prefixes:
        return []
    saved = checkpoint_names(model)
    frozen: list[str] = []
    for prefix in prefixes:
        matched = [n for n, s in saved.items() if _has_prefix(n, prefix) or _has_prefix(s, prefix)]
        if not matched:
            raise ValueError(
                f"{prefix!r} matches no parameter of the model; its parameter names start with "
                f"{', '.join(_name_prefixes(list(saved.values())))} (as in its checkpoint) or "
                f"{', '.join(_name_prefixes(list(saved)))} (transformers' names)"
            )
        frozen.extend(n for n in matched if n not in frozen)
    if len(frozen) == len(saved):
        raise ValueError(f"{prefixes} freezes every parameter: nothing would be trained")
    parameters = dict(model.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
    return frozen


@dataclass
class ChatEncoder:
    """Turns a chat (with PIL images) into model inputs, for either kind of model."""

    tokenizer: Any
    processor: Any | None  # None for text-only models
    image_token_id: int | None

    @classmethod
    def load(cls, model_dir: Path) -> ChatEncoder:
        from transformers import AutoProcessor, AutoTokenizer

        if is_multimodal(model_dir):
            processor = AutoProcessor.from_pretrained(str(model_dir))  # type: ignore[no-untyped-call]
            tokenizer = processor.tokenizer
            image_token_id = int(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
            return cls(tokenizer, processor, image_token_id)
        return cls(AutoTokenizer.from_pretrained(str(model_dir)), None, None)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = {int(self.tokenizer.eos_token_id)}
        if self.tokenizer.pad_token_id is not None:
            ids.add(int(self.tokenizer.pad_token_id))
        return sorted(ids)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @property
    def vision_token_ids(self) -> list[int]:
        """Placeholders a response must never contain (the model would expect image features)."""
        if self.processor is None:
            return []
        return [int(self.tokenizer.convert_tokens_to_ids(t)) for t in VISION_TOKENS]

    def prompt_text(self, messages: list[ChatMessage]) -> str:
        owner = self.processor if self.processor is not None else self.tokenizer
        text: str = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    def encode(self, messages: list[ChatMessage], images: list[Any]) -> dict[str, Tensor]:
        """input_ids (1, P) plus, with images, pixel_values and image_grid_thw."""
        text = self.prompt_text(messages)
        if self.processor is None:
            if images:
                raise ValueError("a text-only model got a prompt with images")
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
            return {"input_ids": ids["input_ids"]}
        encoded = self.processor(
            text=[text], images=images or None, return_tensors="pt", add_special_tokens=False
        )
        out = {"input_ids": encoded["input_ids"]}
        if images:
            out["pixel_values"] = encoded["pixel_values"]
            out["image_grid_thw"] = encoded["image_grid_thw"]
        return out

    def decode(self, token_ids: list[int]) -> str:
        text: str = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        return text


@dataclass
class SequenceBatch:
    """Prompt + response sequences, right-padded, with response-aligned masks (B, T)."""

    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L)
    prompt_lengths: Tensor  # (B,)
    response_mask: Tensor  # (B, T): 1 on real response tokens
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    mm_token_type_ids: Tensor | None = None


def build_sequence_batch(
    prompts: list[dict[str, Tensor]],
    responses: list[list[int]],
    pad_token_id: int,
    image_token_id: int | None = None,
) -> SequenceBatch:
    lengths = [int(p["input_ids"].shape[-1]) for p in prompts]
    total = max(p + len(r) for p, r in zip(lengths, responses, strict=True))
    longest_response = max(1, max(len(r) for r in responses))
    input_ids = torch.full((len(prompts), total), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), total), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), longest_response), dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        sequence = torch.cat([prompt["input_ids"].reshape(-1), torch.tensor(response).long()])
        input_ids[i, : sequence.numel()] = sequence
        attention[i, : sequence.numel()] = 1
        response_mask[i, : len(response)] = 1
    pixels = [p["pixel_values"] for p in prompts if "pixel_values" in p]
    grids = [p["image_grid_thw"] for p in prompts if "image_grid_thw" in p]
    batch = SequenceBatch(input_ids, attention, torch.tensor(lengths), response_mask)
    if pixels:
        batch.pixel_values = torch.cat(pixels)
        batch.image_grid_thw = torch.cat(grids)
    if image_token_id is not None:
        batch.mm_token_type_ids = (input_ids == image_token_id).int()
    return batch


# Response tokens projected through the LM head at a time: the logits of one chunk in fp32
# are chunk x vocab x 4 bytes (311 MB for Qwen2.5-VL's 151,936 tokens), whatever the length.
LOG_PROB_CHUNK_TOKENS = 512


def response_log_probs(
    model: Any,
    batch: SequenceBatch,
    temperature: float = 1.0,
    chunk_tokens: int = LOG_PROB_CHUNK_TOKENS,
) -> Tensor:
    """log pi(response token | prefix) for every response position, (B, T) (0 on padding).

    `model` is an HF model (Qwen2 or Qwen2.5-VL: a backbone `.model` and an `.lm_head`) or a
    DeepSpeed engine around one. The logits of the whole sequence (B x L x vocab, then fp32)
    are never built: only the hidden states that predict a response token go through the LM
    head, `chunk_tokens` at a time, each chunk's log-softmax in fp32 (as verl's fused
    log-probs do). Under autograd each chunk is checkpointed, so backward recomputes one
    chunk's logits at a time instead of keeping them all. A Qwen2.5-VL micro-batch without
    images still runs the vision tower, on a blank image that adds nothing to the result
    (`_touch_vision_tower`): ZeRO-3 ranks must all run the same modules."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    hidden = _last_hidden_states(model, inputs)  # (B, L, D)
    mask = batch.response_mask.to(device)
    rows, steps = mask.nonzero(as_tuple=True)
    # The response token at step t of row i is input_ids[i, P_i + t], predicted at P_i + t - 1.
    positions = batch.prompt_lengths.to(device)[rows] + steps - 1
    targets = inputs["input_ids"][rows, positions + 1]
    picked = _chunked_log_probs(
        _module(model).lm_head, hidden[rows, positions], targets, temperature, chunk_tokens
    )
    return picked.new_zeros(mask.shape).index_put((rows, steps), picked)


def _module(model: Any) -> Any:
    """The HF model itself, also when `model` is a DeepSpeed engine around it."""
    module = getattr(model, "module", model)
    if not (hasattr(module, "model") and hasattr(module, "lm_head")):
        raise TypeError(
            f"{type(module).__name__} has no .model and .lm_head: response_log_probs takes a "
            "causal LM like Qwen2ForCausalLM or Qwen2_5_VLForConditionalGeneration"
        )
    return module


def model_inputs(batch: SequenceBatch, device: torch.device) -> dict[str, Tensor]:
    kwargs: dict[str, Tensor] = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
    }
    if batch.pixel_values is not None and batch.image_grid_thw is not None:
        kwargs["pixel_values"] = batch.pixel_values
        kwargs["image_grid_thw"] = batch.image_grid_thw
    if batch.mm_token_type_ids is not None:
        kwargs["mm_token_type_ids"] = batch.mm_token_type_ids
    return {k: v.to(device) for k, v in kwargs.items()}


def _last_hidden_states(model: Any, inputs: dict[str, Tensor]) -> Tensor:
    """The backbone's last hidden states (B, L, D), from the model's own forward.

    The call goes through the top-level module (a DeepSpeed engine's forward where given one:
    ZeRO-3 gathers, releases and traces parameters from there), asks for the logits of the
    last position only (`logits_to_keep=1`: B x vocab, negligible) and keeps what the
    backbone returned to the LM head."""
    captured: list[Tensor] = []

    def keep(_backbone: Any, _args: Any, output: Any) -> None:
        captured.append(output[0])  # last_hidden_state (also when the model returns tuples)

    backbone = _module(model).model
    handle = backbone.register_forward_hook(keep)
    try:
        with vision_tower_runs(backbone, inputs):
            model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


@contextmanager
def vision_tower_runs(backbone: Any, inputs: dict[str, Tensor]) -> Iterator[None]:
    """Within: a forward of `backbone` (a Qwen2.5-VL backbone, the policy's or the critic's)
    on `inputs` without images runs the vision tower anyway (`_touch_vision_tower`)."""
    handle = None
    if "pixel_values" not in inputs and getattr(backbone, "visual", None) is not None:
        touch = partial(_touch_vision_tower, backbone)
        handle = backbone.get_input_embeddings().register_forward_hook(touch)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _touch_vision_tower(backbone: Any, _embedding: Any, _args: Any, embeds: Tensor) -> Tensor:
    """The token embeddings of an image-free micro-batch plus zero times the features of a
    blank image, so the vision tower runs on every forward (as LMM-R1's fake pixel values).

    Under ZeRO-3 each rank gathers a module's parameter shards from the others when the
    module runs: a rank whose micro-batch has images runs the vision tower, one without would
    not, and the first rank would wait for shards nobody sends (NCCL hangs; gloo fails on
    mismatched sizes). With the blank image every rank gathers the same parameters in the
    same order. The output is unchanged (x + 0 is x), and backward gives the vision
    parameters gradients of zero, so every rank also reduces the same gradients."""
    visual = backbone.visual
    config = visual.config
    # The smallest grid the merger accepts: one merged token of merge x merge patches.
    merge = int(config.spatial_merge_size)
    patch_values = config.in_channels * config.temporal_patch_size * config.patch_size**2
    pixels = torch.zeros((merge * merge, patch_values), dtype=visual.dtype, device=embeds.device)
    grid = torch.tensor([[1, merge, merge]], dtype=torch.long, device=embeds.device)
    features = torch.cat(backbone.get_image_features(pixels, grid).pooler_output)
    # nan_to_num: zero times a NaN or an infinity would not be zero.
    return embeds + 0.0 * torch.nan_to_num(features.sum()).to(embeds.dtype)


def _chunked_log_probs(
    lm_head: Any, hidden: Tensor, targets: Tensor, temperature: float, chunk_tokens: int
) -> Tensor:
    """token_log_probs(lm_head(hidden), targets) for hidden (N, D), `chunk_tokens` rows at a
    time; (N,) in fp32."""
    from torch.utils.checkpoint import checkpoint

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")

    def chunk_log_probs(states: Tensor, tokens: Tensor) -> Tensor:
        return token_log_probs(lm_head(states), tokens, temperature)

    pieces = []
    # At least one (possibly empty) chunk: with no response token at all the result is still
    # part of the graph, so a loss on it backpropagates zeros as the full logits did.
    for start in range(0, max(hidden.size(0), 1), chunk_tokens):
        states, tokens = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(chunk_log_probs, states, tokens, use_reentrant=False))
        else:
            pieces.append(chunk_log_probs(states, tokens))
    return torch.cat(pieces)
