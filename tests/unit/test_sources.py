"""Sources: hook parsing, the hooked forward (and that it stops early), snapshot resolution and checks (tokenizer,
width, causal decoders only, finite weights)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertLMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from crosscoder.config import SourcesConfig
from crosscoder.data.kinds import configured_snapshot_names, describe_sources, load_sources, resolve_snapshots
from crosscoder.data.planted import planted_specs
from crosscoder.errors import ConfigError
from crosscoder.sources.causal_check import check_causal_decoder
from crosscoder.sources.hooks import SnapshotRunner
from crosscoder.sources.models import HookPoint
from crosscoder.sources.spec import SnapshotSpec
from crosscoder.toy.tiny_lm import train_tokenizer

CPU = torch.device("cpu")


def _load(path: Path) -> nn.Module:
    """The base model of a snapshot, loaded directly with transformers (the reference)."""
    transformers.logging.set_verbosity_error()
    return AutoModel.from_pretrained(path).eval()


def _inputs(seed: int = 0, batch: int = 2, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 512, (batch, length), generator=generator)
    input_ids[:, 0] = 0  # BOS
    return input_ids, torch.ones_like(input_ids)


# ---- HookPoint ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hook", "layer", "position"),
    [("blocks.0.hook_resid_post", 0, "post"), ("blocks.1.hook_resid_pre", 1, "pre"),
     ("blocks.12.hook_resid_post", 12, "post")],
)
def test_hook_point_parses_known_hooks(hook: str, layer: int, position: str) -> None:
    """Valid hook strings give the layer index and the pre/post position."""
    assert HookPoint.parse(hook) == HookPoint(layer=layer, position=position)


@pytest.mark.parametrize(
    "hook",
    ["blocks.1.hook_resid_mid", "blocks.x.hook_resid_post", "layers.1.hook_resid_post",
     "blocks.1.hook_resid_post.x", "", "blocks.-1.hook_resid_pre"],
)
def test_hook_point_rejects_unknown_hooks_naming_them(hook: str) -> None:
    """An unknown hook string is a ConfigError whose message quotes the string."""
    with pytest.raises(ConfigError, match=re.escape(repr(hook))):
        HookPoint.parse(hook)


# ---- SnapshotRunner -------------------------------------------------------------------------------------


def test_runner_matches_hidden_states(tiny_snapshots: list) -> None:
    """resid_pre of block L is hidden_states[L]; resid_post of block L is hidden_states[L + 1].

    HF's last hidden state has the final layer norm applied, so resid_post of the last block is checked as
    final_layer_norm(captured) == hidden_states[-1].
    """
    model = _load(tiny_snapshots[-1].path)
    input_ids, attention_mask = _inputs()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hidden = out.hidden_states
    n_blocks = model.config.num_hidden_layers
    assert len(hidden) == n_blocks + 1
    for layer in range(n_blocks):
        pre = SnapshotRunner(model, HookPoint(layer, "pre"))(input_ids, attention_mask)
        torch.testing.assert_close(pre, hidden[layer], rtol=0, atol=1e-6)
        post = SnapshotRunner(model, HookPoint(layer, "post"))(input_ids, attention_mask)
        assert post.shape == (2, 12, model.config.hidden_size)
        if layer + 1 < n_blocks:
            torch.testing.assert_close(post, hidden[layer + 1], rtol=0, atol=1e-6)
        else:
            with torch.no_grad():
                torch.testing.assert_close(model.final_layer_norm(post), hidden[-1], rtol=0, atol=1e-5)
    # The layers really differ, so the comparisons above pin the layer index down.
    assert not torch.allclose(hidden[0], hidden[1], atol=1e-3)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
def test_runner_stops_the_forward_after_the_hooked_block(tiny_snapshots: list, hook: str) -> None:
    """Nothing after the hook point runs: not block 1's sublayers, not the final layer norm."""
    model = _load(tiny_snapshots[0].path)
    calls: list[str] = []
    watched = {
        "layers.1.attention": model.layers[1].attention,
        "layers.1.mlp": model.layers[1].mlp,
        "final_layer_norm": model.final_layer_norm,
    }
    handles = [module.register_forward_hook(lambda *_, name=name: calls.append(name))
               for name, module in watched.items()]
    try:
        runner = SnapshotRunner(model, HookPoint.parse(hook), "step0")
        runner(*_inputs())
        assert calls == []
        # The watchers do fire on a full forward pass, so an empty list above means "never ran".
        with torch.no_grad():
            model(*_inputs())
        assert set(calls) == set(watched)
    finally:
        for handle in handles:
            handle.remove()
    # The runner's own hook is removed after each call: a plain forward is not interrupted.
    assert model.layers[0]._forward_hooks == {} and model.layers[1]._forward_pre_hooks == {}


