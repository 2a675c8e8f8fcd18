"""Issue 23's bad inputs, each through the real entry point: a mistake is one line on stderr naming its cause and
exit 2, before anything heavy loads; nothing silently wrong is accepted."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, tiny_overrides, train_cli, write_activation_folder

pytestmark = pytest.mark.usefixtures("clean_process_env")


def _rows(n: int, n_sources: int = 3, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, n_sources, d, generator=torch.Generator().manual_seed(seed))


def _files_run(folder: Path) -> list[str]:
    return ["sources=files", f"sources.files.dir={folder}", "crosscoder.dict_size=16", "trainer.batch_size=64",
            "trainer.total_tokens=640", "tracking=disabled", "deepspeed=zero0"]


def test_files_listed_out_of_training_order_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Case 2: steps out of order in sources.json are refused, as they are for HF snapshots; in order they run."""
    steps = [0, 1000, 500]
    folder = write_activation_folder(tmp_path / "acts", _rows(1024),
                                     [{"name": f"step{step}", "step": step} for step in steps])
    code, _, err = train_cli(_files_run(folder), tmp_path / "run", monkeypatch, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "'step500' (step 500) is listed after 'step1000' (step 1000)" in err
    assert "training order" in err and not (tmp_path / "run").exists()

    in_order = write_activation_folder(tmp_path / "ordered", _rows(1024),
                                       [{"name": f"step{step}", "step": step} for step in sorted(steps)])
    code, out, err = train_cli(_files_run(in_order), tmp_path / "ordered-run", monkeypatch, capsys)
    assert code == 0, err
    assert "recipe for relu:" in out


def test_an_activation_folder_too_small_for_the_run_is_named_with_what_it_lacks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Cases 5 and 10: fewer rows than the steps need, or than the input-scale estimation reads, is one line
    naming the folder (not data.cache.dir) and what needs the rows, exit 2, not a StopIteration."""
    folder = write_activation_folder(tmp_path / "acts", _rows(400), [{"name": f"L{layer}", "layer": layer}
                                                                     for layer in range(3)])
    code, _, err = train_cli(_files_run(folder), tmp_path / "run", monkeypatch, capsys)  # 640 tokens
    assert code == 2, err
    assert err.count("\n") == 1 and f"the activation folder sources.files.dir='{folder}' holds 400 tokens" in err
    assert "trainer.total_tokens=640 needs 640 per rank" in err and "cache" not in err

    code, _, err = train_cli([*_files_run(folder), "trainer.total_tokens=128"], tmp_path / "run", monkeypatch, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "holds 400 tokens" in err
    assert "the input-scale estimation needs crosscoder.norm_estimation_batches=8 batches of 64" in err
    code, _, err = train_cli([*_files_run(folder), "trainer.total_tokens=128", "crosscoder.norm_estimation_batches=4"],
                             tmp_path / "run", monkeypatch, capsys)
    assert code == 0, err


def _hf_snapshots(folder: Path, tiny_snapshots: list, build: Callable[[int, int], object]) -> list[Path]:
    """Two random-init HF checkpoints (`build(vocab_size, seed)`) named step0 and step1, with the toy
    tokenizer: local snapshots as `sources.paths` takes them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_snapshots[0].path)
    paths = []
    for step in (0, 1):
        path = folder / f"step{step}"
        build(len(tokenizer), step).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def _gpt2(vocab_size: int, seed: int, width: int = 32) -> object:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=width, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def _gemma3_multimodal(vocab_size: int, seed: int) -> object:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=vocab_size, max_position_embeddings=64)
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14)
    return Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))


def _hf_run(paths: list[Path], seq_len: int) -> list[str]:
    return ["sources.kind=hf", f"sources.paths=[{','.join(str(path) for path in paths)}]",
            "sources.hook=blocks.1.hook_resid_pre", f"data.seq_len={seq_len}", "data.model_batch_size=4",
            "data.toy_documents=100", "data.shuffle.buffer_tokens=256", "data.workers.num_workers=0",
            "crosscoder.dict_size=16", "crosscoder.norm_estimation_batches=2", "trainer.batch_size=64",
            "trainer.total_tokens=256", "trainer.eval_tokens=0", "tracking=disabled", "deepspeed=zero0"]


