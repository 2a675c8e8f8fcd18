"""The spliced-in LM loss: the replacing forwards against independent computations, controls that must give 1 and
0, hand-set dictionaries on the tiny toy snapshots, and `crosscoder-eval` on an exported dictionary."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from crosscoder.analysis.report.dictionary import analyze_dictionary
from crosscoder.analysis.report.spliced_loss import SPLICED_FIGURE, SPLICED_TITLE
from crosscoder.cli.eval import main
from crosscoder.config import HookPoint, RunConfig
from crosscoder.constants import ANALYSIS_DIR, CONFIG_FILE, EVAL_FILE
from crosscoder.data.held_out import held_out_batches, held_out_seed
from crosscoder.data.kinds import describe_sources
from crosscoder.data.tokens import TokenBatch, iter_token_batches, special_token_ids
from crosscoder.dictionary.crosscoder import Crosscoder
from crosscoder.dictionary.io import DictionaryMeta, export_dictionary
from crosscoder.errors import ConfigError
from crosscoder.evaluation.spliced import crosscoder_reconstruction, spliced_eval
from crosscoder.evaluation.splicing import logits_and_activation, logits_with_replacement
from crosscoder.sources.hooks import SnapshotRunner
from crosscoder.sources.models import load_runners
from crosscoder.toy import generate_corpus
from tests.helpers import tiny_toy_config

N_POSITIONS = 256
VOCAB, WIDTH = 64, 16


# ---- the replacing forward, on random-init GPT-NeoX and Llama ----------------------------------------------------
def _tiny_lm(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=32)
    model = (GPTNeoXForCausalLM(GPTNeoXConfig(**common)) if kind == "gpt_neox"
             else LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=1)))
    with torch.no_grad():  # a final norm that does not map zero to zero, so zero ablation has a non-trivial answer
        norm = model.gpt_neox.final_layer_norm if kind == "gpt_neox" else model.model.norm
        norm.weight.normal_()
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    return model.eval()


def _runner(model: torch.nn.Module, hook: str) -> SnapshotRunner:
    return SnapshotRunner(model, HookPoint.parse(hook), "tiny")


def _tokens(rows: int = 2, length: int = 8) -> TokenBatch:
    ids = torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 0  # BOS
    return TokenBatch(ids, torch.ones_like(ids))


def _head_of_zero(model: torch.nn.Module, kind: str) -> torch.Tensor:
    """The logits of every position when the last block's output is zero: head(final norm(0)), by hand."""
    base = model.gpt_neox if kind == "gpt_neox" else model.model
    norm = base.final_layer_norm if kind == "gpt_neox" else base.norm
    head = model.get_output_embeddings()
    return head(norm(torch.zeros(WIDTH)))


@pytest.mark.parametrize("kind", ["gpt_neox", "llama"])
def test_replacing_the_hooked_activation_matches_independent_forwards(kind: str) -> None:
    model, batch = _tiny_lm(kind), _tokens()
    ids, mask = batch.input_ids, batch.attention_mask
    clean = model(input_ids=ids, attention_mask=mask).logits
    other = torch.randn(*ids.shape, WIDTH, generator=torch.Generator().manual_seed(2))
    for hook in ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre",
                 "blocks.1.hook_resid_post"):
        runner = _runner(model, hook)
        logits, activation = logits_and_activation(runner, ids, mask)
        torch.testing.assert_close(logits, clean, rtol=0, atol=0)
        torch.testing.assert_close(activation, runner(ids, mask), rtol=0, atol=0)  # the capture-and-stop path
        torch.testing.assert_close(logits_with_replacement(runner, ids, mask, activation), clean, rtol=0, atol=0)
    with torch.no_grad():  # the input of block 0 is the embedding: replacing it is passing other embeddings
        by_embeds = model(inputs_embeds=other, attention_mask=mask).logits
    pre0, post0, pre1 = (_runner(model, h) for h in ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                                                     "blocks.1.hook_resid_pre"))
    torch.testing.assert_close(logits_with_replacement(pre0, ids, mask, other), by_embeds)
    # Block 0's output is block 1's input: the forward continues past a replaced output as past a replaced input.
    torch.testing.assert_close(logits_with_replacement(post0, ids, mask, other),
                               logits_with_replacement(pre1, ids, mask, other))
    zero = logits_with_replacement(_runner(model, "blocks.1.hook_resid_post"), ids, mask, torch.zeros_like(other))
    torch.testing.assert_close(zero, _head_of_zero(model, kind).expand_as(zero).detach())
    with pytest.raises(ValueError, match=r"expected \[2, 8, 16\]"):
        logits_with_replacement(pre0, ids, mask, other[:, :4])