def test_runner_rejects_a_layer_beyond_the_model(tiny_snapshots: list) -> None:
    """A hook past the last block is a ConfigError naming the hook and the snapshot."""
    model = _load(tiny_snapshots[0].path)
    with pytest.raises(ConfigError, match=r"blocks\.2\.hook_resid_post.*'step0'.*only 2 blocks"):
        SnapshotRunner(model, HookPoint.parse("blocks.2.hook_resid_post"), "step0")
    with pytest.raises(ConfigError, match=r"blocks\.7\.hook_resid_pre"):
        SnapshotRunner(model, HookPoint.parse("blocks.7.hook_resid_pre"), "step0")


# ---- resolve_snapshots / load_sources --------------------------------------------------------------------


def test_resolve_reads_steps_from_names(tiny_snapshots: list) -> None:
    """`stepN` directory / revision names give the training step; explicit steps win; no step is None."""
    paths = [str(s.path) for s in tiny_snapshots]
    specs = resolve_snapshots(SourcesConfig(paths=paths))
    assert [s.step for s in specs] == [0, 4, 12]
    assert [s.name for s in specs] == ["step0", "step4", "step12"]
    assert [s.path for s in specs] == paths
    assert [s.step for s in resolve_snapshots(SourcesConfig(paths=paths, steps=[5, 6, 7]))] == [5, 6, 7]

    hub = resolve_snapshots(SourcesConfig(model="org/model", revisions=["step1000", "step_20", "main"]))
    assert [(s.path, s.revision, s.step) for s in hub] == [
        ("org/model", "step1000", 1000), ("org/model", "step_20", 20), ("org/model", "main", None)
    ]
    no_revision = resolve_snapshots(SourcesConfig(model="org/model"))
    assert [(s.name, s.revision, s.step) for s in no_revision] == [("main", None, None)]


def test_configured_names_are_the_names_the_snapshots_resolve_to(tiny_snapshots: list, toy_cache: Path) -> None:
    """What SAE-Track's chain walks before anything is built equals what the run later describes."""
    from tests.helpers import TINY_TOY

    paths = SourcesConfig(paths=[str(s.path) for s in tiny_snapshots])
    hub = SourcesConfig(model="org/model", revisions=["step1000", "main"])
    toy = SourcesConfig(kind="toy")
    toy.toy.cache_dir, toy.toy.snapshot_steps = str(toy_cache), list(TINY_TOY["snapshot_steps"])
    toy.toy.hidden_size, toy.toy.num_layers = TINY_TOY["hidden_size"], TINY_TOY["num_layers"]
    toy.toy.train_steps = TINY_TOY["train_steps"]
    for cfg in (paths, hub, toy, SourcesConfig(model="org/model")):
        assert configured_snapshot_names(cfg) == [s.name for s in resolve_snapshots(cfg, log=lambda _: None)]
    planted = SourcesConfig(kind="planted")
    assert configured_snapshot_names(planted) == [s.name for s in planted_specs(planted)]


def test_missing_snapshot_dir_in_paths_is_named(tiny_snapshots: list, tmp_path: Path) -> None:
    """A sources.paths entry that is not a directory is a ConfigError naming that entry."""
    missing = str(tmp_path / "no-such-step100")
    cfg = SourcesConfig(paths=[str(tiny_snapshots[0].path), missing])
    with pytest.raises(ConfigError, match=r"sources\.paths\[1\].*" + re.escape(missing)):
        resolve_snapshots(cfg)
    with pytest.raises(ConfigError, match=re.escape(missing)):
        load_sources(cfg, CPU, log=lambda _: None)


