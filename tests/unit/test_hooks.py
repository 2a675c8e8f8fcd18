"""Hook sites (sources.hooks): several hooks read in one forward, and the attention / MLP output hooks against
independent computations on every decoder architecture the sources support."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, GPTNeoXConfig, GPTNeoXModel, LlamaConfig, LlamaModel

from crosscoder.analysis.report.dictionary import analyze_dictionary
from crosscoder.cli.train import train
from crosscoder.config import HookPoint, RunConfig, SourcesConfig
from crosscoder.constants import EVAL_FILE
from crosscoder.data.kinds import configured_snapshot_names, describe_sources
from crosscoder.dictionary.io import load_dictionary
from crosscoder.errors import ConfigError
from crosscoder.sources.hooks import SnapshotRunner
from crosscoder.sources.models import _check_hooks, load_runners
from crosscoder.sources.spec import SnapshotSpec
from tests.helpers import tiny_run_config

ARCHITECTURES = ["gpt_neox", "gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi",
                 "phi3", "opt", "bloom", "falcon", "gptj", "gpt_neo", "olmo", "olmo2", "stablelm", "starcoder2",
                 "cohere", "codegen", "gpt_bigcode", "granite"]
"""tests/unit/test_sources.py's decoder types with attention and MLP sublayers (all but Mamba)."""
SHAPE = dict(hidden_size=32, n_embd=32, d_model=32, num_hidden_layers=3, n_layer=3, num_layers=3,
             num_attention_heads=4, n_head=4, num_key_value_heads=2, intermediate_size=64, n_inner=64, ffn_dim=64,
             head_dim=8, vocab_size=128, max_position_embeddings=64, n_positions=64, n_ctx=64, num_local_experts=2,
             rotary_dim=4, word_embed_proj_dim=32)
ALL_OF_BLOCK = ("pre", "attn_out", "mlp_out", "post")


def _tiny(model_type: str) -> nn.Module:
    """A random-init 3-block base model of `model_type`, d=32."""
    transformers.logging.set_verbosity_error()
    config = AutoConfig.for_model(model_type)
    for key, value in SHAPE.items():
        if hasattr(config, key):
            with contextlib.suppress(AttributeError):  # a derived property (Falcon's head_dim)
                setattr(config, key, value)
    if getattr(config, "pad_token_id", None) is not None and config.pad_token_id >= SHAPE["vocab_size"]:
        config.pad_token_id = 0
    if model_type == "gpt_neo":
        config.attention_types, config.attention_layers = [[["global", "local"], 1], [["global"], 1]], \
            ["global", "local", "global"]
    if model_type == "granite":
        config.residual_multiplier = 0.5  # the read must carry the scale the block adds with
    torch.manual_seed(0)
    return AutoModel.from_config(config).eval()


def _inputs(batch: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(2, 100, (batch, length), generator=torch.Generator().manual_seed(1))
    return input_ids, torch.ones_like(input_ids)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_sublayer_hooks_add_up_to_the_residual_stream_and_replace_in_place(model_type: str) -> None:
    """In one forward, all four hooks of block 1: resid_pre = hidden_states[1], resid_post = hidden_states[2],
    and resid_pre + attn_out + mlp_out = resid_post (sequential or parallel blocks, post-norms, BLOOM's fused
    residual, OPT's flattened fc2, Granite's multiplier, Falcon's in-place add). Splicing an attn_out / mlp_out
    back in unchanged leaves the output as it was; splicing in zeros changes it."""
    model = _tiny(model_type)
    input_ids, mask = _inputs()
    runner = SnapshotRunner(model, [HookPoint(1, position) for position in ALL_OF_BLOCK], model_type)
    pre, attn, mlp, post = runner.capture(input_ids, mask)
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(pre, output.hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(post, output.hidden_states[2], rtol=0, atol=0)
    torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-5, atol=1e-5)
    assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3  # neither sublayer is read as zero
    for index, value in ((1, attn), (2, mlp)):
        for replacement, same in ((value, True), (torch.zeros_like(value), False)):
            handle = runner.sites[index].register_replace(replacement)
            try:
                with torch.no_grad():
                    spliced = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            finally:
                handle.remove()
            assert torch.allclose(spliced, output.last_hidden_state, atol=1e-5) == same, (index, same)


def test_gpt_neox_and_llama_sublayer_outputs_equal_their_modules_recomputed() -> None:
    """An independent computation, exact: GPT-NeoX (parallel residual) mlp_out = mlp(post_attention_layernorm(
    resid_pre)), resid_post = mlp_out + attn_out + resid_pre; Llama (sequential) resid_mid = resid_pre + attn_out,
    mlp_out = mlp(post_attention_layernorm(resid_mid)), resid_post = resid_mid + mlp_out."""
    torch.manual_seed(0)
    neox = GPTNeoXModel(GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64)).eval()
    llama = LlamaModel(LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64)).eval()
    input_ids, mask = _inputs()
    hooks = [HookPoint(1, position) for position in ALL_OF_BLOCK]
    pre, attn, mlp, post = SnapshotRunner(neox, hooks, "neox").capture(input_ids, mask)
    block = neox.layers[1]
    with torch.no_grad():
        assert torch.equal(mlp, block.mlp(block.post_attention_layernorm(pre)))
    assert torch.equal(post, mlp + attn + pre)
    pre, attn, mlp, post = SnapshotRunner(llama, hooks, "llama").capture(input_ids, mask)
    block, mid = llama.layers[1], pre + attn
    with torch.no_grad():
        assert torch.equal(mlp, block.mlp(block.post_attention_layernorm(mid)))
    assert torch.equal(post, mid + mlp)