@pytest.mark.parametrize("kind", ["gpt_neox", "llama"])
def test_zero_ablated_ce_equals_the_hand_computed_one(kind: str) -> None:
    """spliced_eval's CE of a zeroed last block against -log softmax(head(norm(0)))[target], averaged by hand over
    the positions it must score: not BOS, with a next token."""
    model, batch = _tiny_lm(kind), _tokens(rows=4, length=8)
    runner = _runner(model, "blocks.1.hook_resid_post")
    zeros = lambda x: torch.zeros_like(x)  # noqa: E731 (a control: a dictionary that reconstructs nothing)
    (result,), n = spliced_eval([runner], [batch], zeros, 10_000, bos=0, pad=None, device=torch.device("cpu"),
                                log=lambda _: None)
    logprobs = _head_of_zero(model, kind).log_softmax(dim=-1).detach()
    targets = batch.input_ids[:, 2:]  # position 0 is BOS (not scored); position t predicts token t + 1
    assert n == targets.numel() == 4 * 6
    assert result.ce_zero == pytest.approx(-logprobs[targets].mean().item(), rel=1e-5)
    assert result.ce_spliced == pytest.approx(result.ce_zero, rel=1e-6) and result.ce_recovered == pytest.approx(0)
    with torch.no_grad():
        clean = model(input_ids=batch.input_ids).logits[:, 1:-1].log_softmax(dim=-1)
    assert result.ce_clean == pytest.approx(-clean.gather(2, targets[..., None]).mean().item(), rel=1e-5)


# ---- the tiny toy snapshots -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tiny_snapshots: list, toy_cache: Path) -> dict:
    cfg = tiny_toy_config(toy_cache)
    info = describe_sources(cfg.sources, log=lambda _: None)
    runners = load_runners(cfg.sources, info.specs, torch.device("cpu"), with_lm_head=True)
    bos, pad = special_token_ids(info.tokenizer)
    batches = list(_first(held_out_batches(cfg.data, info.tokenizer, None).batches, 4))
    return dict(cfg=cfg, info=info, runners=runners, bos=bos, pad=pad, batches=batches)


def _first(batches: object, n: int) -> list[TokenBatch]:
    return [batch for _, batch in zip(range(n), batches, strict=False)]  # type: ignore[call-overload]


def _eval(toy: dict, reconstruct: object) -> list:
    results, n = spliced_eval(toy["runners"], toy["batches"], reconstruct, N_POSITIONS, toy["bos"], toy["pad"],
                              torch.device("cpu"), log=lambda _: None)
    assert n >= N_POSITIONS
    return results


def test_splicing_the_clean_activation_recovers_everything(toy: dict) -> None:
    for result in _eval(toy, lambda x: x):
        assert result.ce_spliced == pytest.approx(result.ce_clean, abs=1e-6)
        assert abs(result.kl) < 1e-6
        assert result.ce_recovered == pytest.approx(1, abs=1e-5)
    assert result.ce_zero > result.ce_clean + 0.1  # the trained snapshot needs its residual stream


def test_held_out_toy_tokens_are_not_the_training_documents(toy: dict) -> None:
    cfg, tokenizer = toy["cfg"], toy["info"].tokenizer
    trained = {tuple(row.tolist()) for batch in _first(iter_token_batches(cfg.data, tokenizer), 40)
               for row in batch.input_ids}
    held = [tuple(row.tolist()) for batch in toy["batches"] for row in batch.input_ids]
    assert held and not trained & set(held)
    assert held_out_seed(cfg.data.seed) not in (cfg.data.seed, 0)