def test_missing_local_model_dir_is_named() -> None:
    """sources.model that looks like a local path but does not exist is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"sources\.model='/nonexistent'"):
        resolve_snapshots(SourcesConfig(model="/nonexistent", revisions=["step0"]))
    with pytest.raises(ConfigError, match="/nonexistent"):
        load_sources(SourcesConfig(model="/nonexistent"), CPU, log=lambda _: None)


def test_incomplete_snapshot_dir_is_named(tiny_snapshots: list, tmp_path: Path) -> None:
    """An existing directory without a tokenizer, or with a tokenizer but no model, is a ConfigError naming it."""
    reference = str(tiny_snapshots[0].path)
    empty = tmp_path / "empty-step5"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"tokenizer of snapshot '" + re.escape(str(empty)) + "'"):
        load_sources(SourcesConfig(paths=[reference, str(empty)]), CPU, log=lambda _: None)
    tokenizer_only = tmp_path / "tokenizer-only-step6"
    AutoTokenizer.from_pretrained(reference).save_pretrained(tokenizer_only)
    with pytest.raises(ConfigError, match=r"cannot load snapshot '" + re.escape(str(tokenizer_only)) + "'"):
        load_sources(SourcesConfig(paths=[reference, str(tokenizer_only)]), CPU, log=lambda _: None)


def test_hub_revision_offline_is_named() -> None:
    """Under HF_HUB_OFFLINE a hub id that is not cached fails as a ConfigError naming id and revision."""
    cfg = SourcesConfig(model="crosscoder-tests/no-such-model", revisions=["step1234"])
    with pytest.raises(ConfigError, match=r"'crosscoder-tests/no-such-model' at revision 'step1234'"):
        load_sources(cfg, CPU, log=lambda _: None)


def test_width_mismatch_is_rejected(tiny_snapshots: list, tmp_path: Path) -> None:
    """Two snapshots with the same tokenizer but different hidden sizes: ConfigError about the width."""
    reference = tiny_snapshots[0].path
    tokenizer = AutoTokenizer.from_pretrained(reference)
    other = tmp_path / "wide-step7"
    config = GPTNeoXConfig(
        vocab_size=512, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPTNeoXForCausalLM(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    cfg = SourcesConfig(paths=[str(reference), str(other)], hook="blocks.1.hook_resid_pre")
    with pytest.raises(ConfigError, match=r"width 48.*has 32.*width") as error:
        load_sources(cfg, CPU, log=lambda _: None)
    assert str(other) in str(error.value)


def test_tokenizer_mismatch_is_rejected(tiny_snapshots: list, tmp_path: Path) -> None:
    """A snapshot whose tokenizer was trained on other text: ConfigError about the tokenizer, naming it."""
    other = tmp_path / "retokenized-step4"
    shutil.copytree(tiny_snapshots[1].path, other)
    texts = ["Quantum zebras juggle xylophones under violet moons; 1234567890!"] * 50
    train_tokenizer(texts, vocab_size=300).save_pretrained(other)
    cfg = SourcesConfig(paths=[str(tiny_snapshots[0].path), str(other)])
    with pytest.raises(ConfigError, match="different tokenizer") as error:
        load_sources(cfg, CPU, log=lambda _: None)
    assert str(other) in str(error.value)


def test_load_sources_loads_every_snapshot(tiny_snapshots: list) -> None:
    """The happy path: one runner per snapshot, the shared width, the hook and the steps."""
    cfg = SourcesConfig(paths=[str(s.path) for s in tiny_snapshots], hook="blocks.1.hook_resid_pre")
    loaded = load_sources(cfg, CPU, log=lambda _: None)
    assert len(loaded.runners) == 3 and loaded.d_model == 32 and loaded.hook == cfg.hook
    assert [s.step for s in loaded.specs] == [0, 4, 12]
    assert all(r.hook == HookPoint(1, "pre") for r in loaded.runners)
    assert all(not p.requires_grad for r in loaded.runners for p in r.model.parameters())
    assert not any(r.model.training for r in loaded.runners)


def test_trust_remote_code_is_off_by_default(tiny_snapshots: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default SourcesConfig does not trust remote code, and that is what reaches transformers."""
    assert SourcesConfig().trust_remote_code is False
    seen: list[Any] = []

    def spy(original: Any) -> Any:  # noqa: ANN401
        def wrapper(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            seen.append(kwargs.get("trust_remote_code", "missing"))
            return original(*args, **kwargs)

        return staticmethod(wrapper)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy(AutoTokenizer.from_pretrained))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy(AutoModel.from_pretrained))
    load_sources(SourcesConfig(paths=[str(tiny_snapshots[0].path)]), CPU, log=lambda _: None)
    assert seen == [False, False]


def test_snapshots_with_the_same_name_are_refused(tiny_snapshots: list, tmp_path: Path) -> None:
    """`runA/step4` and `runB/step4` would write each other's metrics, W&B keys and feature-table columns."""
    paths = []
    for run in ("runA", "runB"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "step4").symlink_to(tiny_snapshots[1].path, target_is_directory=True)
        paths.append(str(tmp_path / run / "step4"))
    with pytest.raises(ConfigError, match=r"runA/step4.*runB/step4.*are both named 'step4'"):
        resolve_snapshots(SourcesConfig(paths=paths))
    with pytest.raises(ConfigError, match="both named 'step100'"):
        resolve_snapshots(SourcesConfig(model="org/model", revisions=["step100", "step100"]))