def test_three_layers_in_one_forward_equal_three_runs_and_hidden_states_and_stop_at_the_deepest() -> None:
    """Hooks at three blocks of one model, read in one forward: each equals its own one-hook run and HF's
    output_hidden_states; nothing after the deepest hook runs."""
    model = _tiny("llama")
    input_ids, mask = _inputs()
    hooks = [HookPoint(0, "post"), HookPoint(1, "mlp_out"), HookPoint(2, "pre")]
    calls: list[str] = []
    watched = {"layers.2.self_attn": model.layers[2].self_attn, "norm": model.norm}
    handles = [module.register_forward_hook(lambda *_, name=name: calls.append(name))
               for name, module in watched.items()]
    try:
        together = SnapshotRunner(model, hooks, "llama").capture(input_ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []
    alone = [SnapshotRunner(model, hook, "llama")(input_ids, mask) for hook in hooks]
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for one, other in zip(together, alone, strict=True):
        assert torch.equal(one, other)
    assert torch.equal(together[0], hidden[1]) and torch.equal(together[2], hidden[2])
    with pytest.raises(TypeError, match="use capture"):
        SnapshotRunner(model, hooks, "llama")(input_ids, mask)


def test_hooks_are_parsed_named_and_refused_by_name() -> None:
    assert HookPoint.parse("blocks.3.hook_attn_out") == HookPoint(3, "attn_out")
    assert HookPoint.parse("blocks.3.hook_mlp_out").name == "blocks.3.hook_mlp_out"
    assert HookPoint.parse("blocks.0.hook_resid_pre").name == "blocks.0.hook_resid_pre"
    with pytest.raises(ConfigError, match=r"sources.hooks\[1\]='blocks.2.hook_mlp_in'"):
        RunConfig(sources=SourcesConfig(kind="toy", hooks=["blocks.0.hook_resid_post", "blocks.2.hook_mlp_in"]),
                  output_dir="x").validate()


@pytest.mark.parametrize(("hooks", "message"), [
    (["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"], "lists blocks.0.hook_resid_post after"),
    (["blocks.0.hook_mlp_out", "blocks.0.hook_attn_out"], "lists blocks.0.hook_attn_out after"),
    (["blocks.0.hook_resid_post", "blocks.0.hook_resid_post"], "each\\s+once"),
])
def test_hooks_out_of_forward_order_or_repeated_are_refused(hooks: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig(sources=SourcesConfig(kind="toy", hooks=hooks), output_dir="x").validate()


def test_sublayer_hooks_on_a_model_without_sublayers_are_refused_before_loading() -> None:
    mamba = AutoConfig.for_model("mamba", num_hidden_layers=2)
    cfg = SourcesConfig(paths=["x"], hooks=["blocks.0.hook_resid_post", "blocks.1.hook_attn_out"])
    with pytest.raises(ConfigError, match=r"blocks.1.hook_attn_out: snapshot 's' is a mamba model"):
        _check_hooks(cfg, mamba, SnapshotSpec("s", "x"))
    with pytest.raises(ConfigError, match=r"sources.hooks=blocks.4.hook_resid_pre: snapshot 's' has only 2 blocks"):
        _check_hooks(SourcesConfig(paths=["x"], hooks=["blocks.4.hook_resid_pre"]), mamba, SnapshotSpec("s", "x"))


def test_sources_of_several_hooks_are_named_laid_out_and_placed_on_their_axis(tiny_snapshots: list) -> None:
    """Layers of one snapshot: named after their hooks, on a `layer` axis; a product of snapshots and hooks:
    `<snapshot>:<hook>`, snapshot-major, on a `source` axis; one snapshot's runner reads all its hooks."""
    paths = [str(snapshot.path) for snapshot in tiny_snapshots]
    layers = describe_sources(SourcesConfig(paths=paths[-1:], hooks=["blocks.0.hook_resid_post",
                                                                      "blocks.1.hook_resid_post"]))
    assert [spec.name for spec in layers.specs] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert layers.axis == "layer" and [spec.layer for spec in layers.specs] == [0, 1]
    assert {spec.snapshot_name for spec in layers.specs} == {"step12"}
    product_cfg = SourcesConfig(paths=paths[:2], hooks=["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"])
    product = describe_sources(product_cfg)
    assert [spec.name for spec in product.specs] == ["step0:blocks.1.hook_attn_out", "step0:blocks.1.hook_mlp_out",
                                                     "step4:blocks.1.hook_attn_out", "step4:blocks.1.hook_mlp_out"]
    assert product.axis == "source" and configured_snapshot_names(product_cfg) == [s.name for s in product.specs]
    runners = load_runners(product_cfg, product.specs[1:], torch.device("cpu"))  # a share cutting a snapshot
    assert [(runner.name, [hook.name for hook in runner.hooks]) for runner in runners] == [
        ("step0", ["blocks.1.hook_mlp_out"]), ("step4", ["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"])]
    one_hook = describe_sources(SourcesConfig(paths=paths, hook="blocks.1.hook_mlp_out"))
    assert one_hook.axis == "step" and [spec.name for spec in one_hook.specs] == ["step0", "step4", "step12"]


def test_a_cross_layer_crosscoder_trains_end_to_end_and_its_report_reads_layers(
        tiny_snapshots: list, toy_cache: Path, tmp_path: Path, clean_process_env: None) -> None:
    """Two layers of the last snapshot, fed by an activation worker: trained, exported with the layer axis, each
    layer spliced in alone by the export's eval (the other's hook untouched), and the report's plots and tables
    say layer."""
    cfg = tiny_run_config(toy_cache, tmp_path / "run")
    cfg.sources.kind, cfg.sources.paths = "hf", [str(tiny_snapshots[-1].path)]
    cfg.sources.hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    cfg.data.workers.num_workers, cfg.trainer.total_tokens, cfg.trainer.eval_tokens = 1, 128 * 20, 128
    result = train(cfg)
    assert result.final_metrics["explained_variance/mean"] > 0.2
    evaluated = json.loads((result.dictionary_dir / EVAL_FILE).read_text())["per_snapshot"]
    assert list(evaluated) == cfg.sources.hooks
    for figures in evaluated.values():
        assert figures["ce_spliced"] < figures["ce_zero"] and figures["ce_clean"] <= figures["ce_zero"], figures
    assert evaluated["blocks.0.hook_resid_post"]["ce_zero"] != evaluated["blocks.1.hook_resid_post"]["ce_zero"]
    model, meta = load_dictionary(result.dictionary_dir)
    assert meta.source_axis == "layer" and meta.source_positions == [0, 1] and model.n_sources == 2
    assert meta.hook == "blocks.0.hook_resid_post,blocks.1.hook_resid_post"
    report = analyze_dictionary(result.dictionary_dir)
    assert report.evolution.axis == "layer" and report.evolution.steps == [0, 1]
    html = report.report.read_text()
    assert "<h2>Per layer</h2>" in html and "first layer with n" in html


def test_a_cache_of_several_hooks_trains_and_refuses_other_hooks(tiny_snapshots: list, toy_cache: Path,
                                                                  tmp_path: Path, clean_process_env: None) -> None:
    """`crosscoder-cache` of two hooks of two snapshots (4 sources, one forward per snapshot), then training on
    it; the same cache for another hook list is refused, naming the hooks."""
    from crosscoder.cli.cache import build_cache
    from crosscoder.data.cache_reader import read_manifest

    cfg = tiny_run_config(toy_cache, tmp_path / "run")
    cfg.sources.kind, cfg.sources.paths = "hf", [str(snapshot.path) for snapshot in tiny_snapshots[1:]]
    cfg.sources.hooks = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]
    cfg.data.cache.dir, cfg.data.workers.num_workers, cfg.trainer.total_tokens = str(tmp_path / "acts"), 0, 128 * 10
    build_cache(cfg, log=lambda _: None)
    names = [source["name"] for source in read_manifest(tmp_path / "acts").identity["sources"]]
    assert names == ["step4:blocks.0.hook_mlp_out", "step4:blocks.1.hook_resid_pre", "step12:blocks.0.hook_mlp_out",
                     "step12:blocks.1.hook_resid_pre"]
    result = train(cfg)
    _, meta = load_dictionary(result.dictionary_dir)
    assert meta.source_names == names and meta.source_axis == "source"
    cfg.output_dir, cfg.sources.hooks = str(tmp_path / "other"), ["blocks.0.hook_attn_out", "blocks.1.hook_resid_pre"]
    with pytest.raises(ConfigError, match=r"snapshot 0 has name='step4:blocks.0.hook_mlp_out' in the cache"):
        train(cfg)