def test_a_sequence_longer_than_the_models_positions_is_refused_naming_the_limit(
        tiny_snapshots: list, toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Case 7: GPT-2's learned positions (an IndexError inside the model before) and the toy GPT-NeoX's rotary
    ones (run silently past the trained context before) are both refused, naming the limit; at the limit it runs."""
    gpt2 = _hf_snapshots(tmp_path / "gpt2", tiny_snapshots, _gpt2)
    code, _, err = train_cli(_hf_run(gpt2, 17), tmp_path / "run", monkeypatch, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "data.seq_len=17 is longer than the 16 positions" in err
    assert "set data.seq_len <= 16" in err
    code, _, err = train_cli(_hf_run(gpt2, 16), tmp_path / "gpt2-run", monkeypatch, capsys)
    assert code == 0, err

    overrides = [o for o in tiny_overrides(toy_cache) if not o.startswith(("tracking=", "data.seq_len="))]
    code, _, err = train_cli([*overrides, "data.seq_len=65", "tracking=disabled"], tmp_path / "toy-run",
                             monkeypatch, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "data.seq_len=65 is longer than the 64 positions" in err


def test_a_multimodal_checkpoint_is_read_through_its_language_model(
        tiny_snapshots: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Case 6: Gemma 3's ForConditionalGeneration keeps its text settings in a nested config and has a vision
    tower with as many blocks as its language model: the width, the positions and the hooked blocks are the
    language model's (AttributeError on hidden_size before)."""
    from crosscoder.dictionary.io import read_meta
    from crosscoder.sources.hooks import find_blocks

    paths = _hf_snapshots(tmp_path / "gemma3", tiny_snapshots, _gemma3_multimodal)
    model = _gemma3_multimodal(300, 0)
    assert find_blocks(model) is model.model.language_model.layers  # not the vision tower's two blocks
    code, _, err = train_cli(_hf_run(paths, 65), tmp_path / "refused", monkeypatch, capsys)
    assert code == 2 and "longer than the 64 positions" in err, err
    code, _, err = train_cli(_hf_run(paths, 16), tmp_path / "run", monkeypatch, capsys)
    assert code == 0, err
    meta = read_meta(tmp_path / "run" / "dictionary")
    assert meta.d_model == 32 and meta.source_names == ["step0", "step1"]


def test_tracking_online_without_credentials_is_refused_before_anything_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Case 8: no W&B key anywhere W&B looks is one line and exit 2 at start-up (a W&B traceback after the
    snapshots had loaded before). W&B is pointed at a closed local port: nothing leaves this machine."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    run = ["sources=planted", "crosscoder.dict_size=16", "trainer.batch_size=64", "trainer.total_tokens=128",
           "tracking=online"]
    import wandb

    wandb.teardown()  # W&B keeps its settings process-wide: read them from this test's environment, ...
    try:
        code, out, err = train_cli(run, tmp_path / "run", monkeypatch, capsys)
    finally:
        wandb.teardown()  # ... and the next test's from its own (WANDB_MODE=offline)
    assert code == 2, err
    assert err.count("\n") == 1 and "tracking=online needs W&B credentials" in err and "wandb login" in err
    assert "input scales" not in out and not (tmp_path / "run").exists()


