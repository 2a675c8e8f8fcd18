"""Tests for the embedded toy LM: corpus, config, training, snapshot cache. Replacing a dead build's
folder (its pid from a `python -c` that ended): tests/launch/toy/test_tiny_lm.py."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPTNeoXForCausalLM

from crosscoder.toy import ToyLMConfig, ToySnapshot, ensure_toy_snapshots, generate_corpus, tiny_lm
from crosscoder.toy.tiny_lm import MANIFEST_NAME, train_tokenizer
from tests.helpers import SMALL


def _forward(path: Path, text: str) -> tuple[torch.Tensor, float]:
    """Logits and loss of the checkpoint reloaded from ``path`` on a bos-led text."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return out.logits, out.loss.item()


def test_snapshots_saved_and_reloadable(built: tuple[Path, list[ToySnapshot]]) -> None:
    root, snaps = built
    assert [s.step for s in snaps] == [0, 5, 20]
    assert all(s.path.parent == root / SMALL.fingerprint() for s in snaps)
    for snap in snaps:
        assert (snap.path / "model.safetensors").is_file()
        tok = AutoTokenizer.from_pretrained(snap.path)
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 1)
        assert tok.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|padding|>"]
        model = AutoModelForCausalLM.from_pretrained(snap.path)
        assert model.config.model_type == "gpt_neox"
        assert model.config.hidden_size == SMALL.hidden_size
        assert model.config.num_hidden_layers == SMALL.num_layers


def test_step0_is_seeded_init_and_training_changes_it(built: tuple[Path, list[ToySnapshot]]) -> None:
    _, snaps = built
    text = generate_corpus(1, seed=123)[0]
    torch.manual_seed(SMALL.seed)  # step 0 must be exactly the untrained seeded init
    fresh = GPTNeoXForCausalLM(AutoConfig.from_pretrained(snaps[0].path)).eval()
    tok = AutoTokenizer.from_pretrained(snaps[0].path)
    ids = torch.tensor([[0, *tok(text, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        fresh_logits = fresh(input_ids=ids).logits
    step0, loss0 = _forward(snaps[0].path, text)
    torch.testing.assert_close(step0, fresh_logits, rtol=0, atol=0)
    final, final_loss = _forward(snaps[-1].path, text)
    assert not torch.allclose(step0, final)
    assert final_loss < loss0 - 0.5, (loss0, final_loss)


def test_manifest(built: tuple[Path, list[ToySnapshot]]) -> None:
    root, _ = built
    manifest = json.loads((root / SMALL.fingerprint() / MANIFEST_NAME).read_text())
    assert ToyLMConfig(**manifest["config"]) == SMALL
    assert [(s["step"], s["dirname"]) for s in manifest["snapshots"]] == [
        (0, "step0"), (5, "step5"), (20, "step20")]
    losses = [s["eval_loss"] for s in manifest["snapshots"]]
    assert losses[0] > losses[-1] + 0.5, losses
    assert manifest["final_loss"] == losses[-1]
    assert manifest["tokens_per_step"] == SMALL.batch_size * SMALL.seq_len


def test_second_call_uses_cache(built: tuple[Path, list[ToySnapshot]],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    root, snaps = built

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained although the cache is complete")

    monkeypatch.setattr(tiny_lm, "_build", no_training)
    assert ensure_toy_snapshots(root, SMALL, log=lambda _: None) == snaps


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_eval(*args: object) -> float:
        # Mid-build, nothing may sit at the final path, or a kill here would leave it half-written.
        assert not (tmp_path / SMALL.fingerprint()).exists()
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("killed mid-build")
        return 1.0

    monkeypatch.setattr(tiny_lm, "_eval_loss", failing_eval)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        ensure_toy_snapshots(tmp_path, SMALL, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("steps", "bad"), [
    ((0, 5, 5), "5"), ((0, 10, 5), "5"), ((5, 20), "include 0"), ((0, 30), "30"), ((-1, 0), "-1"),
])
def test_bad_snapshot_steps(steps: tuple[int, ...], bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        replace(SMALL, snapshot_steps=steps)


def test_fingerprint() -> None:
    fp = SMALL.fingerprint()
    assert fp.startswith("tiny-gptneox-") and fp == replace(SMALL).fingerprint()
    assert replace(SMALL, snapshot_steps=[0, 5, 20]).fingerprint() == fp  # list normalised
    assert replace(SMALL, seed=1).fingerprint() != fp
    assert replace(SMALL, learning_rate=2e-2).fingerprint() != fp
    assert ToyLMConfig().fingerprint() != fp


def test_corpus_deterministic_and_structured() -> None:
    docs = generate_corpus(200, seed=7)
    assert len(docs) == 200 and docs == generate_corpus(200, seed=7)
    assert docs != generate_corpus(200, seed=8)
    text = " ".join(docs)
    for marker in (" plus ", " minus ", " counts ", '"', "(", " the "):
        assert marker in text
    for doc in docs:
        assert doc.count('"') % 2 == 0 and doc.count("(") == doc.count(")")
    assert " two three " in text
    # Subject-verb agreement: a noun directly before a verb is always its subject.
    singular = r"\b(dog|cat|song|cake|storm|car) (see|like|find|run|sleep|wait|want|have)\b"
    plural = r"\b(dogs|cats|songs|cakes|storms|cars) (sees|likes|finds|runs|sleeps|has)\b"
    assert re.search(singular, text) is None and re.search(plural, text) is None
    assert re.search(r"\b(dogs|cats|songs|cakes|storms|cars) (see|like|find|run|sleep|have)\b", text)
    # Each document has its own small cast of recurring names.
    names = set(re.findall(r"\b[A-Z][a-z]+\b", text)) - {"The", "A", "This", "Some", "Two"}
    for doc in docs:
        assert len({n for n in names if re.search(rf"\b{n}\b", doc)}) <= 3


def test_tokenizer_roundtrip() -> None:
    docs = generate_corpus(100, seed=0)
    tok = train_tokenizer(docs, vocab_size=300)
    assert len(tok) <= 300
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|padding|>"]) == [0, 1]
    text = 'Emma said, "7 plus 5 is 12." Zoë (unseen) ñ'
    assert tok.decode(tok(text)["input_ids"]) == text