def test_held_out_text_is_the_stream_after_what_the_run_read(toy: dict, tmp_path: Path) -> None:
    """Data rank 0 of 2 with 2 workers took blocks 0..4 (block j from its worker j mod 2): document shard 0 of 4
    gave batches 0, 1, 2 of them, so the held-out stream is that shard from batch 3 on; a corpus whose shard runs out
    of its first epoch is flagged."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(generate_corpus(400, seed=7)))
    cfg = tiny_toy_config(Path("unused"))
    cfg.data.kind, cfg.data.paths = "text_files", [str(corpus)]
    tokenizer = toy["info"].tokenizer
    positions = [{"kind": "online", "rank": r, "world_size": 2, "document_shards": 2, "next_block": 5} for r in (0, 1)]
    held = held_out_batches(cfg.data, tokenizer, positions)
    assert held.source.startswith("text_files stream shard 0 of 4 after the 3 batches")
    shard0 = _first(iter_token_batches(cfg.data, tokenizer, shard=0, n_shards=4), 5)
    first = next(held.batches)
    assert torch.equal(first.input_ids, shard0[3].input_ids) and not held.reused_training_text
    trained = {tuple(row.tolist()) for batch in shard0[:3] for row in batch.input_ids}
    assert not trained & {tuple(row.tolist()) for row in first.input_ids}
    for _ in range(400):  # shard 0's 100 documents are a few dozen batches: the stream wraps into epoch 1
        next(held.batches)
    assert held.reused_training_text
    with pytest.raises(ConfigError, match="no online stream position of data rank 0"):
        held_out_batches(cfg.data, tokenizer, None)


def _dictionary(toy: dict, rank: int | None) -> Crosscoder:
    """A ReLU crosscoder that reconstructs each snapshot from its own activation: exactly (rank None: ±e_j
    latents), or its projection onto the top `rank` principal directions around its mean (±u_k latents)."""
    n_snap, d = len(toy["runners"]), toy["info"].d_model
    per = d if rank is None else rank
    model = Crosscoder(n_snap, d, 2 * n_snap * per, "relu")
    x = torch.cat([torch.stack([r(b.input_ids, b.attention_mask)[b.input_ids != toy["bos"]] for r in toy["runners"]],
                               dim=1) for b in toy["batches"]])
    with torch.no_grad():
        for tensor in (model.W_enc, model.W_dec, model.b_enc, model.b_dec):
            tensor.zero_()
        for s in range(n_snap):
            mean = x[:, s].mean(dim=0)
            basis = torch.eye(d) if rank is None else torch.linalg.svd(x[:, s] - mean, full_matrices=False)[2][:rank]
            for k, u in enumerate(basis):
                for sign, offset in ((1, 0), (-1, per)):
                    i = s * 2 * per + offset + k
                    model.W_enc[s, :, i], model.W_dec[i, s] = sign * u, sign * u
            if rank is not None:
                model.b_dec[s] = mean - basis.T @ (basis @ mean)
    return model.eval()


def test_hand_set_dictionaries_recover_in_range_and_a_zero_decoder_recovers_nothing(toy: dict) -> None:
    exact = _eval(toy, crosscoder_reconstruction(_dictionary(toy, None)))
    half = _eval(toy, crosscoder_reconstruction(_dictionary(toy, toy["info"].d_model // 4)))
    for result in exact:
        assert result.ce_recovered == pytest.approx(1, abs=1e-3) and result.kl < 1e-4
    trained = half[-1]  # the last snapshot is the trained one: a real gap between clean and ablated
    assert 0.0 < trained.ce_recovered < 1.0 and trained.kl > 0
    assert trained.ce_spliced < trained.ce_zero and trained.ce_spliced < trained.ce_mean

    zeroed = _dictionary(toy, None)
    with torch.no_grad():
        zeroed.W_dec.zero_()
    for result in _eval(toy, crosscoder_reconstruction(zeroed)):  # a control that must fail to recover
        assert result.ce_spliced == pytest.approx(result.ce_zero, rel=1e-6)
        assert result.ce_recovered == pytest.approx(0, abs=1e-5)
    with torch.no_grad():  # decoding only its bias: the snapshot's mean, i.e. mean ablation
        zeroed.b_dec.copy_(torch.stack(_means(toy)))
    for result in _eval(toy, crosscoder_reconstruction(zeroed)):
        assert result.ce_spliced == pytest.approx(result.ce_mean, rel=1e-5)
        assert result.ce_recovered_mean == pytest.approx(0, abs=1e-3)


def _means(toy: dict) -> list[torch.Tensor]:
    """Each snapshot's mean activation over the evaluated sequences (what spliced_eval mean-ablates with)."""
    from crosscoder.data.activations import valid_token_mask
    from crosscoder.evaluation.spliced import _take_rows

    rows = _take_rows(toy["batches"], N_POSITIONS, toy["bos"], toy["pad"])
    valid = valid_token_mask(rows, toy["bos"], toy["pad"])
    return [r(rows.input_ids, rows.attention_mask)[valid].mean(dim=0) for r in toy["runners"]]