def test_a_resume_on_a_changed_activation_folder_is_refused_naming_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Cases 1 and 11: one byte of a shard changed where the folder's fingerprint does not sample (so the
    fingerprint cannot tell) is refused on resume, naming the folder and the file, not "a different snapshot"; a
    change the fingerprint sees is named as the folder's too; the unchanged folder resumes."""
    from crosscoder.data.files import fingerprint_regions, folder_fingerprint, scan_folder

    folder = write_activation_folder(tmp_path / "acts", _rows(4096, seed=1),
                                     [{"name": f"L{layer}", "layer": layer} for layer in range(3)])
    run = [*_files_run(folder), "trainer.state_every=4", "trainer.total_tokens=640"]
    code, _, err = train_cli(run, tmp_path / "run", monkeypatch, capsys)
    assert code == 0, err
    code, out, err = train_cli([*run, "trainer.resume=auto"], tmp_path / "run", monkeypatch, capsys)
    assert code == 0 and "resumed from" in out, err

    shard = folder / "shard_001.safetensors"
    sampled = fingerprint_regions(shard.stat().st_size)
    offset = sampled[1][0] + sampled[1][1] + 64  # in the gap after the first sampled chunk of the body
    assert not any(start <= offset < start + length for start, length in sampled)
    before = folder_fingerprint(scan_folder(folder))
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x40  # one bit of one activation
    shard.write_bytes(bytes(data))
    assert folder_fingerprint(scan_folder(folder)) == before  # the fingerprint alone would accept it
    code, _, err = train_cli([*run, "trainer.resume=auto"], tmp_path / "run", monkeypatch, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and f"other activations in the folder {folder}: shard_001.safetensors changed" in err
    assert "snapshot" not in err

    (folder / "sources.json").write_text((folder / "sources.json").read_text().replace("resid_pre", "resid_post"))
    code, _, err = train_cli([*run, "trainer.resume=auto"], tmp_path / "run", monkeypatch, capsys)
    assert code == 2 and f"was made from other activations in the folder {folder} (fingerprint" in err, err


def test_a_snapshots_by_hooks_crosscoder_is_analysed_one_hook_at_a_time(
        tiny_snapshots: list, toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Case 4: attention and MLP outputs of 3 snapshots (6 sources, two axes). The analysis at export (logged to
    W&B) and crosscoder-analyze read each hook's 3 snapshots as the time axis, never the 6 sources as one;
    an analysis that can only read one axis (crosscoder-compare) refuses it with one line."""
    import json

    from crosscoder.analysis.report.by_hook import MixedAxesError
    from crosscoder.analysis.report.dictionary import load_evolution
    from crosscoder.cli import analyze as analyze_cli
    from crosscoder.cli import compare as compare_cli
    from tests.helpers import history_keys, single_wandb_run_file

    hooks = ["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"]
    overrides = [o for o in tiny_overrides(toy_cache) if not o.startswith("trainer.total_tokens=")]
    code, _, err = train_cli([*overrides, f"sources.hooks=[{','.join(hooks)}]", "trainer.total_tokens=512"],
                             tmp_path / "run", monkeypatch, capsys)
    assert code == 0, err
    dictionary = tmp_path / "run" / "dictionary"
    keys = history_keys(single_wandb_run_file(tmp_path / "run"))
    assert {f"analysis/{hook}/emerging_at/step{step}" for hook in hooks for step in (0, 4, 12)} <= keys
    assert not any(key.startswith("analysis/emerging_at/") for key in keys)  # no reading of the 6 as one axis

    with pytest.raises(MixedAxesError, match="snapshots x hooks"):
        load_evolution(dictionary)
    analyze_cli.main([str(dictionary)])
    out = capsys.readouterr().out
    assert "analysed one hook at a time" in out
    summary = json.loads((dictionary / "analysis" / "summary.json").read_text())
    assert summary["source_axis"] == "source" and list(summary["by_hook"]) == hooks
    for hook in hooks:
        per_hook = summary["by_hook"][hook]
        assert per_hook["snapshots"] == ["step0", "step4", "step12"] and per_hook["steps"] == [0, 4, 12]
        assert len(per_hook["emergence_counts"]) == 3
        assert (dictionary / "analysis" / hook / "report.html").is_file()
    index = (dictionary / "analysis" / "report.html").read_text()
    assert all(f'href="{hook}/report.html"' in index for hook in hooks)
    header = (dictionary / "analysis" / "features.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["hook", "feature"]

    with pytest.raises(SystemExit) as stopped:
        compare_cli.main([str(dictionary), str(dictionary), "--names", "a", "b", "--tokens", "0"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "snapshots x hooks crosscoder" in err


def test_what_the_snapshots_configs_refuse_is_refused_before_deepspeed_starts(
        tiny_snapshots: list, toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Case 12: a mistake the snapshots' configs show (a hook past the last block, a sequence past the positions)
    is refused before the accelerator and DeepSpeed start (on a fresh machine DeepSpeed first compiles its op:
    the error took 133 s to appear) and before the toy model is trained. A tripwire on the accelerator proves
    the order."""
    import crosscoder.training.trainer as trainer

    def tripwire(*_: object, **__: object) -> None:
        raise AssertionError("the accelerator started before the snapshots' configs were checked")

    monkeypatch.setattr(trainer, "build_accelerator", tripwire)
    gpt2 = _hf_snapshots(tmp_path / "gpt2", tiny_snapshots, _gpt2)
    code, _, err = train_cli(_hf_run(gpt2, 17), tmp_path / "run", monkeypatch, capsys)
    assert code == 2 and "data.seq_len=17 is longer than the 16 positions" in err, err
    code, _, err = train_cli([*_hf_run(gpt2, 16), "sources.hook=blocks.2.hook_resid_pre"], tmp_path / "run",
                             monkeypatch, capsys)
    assert code == 2 and "has only 2 blocks" in err, err
    fresh_cache = tmp_path / "no-toy-yet"
    overrides = [o for o in tiny_overrides(fresh_cache) if not o.startswith("tracking=")]
    code, _, err = train_cli([*overrides, "sources.hook=blocks.5.hook_resid_pre", "tracking=disabled"],
                             tmp_path / "run", monkeypatch, capsys)
    assert code == 2 and "the embedded toy model has only 2 blocks" in err, err
    assert not fresh_cache.exists()  # refused before the toy model was trained


def test_a_start_up_mistake_under_a_launch_is_said_once_by_rank_0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Case 9, the ranks' part: every rank of `accelerate launch` refuses a bad value alike, before the ranks talk;
    rank 0 prints the line, the others exit 2 silently (each printed it before). A mistake only one rank can see
    (after the ranks talk) is still printed by the rank that sees it."""
    from crosscoder.errors import ConfigError, same_on_every_rank

    bad = ["sources=planted", "data.workers.num_workers=-1", "tracking=disabled"]
    outcomes = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        outcomes[rank] = train_cli(bad, tmp_path / f"run{rank}", monkeypatch, capsys)
    assert outcomes["0"][0] == outcomes["1"][0] == 2
    assert outcomes["0"][2].count("\n") == 1 and "data.workers.num_workers=-1" in outcomes["0"][2]
    assert outcomes["1"][2] == ""

    with pytest.raises(ConfigError) as raised, same_on_every_rank():
        raise ConfigError("alike")
    assert raised.value.on_every_rank and not ConfigError("one rank's").on_every_rank


@pytest.mark.parametrize("tool", ["analyze", "compare", "eval", "match"])
def test_every_tools_bad_argument_or_missing_device_is_one_line(
        tool: str, dictionary_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every argument of the command-line tools is checked with one line and exit 2 (argparse printed its usage
    first), and a --device this machine lacks is refused at start-up, not when the first tensor moves."""
    import importlib

    main = importlib.import_module(f"crosscoder.cli.{tool}").main
    cases = [["--no-such-flag"], [str(dictionary_dir), "--threshold", "many"] if tool in ("compare", "match")
             else [str(dictionary_dir), "--tokens", "many"] if tool == "eval" else [str(dictionary_dir), "--max-rows",
                                                                                  "many"]]
    if tool != "match":
        inputs = [str(dictionary_dir)] * (2 if tool == "compare" else 1)
        cases.append([*inputs, "--device", "cuda:7"])
    for arguments in cases:
        with pytest.raises(SystemExit) as stopped:
            main(arguments)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.count("\n") == 1 and "usage:" not in err, err
        assert err.startswith(f"crosscoder-{tool}: ")
        if "--device" in arguments:
            assert "--device=cuda:7: this machine has" in err


def test_a_worker_device_this_machine_lacks_is_refused_at_start_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = train_cli(["sources=planted", "data.workers.device=cuda:7", "tracking=disabled"], tmp_path / "run",
                             monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "data.workers.device='cuda:7': this machine has" in err, err


def test_a_resume_on_changed_snapshot_weights_is_refused_naming_the_file(
        tiny_snapshots: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Exact identity of local snapshots: one bit of a weight file changed where the fingerprint does not sample
    (it reads ~1.6 MB per file) is refused on resume, naming the snapshot's file; unchanged, the run resumes."""
    from crosscoder.sources.fingerprint import directory_fingerprint, sampled_regions
    from crosscoder.sources.spec import SnapshotSpec

    paths = _hf_snapshots(tmp_path / "gpt2", tiny_snapshots, lambda vocab, seed: _gpt2(vocab, seed, width=256))
    run = [*_hf_run(paths, 16), "trainer.state_every=2"]
    code, _, err = train_cli(run, tmp_path / "run", monkeypatch, capsys)
    assert code == 0, err
    code, out, err = train_cli([*run, "trainer.resume=auto"], tmp_path / "run", monkeypatch, capsys)
    assert code == 0 and "resumed from" in out, err

    weights = paths[1] / "model.safetensors"
    sampled = sampled_regions(weights.stat().st_size)
    offset = sampled[1][0] + sampled[1][1] + 1024  # after the first sampled chunk past the head
    assert len(sampled) > 1 and not any(start <= offset < start + length for start, length in sampled)
    spec = SnapshotSpec(name="step1", path=str(paths[1]))
    before = directory_fingerprint(paths[1], spec)
    data = bytearray(weights.read_bytes())
    data[offset] ^= 0x01
    weights.write_bytes(bytes(data))
    assert directory_fingerprint(paths[1], spec) == before  # the fingerprint alone would accept it
    code, _, err = train_cli([*run, "trainer.resume=auto"], tmp_path / "run", monkeypatch, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "was made from other snapshots: step1/model.safetensors changed" in err


def test_a_dictionary_whose_state_cannot_fit_the_rank_is_refused_before_it_is_allocated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A size that must fit is checked against the machine at start-up: 50 M latents over 8 planted sources of
    width 64 are 51 G parameters, whose weights, gradients and Adam state (~760 GiB) no rank here holds. One
    line naming the dictionary's size, what it needs and what the device has; nothing was allocated (the run
    would otherwise die in the allocator or be killed by the OOM killer)."""
    from crosscoder.parallel.memory import crosscoder_params, zero_bytes_per_rank

    code, _, err = train_cli(["sources=planted", "crosscoder.dict_size=50000000", "tracking=disabled"],
                             tmp_path / "run", monkeypatch, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "crosscoder.dict_size=50000000 over this rank's 8 sources of width 64" in err
    assert "GiB per rank" in err and ("this machine has" in err or "cuda" in err)
    # The formula it applies is bench/memory_bench.py's, checked there against measured allocations.
    params = crosscoder_params(8, 64, 50_000_000)
    assert f"is {params:,} parameters" in err
    assert sum(zero_bytes_per_rank(params, 1, 0, "fp32").values()) == 16 * params


@pytest.mark.parametrize(("arguments", "said"), [
    (["trainer.lr=-1"], "configuration error: trainer.lr=-1.0 must be > 0"),
    (["trainer.lrr=1"], "Key 'lrr' not in 'TrainerConfig'"),
    (["crosscoder=nope"], "Available options in 'crosscoder': batchtopk, jumprelu, relu, snapshot_jumprelu, topk"),
    (["sources.hook=blocks.9.hook_resid_pre"], "the embedded toy model has only 2 blocks"),
])
def test_crosscoder_launch_checks_the_config_before_any_rank_starts(
        arguments: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Case 9: `crosscoder-launch` (accelerate launch's arguments) composes and checks the run before launching:
    one line, exit 2, no rank started (no run directory), where `accelerate launch` printed the line once per
    rank, then its ChildFailedError report, and exited 1 (the launch tier checks the ranks' own refusals)."""
    from crosscoder.cli.launch import main

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["--config_file", str(REPO / "launch" / "cpu_2proc_zero2.yaml"), "-m", "crosscoder.train", *arguments,
              "sources.toy.num_layers=2", f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and err.startswith("crosscoder-launch: "), err
    assert said in err and not run_dir.exists()


def test_a_bad_command_line_is_one_line_from_every_hydra_entry_point(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown key, a group option that does not exist or a value of the wrong type: Hydra printed a report of
    several lines and exited 1; it is one line and exit 2, from crosscoder-train and crosscoder-cache alike."""
    from crosscoder.cli import cache

    for arguments, said in ((["trainer.lr=abc"], "Value 'abc' of type 'str' could not be converted to Float"),
                            (["crosscoder=nope"], "Could not find 'crosscoder/nope'")):
        code, _, err = train_cli(arguments, tmp_path / "run", monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and said in err and "HYDRA_FULL_ERROR" not in err, err
    monkeypatch.setattr(sys, "argv", ["crosscoder-cache", "data.cache.dirr=x", f"hydra.run.dir={tmp_path / 'c'}"])
    with pytest.raises(SystemExit) as stopped:
        cache.main()
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err == "crosscoder-cache: Could not override 'data.cache.dirr'; To append to " \
        "your config use +data.cache.dirr=x; Key 'dirr' not in 'CacheConfig'\n", err
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def test_a_cache_the_disk_cannot_hold_is_refused_before_any_snapshot_loads(
        tiny_snapshots: list, toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A setting naming a size that must fit: crosscoder-cache knows the cache's size before it starts (tokens x
    sources x width x dtype), so a cache larger than the free space is one line and exit 2, not a full disk hours
    later; nothing is written and no worker starts. The same command with a size that fits builds the cache."""
    from crosscoder.cli import cache

    folder = tmp_path / "acts"
    arguments = ["crosscoder-cache", *tiny_overrides(toy_cache), f"data.cache.dir={folder}",
                 f"hydra.run.dir={tmp_path / 'log'}"]
    monkeypatch.setattr(sys, "argv", [*arguments, "data.cache.tokens=100000000000000"])  # 3 x 32 x 4 B x 1e14
    with pytest.raises(SystemExit) as stopped:
        cache.main()
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and captured.err.count("\n") == 1, captured.err
    assert f"crosscoder-cache: configuration error: data.cache.dir={folder}: the cache needs about" in captured.err
    assert "(100,000,000,000,000 tokens x 3 sources x d=32 in float32)" in captured.err
    assert "activation worker" not in captured.out + captured.err and not folder.exists()
    monkeypatch.setattr(sys, "argv", [*arguments, "data.cache.tokens=256", "data.workers.num_workers=0"])
    cache.main()
    assert "activation cache" in capsys.readouterr().out and list(folder.glob("shard_*.safetensors"))


def test_snapshot_models_the_workers_cannot_hold_beside_the_dictionary_are_refused_before_loading(
        tiny_snapshots: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The memory check counts the snapshot models the rank's activation workers load on its device, from each
    snapshot's config on the meta device (no weight read): two GPT-2 configs of width 8192 and 40 blocks (32 G
    parameters each, 129 GB in fp32) are refused at start-up, where the dictionary alone (d=8192, 16 latents)
    fits; the weight files on disk stay small because they are never loaded. The count is exact: for a real
    snapshot it is the bytes of the model a worker loads."""
    from crosscoder.sources.models import load_snapshot_model, snapshot_model_bytes
    from crosscoder.sources.spec import SnapshotSpec

    paths = _hf_snapshots(tmp_path / "gpt2", tiny_snapshots, _gpt2)
    spec = SnapshotSpec(name="step0", path=str(paths[0]))
    loaded = load_snapshot_model(spec, "bfloat16")
    assert snapshot_model_bytes(spec, "bfloat16") == 2 * sum(
        tensor.numel() for tensor in (*loaded.parameters(), *loaded.buffers()))
    for path in paths:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "n_embd": 8192, "n_layer": 40}))
    code, out, err = train_cli(_hf_run(paths, 16), tmp_path / "run", monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "and 2 snapshot model(s) (float32) in the trainer process (no workers) (2" in err
    assert "do not fit: this machine has" in err and "lower data.workers.num_workers" in err


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="`datasets` is installed here")
def test_a_hub_dataset_without_the_datasets_package_is_refused_before_the_toy_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """data=pile needs the optional `datasets` package (the hub extra): refused at start-up naming the extra, not
    in every activation worker once the snapshots have loaded (here: before the toy LM is even trained)."""
    toy_cache = tmp_path / "toy"
    code, _, err = train_cli([*tiny_overrides(toy_cache), "data=pile", "data.seq_len=16"], tmp_path / "run",
                             monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "data.kind=hf_dataset (data.dataset='EleutherAI/the_pile_deduplicated') needs the `datasets`" in err
    assert not toy_cache.exists()


@pytest.mark.parametrize("method", ["independent", "sae_track"])
def test_a_stacks_dictionaries_are_each_evaluated_by_training_and_by_crosscoder_eval(
        method: str, tiny_snapshots: list, toy_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Case 14: a stack's dictionaries got no eval.json although trainer.eval_tokens was set (independent: never
    evaluated; SAE-Track: each link's evaluation skipped, its run configuration naming every snapshot), and
    crosscoder-eval called the stack "not an exported dictionary". Now every dictionary is evaluated on its own
    snapshot, in training and by crosscoder-eval given the stack."""
    from crosscoder.cli.eval import main as eval_main
    from crosscoder.constants import DICTIONARY_DIR, EVAL_FILE
    from crosscoder.dictionary.stack import read_stack

    overrides = [o for o in tiny_overrides(toy_cache) if not o.startswith(("tracking=", "trainer.eval_tokens=",
                                                                           "data.workers.num_workers="))]
    code, out, err = train_cli([*overrides, f"method={method}", "trainer.eval_tokens=64", "tracking=disabled",
                                "data.workers.num_workers=0"], tmp_path / "run", monkeypatch, capsys)
    assert code == 0, err
    assert "skipping the spliced-in evaluation" not in out
    stack = tmp_path / "run" / DICTIONARY_DIR
    manifest, _ = read_stack(stack)
    members = [stack / entry.dictionary for entry in manifest.entries]
    for member, name in zip(members, ["step0", "step4", "step12"], strict=True):
        written = json.loads((member / EVAL_FILE).read_text())
        assert written["snapshots"] == [name] and written["n_positions"] >= 64
        (member / EVAL_FILE).unlink()

    capsys.readouterr()
    eval_main([str(stack), "--tokens", "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert all(f"eval: {member / EVAL_FILE}" in out for member in members), out
    for member, name in zip(members, ["step0", "step4", "step12"], strict=True):
        written = json.loads((member / EVAL_FILE).read_text())
        assert written["snapshots"] == [name] and 32 <= written["n_positions"] < 64

    (stack / "stack.json").unlink()  # as an export that never finished leaves it
    with pytest.raises(SystemExit) as exited:
        eval_main([str(stack)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert f"{stack} holds dictionaries (000-step0, 001-step4, 002-step12) but no stack.json" in err
    assert f"pass one of them, e.g. {members[0]}" in err