def test_snapshots_out_of_training_order_are_refused(tiny_snapshots: list) -> None:
    """The snapshot axis is read as time: steps that go backwards (from names or given) are refused, naming
    both snapshots; unknown steps (a revision like `main`) leave the order to the user."""
    paths = [str(s.path) for s in tiny_snapshots]  # step0, step4, step12
    with pytest.raises(ConfigError, match=r"'step4' \(step 4\) is listed after 'step12' \(step 12\)"):
        resolve_snapshots(SourcesConfig(paths=[paths[0], paths[2], paths[1]]))
    with pytest.raises(ConfigError, match=r"the steps as listed are \[5, 5, 7\]"):
        resolve_snapshots(SourcesConfig(paths=paths, steps=[5, 5, 7]))
    hub = resolve_snapshots(SourcesConfig(model="org/model", revisions=["step1000", "main", "step10"]))
    assert [s.step for s in hub] == [1000, None, 10]


# ---- causal decoders only, finite weights -----------------------------------------------------------------

DECODER_TYPES = ["gpt_neox", "gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi",
                 "phi3", "opt", "bloom", "falcon", "gptj", "gpt_neo", "olmo", "olmo2", "stablelm", "starcoder2",
                 "cohere", "codegen", "gpt_bigcode", "granite", "mamba"]


def _snapshot_of(model: nn.Module, directory: Path, tokenizer_from: Path) -> Path:
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_decoder_only_causal_lms_pass_the_causal_check(model_type: str, tmp_path: Path) -> None:
    """HF's own config of each decoder family, saved as its causal LM saves it (and as a base model, and with no
    `architectures`), read back as describe_sources reads it: accepted."""
    for architectures in ([MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]], [MODEL_MAPPING_NAMES[model_type]], None):
        config = AutoConfig.for_model(model_type)
        config.architectures = architectures
        config.save_pretrained(tmp_path)
        check_causal_decoder(AutoConfig.from_pretrained(tmp_path), SnapshotSpec("step0", str(tmp_path)))


def test_encoders_and_encoder_decoders_are_refused_naming_snapshot_and_architecture(
    tiny_snapshots: list, tmp_path: Path
) -> None:
    """Random-init BERT (bidirectional) and T5 (encoder-decoder) snapshots of the toy's width and tokenizer are
    refused by describe_sources before any weights load; BERT configured as a decoder (is_decoder) is causal."""
    reference = tiny_snapshots[0].path
    vocab = len(AutoTokenizer.from_pretrained(reference))
    shape = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    bert = _snapshot_of(BertForMaskedLM(BertConfig(**shape)), tmp_path / "bert-step1", reference)
    t5 = _snapshot_of(T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64,
                                                            num_layers=2, num_heads=4)),
                      tmp_path / "t5-step2", reference)
    for path, match in ((bert, r"architecture BertForMaskedLM\) is a bidirectional encoder"),
                        (t5, r"architecture T5ForConditionalGeneration\) is an encoder-decoder model")):
        with pytest.raises(ConfigError, match=match) as error:
            describe_sources(SourcesConfig(paths=[str(reference), str(path)]), log=lambda _: None)
        assert f"snapshot {path.name!r}" in str(error.value) and "decoder-only causal LM" in str(error.value)
    decoder = _snapshot_of(BertLMHeadModel(BertConfig(**shape, is_decoder=True)), tmp_path / "bert-dec-step3",
                           reference)
    describe_sources(SourcesConfig(paths=[str(reference), str(decoder)]), log=lambda _: None)
    no_architectures = BertConfig(**shape)
    with pytest.raises(ConfigError, match=r"model_type 'bert'\) is a bidirectional encoder"):
        check_causal_decoder(no_architectures, SnapshotSpec("x", "x"))
    vision = AutoConfig.for_model("vit")
    with pytest.raises(ConfigError, match=r"model_type 'vit'\) is not a causal language model type"):
        check_causal_decoder(vision, SnapshotSpec("x", "x"))
    remote = AutoConfig.for_model("gpt2")
    remote.architectures = ["MyCustomForMaskedLM"]
    with pytest.raises(ConfigError, match=r"architecture MyCustomForMaskedLM\) is not a causal language model"):
        check_causal_decoder(remote, SnapshotSpec("x", "x"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_snapshot_with_non_finite_weights_is_refused_naming_the_parameter(
    tiny_snapshots: list, tmp_path: Path, bad: float
) -> None:
    reference = tiny_snapshots[1].path
    model = GPTNeoXForCausalLM.from_pretrained(reference)
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_h_to_4h.weight[3, 5] = bad
    broken = _snapshot_of(model, tmp_path / "diverged-step4", reference)
    cfg = SourcesConfig(paths=[str(tiny_snapshots[0].path), str(broken)], hook="blocks.1.hook_resid_pre")
    with pytest.raises(ConfigError, match=r"'layers\.1\.mlp\.dense_h_to_4h\.weight' holds 1 NaN/inf") as error:
        load_sources(cfg, CPU, log=lambda _: None)
    assert str(broken) in str(error.value)
