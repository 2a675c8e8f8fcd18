"""A tiny GPT-NeoX trained locally on CPU, saved as HF checkpoints over training.

``ensure_toy_snapshots`` is the embedded default model source of the crosscoder
trainer: it trains a Pythia-shaped model on the synthetic corpus and keeps
checkpoints at log-spaced steps, so features can be watched emerging.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from crosscoder.storage import give_new_file_mode
from crosscoder.toy.corpus import generate_corpus

EOS_TOKEN = "<|endoftext|>"  # also bos and unk, as in Pythia (id 0)
PAD_TOKEN = "<|padding|>"  # id 1, as in Pythia
MANIFEST_NAME = "snapshots.json"
# Bump when corpus, tokenizer or training code changes, so old caches are not reused.
_FORMAT_VERSION = 1
_LOG_EVERY = 50
_N_EVAL_DOCUMENTS = 100


@dataclass(frozen=True)
class ToyLMConfig:
    """Everything that determines the toy model; its fingerprint names the cache."""

    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block; must divide ``hidden_size``."""
    intermediate_size: int = 256
    """Width of the MLP hidden layer."""
    vocab_size: int = 512
    """Byte-level BPE vocabulary size (256 bytes + 2 special tokens + merges)."""
    seq_len: int = 64
    """Tokens per training sequence, the leading bos token included."""
    batch_size: int = 32
    """Sequences per optimizer step."""
    train_steps: int = 300
    """Number of optimizer updates."""
    learning_rate: float = 1e-2
    """Peak AdamW learning rate (after warmup, then cosine decay to 10%)."""
    warmup_steps: int = 15
    """Linear learning-rate warmup steps."""
    snapshot_steps: tuple[int, ...] = (0, 3, 8, 20, 45, 100, 180, 300)
    """Steps (number of updates done) at which checkpoints are saved; 0 = init."""
    n_documents: int = 6000
    """Synthetic documents generated (the last few are held out for eval loss)."""
    seed: int = 0
    """Seed for corpus, initialisation and batch order."""

    def __post_init__(self) -> None:
        # Accept lists from JSON/CLI but store a hashable tuple.
        object.__setattr__(self, "snapshot_steps", tuple(self.snapshot_steps))
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "batch_size",
                     "train_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        steps = self.snapshot_steps
        rules = [
            (self.hidden_size % self.num_heads == 0,
             f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"),
            (self.vocab_size >= 258, f"vocab_size must be >= 258 (bytes + specials), got {self.vocab_size}"),
            (self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.n_documents > _N_EVAL_DOCUMENTS,
             f"n_documents must be > {_N_EVAL_DOCUMENTS}, got {self.n_documents}"),
            (0 in steps, f"snapshot_steps must include 0, got {steps}"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)
        for prev, step in zip(steps, steps[1:], strict=False):
            if step <= prev:
                raise ValueError(f"snapshot_steps must be sorted and unique: {step} after {prev} in {steps}")
        for step in steps:
            if not 0 <= step <= self.train_steps:
                raise ValueError(f"snapshot step {step} is outside [0, train_steps={self.train_steps}]")

    def fingerprint(self) -> str:
        """Cache folder name, ``tiny-gptneox-<12 hex>``, from a hash of all fields."""
        payload = json.dumps({"format": _FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return "tiny-gptneox-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ToySnapshot:
    """One saved checkpoint: load it with ``from_pretrained(path)``."""

    step: int
    path: Path


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Pythia-style special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],  # listed first -> ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def ensure_toy_snapshots(
    root: Path, config: ToyLMConfig = ToyLMConfig(), log: Callable[[str], None] = print
) -> list[ToySnapshot]:
    """Return the toy model's snapshots under ``root``, training them if not cached."""
    root = Path(root)
    name = config.fingerprint()
    final = root / name
    if (final / MANIFEST_NAME).exists():
        return _read_manifest(final)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, name)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    bars_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # 8 "Writing model shards" bars would drown the log
    try:
        _build(tmp, config, log)
        if final.exists() and not (final / MANIFEST_NAME).exists():
            shutil.rmtree(final)  # incomplete leftover, never produced by this code
        try:
            os.replace(tmp, final)  # atomic: the cache appears complete or not at all
        except OSError:
            if not (final / MANIFEST_NAME).exists():
                raise
            log(f"{name}: another process finished first; using its snapshots")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars_enabled:
            hf_logging.enable_progress_bar()
    return _read_manifest(final)


def _read_manifest(folder: Path) -> list[ToySnapshot]:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    return [ToySnapshot(step=s["step"], path=folder / s["dirname"]) for s in manifest["snapshots"]]


def _remove_stale_tmp(root: Path, name: str) -> None:
    """Delete temp folders of builds whose process no longer runs."""
    for tmp in root.glob(f".{name}.tmp-*"):
        pid_text = tmp.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            continue  # a concurrent build is still writing it
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except PermissionError:
        return True  # exists, owned by someone else
    except (OSError, OverflowError):  # ProcessLookupError: no such process
        return False
    return True


def _pack(tokenizer: PreTrainedTokenizerFast, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents (each preceded by eos) and cut into bos-led sequences."""
    docs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = [t for doc in docs for t in (tokenizer.eos_token_id, *doc)]
    n, body = len(stream) // (seq_len - 1), seq_len - 1
    if n == 0:
        raise ValueError(f"corpus too small for one sequence of {seq_len} tokens")
    chunks = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), chunks], dim=1)


def _lr_factor(step: int, config: ToyLMConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def _build(out: Path, config: ToyLMConfig, log: Callable[[str], None]) -> None:
    start = time.perf_counter()
    docs = generate_corpus(config.n_documents, config.seed)
    train_docs, eval_docs = docs[:-_N_EVAL_DOCUMENTS], docs[-_N_EVAL_DOCUMENTS:]
    tokenizer = train_tokenizer(train_docs, config.vocab_size)
    train_data = _pack(tokenizer, train_docs, config.seq_len)
    eval_batch = _pack(tokenizer, eval_docs, config.seq_len)[: config.batch_size]
    tokens_per_step = config.batch_size * config.seq_len
    log(f"toy LM {config.fingerprint()}: {train_data.numel()} train tokens, "
        f"vocab {len(tokenizer)}, {config.train_steps} steps")
    snapshots: list[dict[str, object]] = []

    def save(step: int, model: GPTNeoXForCausalLM) -> None:
        eval_loss, dirname = _eval_loss(model, eval_batch), f"step{step}"
        model.save_pretrained(out / dirname)  # transformers v5 always writes model.safetensors
        tokenizer.save_pretrained(out / dirname)
        give_new_file_mode((out / dirname).glob("*.safetensors"))  # save_pretrained's safetensors are 0600
        snapshots.append({"step": step, "dirname": dirname, "eval_loss": eval_loss})
        log(f"  saved {dirname} (eval loss {eval_loss:.3f})")

    # fork_rng: seed init and batch order without clobbering the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size, max_position_embeddings=config.seq_len,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                      betas=(0.9, 0.95), weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
        generator = torch.Generator().manual_seed(config.seed)
        order, cursor = torch.randperm(len(train_data), generator=generator), 0
        t_log, last_logged = time.perf_counter(), 0
        save(0, model)  # step 0: the untrained, seeded initialisation
        for step in range(1, config.train_steps + 1):
            if cursor + config.batch_size > len(order):  # epoch exhausted: reshuffle
                order, cursor = torch.randperm(len(train_data), generator=generator), 0
            batch = train_data[order[cursor : cursor + config.batch_size]]
            cursor += config.batch_size
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % _LOG_EVERY == 0 or step == config.train_steps:
                rate = tokens_per_step * (step - last_logged) / (time.perf_counter() - t_log)
                log(f"  step {step}/{config.train_steps} loss {loss.item():.3f} {rate:.0f} tok/s")
                t_log, last_logged = time.perf_counter(), step
            if step in config.snapshot_steps:
                save(step, model)
        final_loss = _eval_loss(model, eval_batch)

    manifest = {"config": asdict(config), "fingerprint": config.fingerprint(), "snapshots": snapshots,
                "final_loss": final_loss, "tokens_per_step": tokens_per_step}
    # Written last: its presence is what marks the cache as complete.
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    log(f"toy LM built in {time.perf_counter() - start:.1f}s, final eval loss {final_loss:.3f}")


def _eval_loss(model: GPTNeoXForCausalLM, batch: torch.Tensor) -> float:
    """Mean next-token loss on a fixed held-out batch."""
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss.item()
    model.train()
    return loss