# ---- crosscoder-eval ------------------------------------------------------------------------------------------
def _export(toy: dict, path: Path, model: Crosscoder, training: dict) -> Path:
    info = toy["info"]
    meta = DictionaryMeta(sources=[asdict(spec) for spec in info.specs], hook=info.hook, d_model=info.d_model,
                          dict_size=model.dict_size, activation="relu", k=1, aux_k=0, tokens_seen=0, train_step=0,
                          input_scale=[1.0] * len(info.specs), training=training)
    return export_dictionary(model.state_dict(), meta, path)


def test_the_cli_writes_eval_json_and_the_report_shows_it(toy: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    training = OmegaConf.to_container(OmegaConf.structured(toy["cfg"]), resolve=True)
    dictionary = _export(toy, tmp_path / "dictionary", _dictionary(toy, None), training)  # type: ignore[arg-type]
    main([str(dictionary), "--tokens", "128", "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"eval: {dictionary / EVAL_FILE}" in out and "tok/s" in out
    written = json.loads((dictionary / EVAL_FILE).read_text())
    assert written["snapshots"] == ["step0", "step4", "step12"] and written["n_positions"] >= 128
    assert written["held_out"] and "fresh toy documents" in written["tokens_from"]
    for figures in written["per_snapshot"].values():
        assert figures["ce_recovered"] == pytest.approx(1, abs=1e-3)
        assert set(figures) == {"ce_clean", "ce_spliced", "ce_zero", "ce_mean", "ce_recovered", "ce_recovered_mean",
                                "kl"}

    result = analyze_dictionary(dictionary)
    assert result.summary["spliced_eval"]["per_snapshot"]["step12"]["ce_recovered"] == pytest.approx(1, abs=1e-3)
    page = result.report.read_text()
    assert SPLICED_TITLE in page and "CE recovered (vs zero)" in page
    assert (dictionary / ANALYSIS_DIR / SPLICED_FIGURE).is_file()


def _bad(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crosscoder-eval: ") and "\n" not in err, err
    return err


def test_the_cli_refuses_bad_input_in_one_line(toy: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "no such folder" in _bad([str(tmp_path / "missing")], capsys)
    planted = RunConfig(output_dir="")
    planted.sources.kind = "planted"
    training = OmegaConf.to_container(OmegaConf.structured(planted), resolve=True)
    dictionary = _export(toy, tmp_path / "planted", _dictionary(toy, 1), training)  # type: ignore[arg-type]
    assert "sources.kind='planted'" in _bad([str(dictionary)], capsys)
    assert "--tokens=0 must be > 0" in _bad([str(dictionary), "--tokens", "0"], capsys)
    assert "--device='gpu'" in _bad([str(dictionary), "--device", "gpu"], capsys)
    (dictionary / CONFIG_FILE).write_text("{not json")
    assert "not valid JSON" in _bad([str(dictionary)], capsys)
    assert not (dictionary / EVAL_FILE).exists()


def test_eval_tokens_must_not_be_negative(toy_cache: Path) -> None:
    cfg = tiny_toy_config(toy_cache)
    cfg.trainer.eval_tokens = -1
    with pytest.raises(ConfigError, match=r"trainer.eval_tokens=-1 must be >= 0"):
        cfg.validate()
