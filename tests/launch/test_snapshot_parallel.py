"""Snapshot-parallel runs end to end (`accelerate launch`, DeepSpeed on CPU over gloo): 2 ranks splitting the
snapshots and 4 ranks as 2 data x 2 snapshot (ZeRO-3) reach the one-rank weights; online, each rank's workers load
only their snapshots, under a sweep of the accelerate launcher; ranks that read different tokens are stopped;
a 4-rank run killed and resumed ends bit-identical.

The tiny toy has 3 snapshots, so snapshot_parallel=2 splits them unevenly (2 + 1)."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

from crosscoder.constants import (
    CHECKPOINTS_DIR,
    DICTIONARY_DIR,
    RUN_SUMMARY_FILE,
    STREAM_POSITION_FILE,
    TRAINING_STATES_DIR,
)
from crosscoder.dictionary.io import load_decoder_norms, load_dictionary
from tests.helpers import (
    REPO,
    check_sweep,
    history_keys,
    in_order_overrides,
    launch,
    newest_state_step,
    resume_overrides,
    run,
    signal_job,
    single_wandb_run_file,
    start_two_ranks,
    tiny_overrides,
    wait_for_job,
    wait_until,
)

pytestmark = pytest.mark.slow
SPLIT = "parallel.snapshot_parallel=2"
QUIET = ["tracking=disabled", "tracking.log_analysis=false"]  # W&B and the analysis of the split layout are
# checked by the sweep test; here they only cost time
# name: (launch config or None for one plain process, processes, snapshot ranks)
LAYOUTS = {
    "1 rank": (None, None, 1),
    "2 data ranks": ("cpu_2proc_zero2.yaml", 2, 1),
    "2 snapshot ranks": ("cpu_2proc_zero2.yaml", 2, 2),
    "2x2 ZeRO-3": ("cpu_2proc_zero3.yaml", 4, 2),
}
# Each launch costs 15-60 s of CI on 2 cores: 2x2 under ZeRO-2 runs in the kill-and-resume test, and TopK /
# BatchTopK selection across a snapshot group is held to one rank's gradients by tests/launch/test_layout.py (2
# gloo processes, no accelerate launch), so only ReLU and the independent dictionaries launch here.
RUNS = {"relu": ("1 rank", "2 data ranks", "2 snapshot ranks", "2x2 ZeRO-3"),
        "independent": ("1 rank", "2 snapshot ranks")}
GROUPS = {"independent": ["crosscoder=topk", "method=independent"]}  # one TopK dictionary per snapshot


@pytest.fixture(scope="module")
def layout_runs(activation_cache: Path, toy_cache: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> dict[tuple[str, str], Path]:
    """Each activation under each layout, from one cache read in global batch order, fp32, one seed. The gradient
    clip is set low so that it acts at every step: a parameter counted twice (or not at all) in the norm would
    change every update."""
    workdir = tmp_path_factory.mktemp("layouts")
    runs = {}
    for activation, names in RUNS.items():
        for name in names:
            config, processes, snapshot_parallel = LAYOUTS[name]
            run_dir = workdir / f"{activation}-{name.replace(' ', '-')}"
            groups = GROUPS.get(activation, [f"crosscoder={activation}"])
            overrides = [*in_order_overrides(toy_cache, activation_cache, run_dir), *groups,
                         "crosscoder.dict_size=64", "crosscoder.k=4", "trainer.grad_clip=0.05",
                         f"parallel.snapshot_parallel={snapshot_parallel}", *QUIET]
            result = launch(config, overrides, workdir, num_processes=processes)
            if snapshot_parallel > 1:
                data = (processes or 1) // snapshot_parallel
                assert f"({data} data x 2 snapshot rank(s), 1/2 snapshot(s) each)" in result.stdout
            runs[activation, name] = run_dir
    return runs


def _max_differences(reference: Path, other: Path, export: str = DICTIONARY_DIR) -> dict[str, float]:
    ref, _ = load_dictionary(reference / export)
    got, _ = load_dictionary(other / export)
    assert got.W_dec.shape == ref.W_dec.shape == (64, 3, 32)
    return {name: (got.state_dict()[name].float() - tensor.float()).abs().max().item()
            for name, tensor in ref.state_dict().items() if tensor.dtype.is_floating_point}


def test_two_data_ranks_reach_the_one_rank_weights(layout_runs: dict[tuple[str, str], Path]) -> None:
    """Same seed, same global batches (the cache read in global batch order), fp32: 1 rank and 2 data ranks under
    ZeRO-2 reach the same weights, at the step-4 checkpoint and at the end; each rank's stream position is its own.

    Tolerance: only float32 summation order differs. One rank averages the gradient over the whole batch at
    once; two ranks each average half and all-reduce the two means; the input scale is the all-reduced mean of
    the per-rank squared norms. That perturbs a gradient by float32 rounding (~1e-7 relative) per step, and where
    a gradient element nearly cancels Adam's normalised update amplifies it (and the clip, acting every step,
    passes it on). We allow 3e-5 on W_enc and 1e-6 elsewhere, as for the snapshot split. A real difference is far
    larger: an LR schedule stepped once per rank (an accelerate default this test caught) gave 0.13."""
    reference, split = layout_runs["relu", "1 rank"], layout_runs["relu", "2 data ranks"]
    for export in (DICTIONARY_DIR, f"{CHECKPOINTS_DIR}/step_0000004"):
        differences = _max_differences(reference, split, export)
        assert differences["W_enc"] <= 3e-5, (export, differences)
        assert max(v for k, v in differences.items() if k != "W_enc") <= 1e-6, (export, differences)
    positions = json.loads((split / DICTIONARY_DIR / STREAM_POSITION_FILE).read_text())
    assert [(p["kind"], p["rank"]) for p in positions] == [("cache", 0), ("cache", 1)]


def test_relu_split_by_snapshot_and_by_data_and_snapshot_reaches_the_one_rank_weights(
        layout_runs: dict[tuple[str, str], Path]) -> None:
    """2 snapshot ranks, and 2 data x 2 snapshot ranks under ZeRO-3, end with the one-rank dictionary.

    Tolerance: only float32 summation order differs (a rank sums its snapshots' partial pre-activations, the
    group adds the two partials; the data ranks average two micro-batch means). That is ~1e-7 relative per
    step, which Adam's normalised update amplifies where a gradient entry nearly cancels, and the clip
    (acting every step) passes on to all entries. Measured after 8 steps: max |diff| = 1.6e-6 on W_enc
    (entries ~0.1-1; up to 1e-5 seen with other settings), <= 6e-9 on W_dec and the biases. We allow 3e-5 and
    1e-6. Real faults are far larger:
    b_enc updated from each rank's own loss only gave 3e-2 on W_enc, and turning the clip off moves W_enc by 6e-3."""
    reference = layout_runs["relu", "1 rank"]
    for name in ("2 snapshot ranks", "2x2 ZeRO-3"):
        differences = _max_differences(reference, layout_runs["relu", name])
        assert differences["W_enc"] <= 3e-5, (name, differences)
        assert max(v for k, v in differences.items() if k != "W_enc") <= 1e-6, (name, differences)

    summary = json.loads((layout_runs["relu", "2x2 ZeRO-3"] / RUN_SUMMARY_FILE).read_text())
    assert summary["layout"] == {"data_parallel": 2, "snapshot_parallel": 2, "shares": [["step0", "step4"], ["step12"]]}
    assert summary["snapshots_loaded_per_rank"] == [[], [], [], []]  # from the cache: no model runs


def test_independent_dictionaries_split_by_snapshot_train_as_on_one_rank(
        layout_runs: dict[tuple[str, str], Path]) -> None:
    """method=independent over 2 snapshot ranks: rank 0 trains step0's and step4's dictionaries, rank 1 step12's,
    nothing summed between them but the gradient norm; rank 0 exports the one stack, equal to the one-rank
    stack's dictionaries (measured: 2.4e-7, the clipped norm summed in another order; allowed 1e-6; a rank
    training another snapshot's dictionary, or on its data, differs by order 1)."""
    from crosscoder.dictionary.stack import read_stack

    stacks = {name: layout_runs["independent", name] / DICTIONARY_DIR for name in ("1 rank", "2 snapshot ranks")}
    manifests = {name: read_stack(stack)[0] for name, stack in stacks.items()}
    assert manifests["1 rank"] == manifests["2 snapshot ranks"]
    assert manifests["1 rank"].names == ["step0", "step4", "step12"]
    for entry in manifests["1 rank"].entries:
        reference, _ = load_dictionary(stacks["1 rank"] / entry.dictionary)
        split, _ = load_dictionary(stacks["2 snapshot ranks"] / entry.dictionary)
        assert split.W_dec.shape == (64, 1, 32)
        for name, tensor in reference.state_dict().items():
            if tensor.dtype.is_floating_point:
                difference = (split.state_dict()[name].float() - tensor.float()).abs().max().item()
                assert difference <= 1e-6, (entry.name, name, difference)
    summary = json.loads((layout_runs["independent", "2 snapshot ranks"] / RUN_SUMMARY_FILE).read_text())
    assert summary["layout"]["shares"] == [["step0", "step4"], ["step12"]]


def test_online_snapshot_ranks_load_only_their_snapshots_in_a_sweep_of_launches(toy_cache: Path,
                                                                                tiny_snapshots: list,
                                                                                tmp_path: Path) -> None:
    """hydra/launcher=accelerate: each member of a 2-value sweep is its own 2-rank `accelerate launch` (both
    exported, one W&B run each in the sweep's group), here with snapshot_parallel=2 and one activation worker per
    rank: rank 0's worker loads step0 and step4, rank 1's step12 alone (they report what
    they loaded); the token check runs every step and holds; W&B (one run per member) and the export have
    all 3 snapshots."""
    sweep_dir = tmp_path / "sweep"
    result = run([
        sys.executable, "-m", "crosscoder.train", "--multirun", "hydra/launcher=accelerate",
        f"hydra.launcher.config_file={REPO / 'launch' / 'cpu_2proc_zero2.yaml'}", *tiny_overrides(toy_cache),
        SPLIT, "crosscoder.l1_coeff=0.5,5", f"hydra.sweep.dir={sweep_dir}",
    ], tmp_path)
    assert result.stdout.count("(1 data x 2 snapshot rank(s), 1/2 snapshot(s) each), ZeRO-2") == 2
    l0 = {}
    for job in ("0", "1"):
        summary = json.loads((sweep_dir / job / RUN_SUMMARY_FILE).read_text())
        assert summary["snapshots_loaded_per_rank"] == [["step0", "step4"], ["step12"]]
        l0[job] = summary["l0"]
        keys = history_keys(single_wandb_run_file(sweep_dir / job))
        for name in ("step0", "step4", "step12"):
            assert {f"explained_variance/{name}", f"decoder_norm/mean/{name}", f"mse/{name}"} <= keys
        norms = load_decoder_norms(sweep_dir / job / DICTIONARY_DIR)
        assert norms.shape == (64, 3) and torch.isfinite(norms).all()
    assert l0["1"] < l0["0"], f"a 10x larger lambda should give a sparser code: {l0}"
    assert check_sweep(sweep_dir) == {0.5: l0["0"], 5.0: l0["1"]}


def test_snapshot_ranks_reading_different_tokens_stop_before_training_on_them(toy_cache: Path, tiny_snapshots: list,
                                                                             tmp_path: Path) -> None:
    """Induced drift: each rank's data seed taken from its RANK (a per-rank interpolation, an easy mistake)
    gives the two snapshot ranks of one group different documents. The token check at step 0 stops both with
    one line naming the group and the step (the launcher then exits 1), and nothing is exported."""
    run_dir = tmp_path / "run"
    result = launch("cpu_2proc_zero2.yaml", [*tiny_overrides(toy_cache), SPLIT, *QUIET, "data.seed='${oc.env:RANK}'",
                                             "data.workers.num_workers=0",
                                             f"hydra.run.dir={run_dir}"], tmp_path, returncode=1)
    message = "crosscoder: the ranks of snapshot group(s) [0] (data index) trained on different tokens at step 0"
    assert result.stderr.count(message) == 2, result.stderr[-4000:]  # both ranks, one line each
    assert not (run_dir / DICTIONARY_DIR).exists()


def test_four_ranks_killed_then_preempted_resume_to_the_uninterrupted_weights(activation_cache: Path,
                                                                               toy_cache: Path, tmp_path: Path) -> None:
    """2 data x 2 snapshot ranks, shuffled from the cache, a state every 4 steps: SIGKILL after the first state,
    resume=auto, SIGTERM mid-run (which saves a state), resume=auto again: the dictionary equals, bit for bit, that
    of an uninterrupted run (same ranks, same summation order: no tolerance needed), and all three segments log to
    one W&B run."""
    reference = tmp_path / "reference"
    launch("cpu_2proc_zero2.yaml", [*resume_overrides(toy_cache, activation_cache, reference), SPLIT, *QUIET],
           tmp_path, num_processes=4)
    run_dir = tmp_path / "run"
    overrides = [*resume_overrides(toy_cache, activation_cache, run_dir), SPLIT, "tracking.log_analysis=false"]
    log = tmp_path / "killed.log"
    process = start_two_ranks(overrides, tmp_path, log, num_processes=4)
    wait_until(lambda: newest_state_step(run_dir) > 0, process, log)
    signal_job(process, signal.SIGKILL)
    wait_for_job(process, run_dir)
    killed_at = newest_state_step(run_dir)
    assert not (run_dir / DICTIONARY_DIR).exists(), "the run finished before it was killed"

    log = tmp_path / "preempted.log"
    process = start_two_ranks([*overrides, "trainer.resume=auto"], tmp_path, log, num_processes=4)
    wait_until(lambda: newest_state_step(run_dir) > killed_at, process, log)
    signal_job(process, signal.SIGTERM)
    wait_for_job(process, run_dir)
    output = log.read_text()
    assert f"resumed from {run_dir / TRAINING_STATES_DIR / f'step_{killed_at:07d}'}" in output
    stopped = re.search(r"stopped by SIGTERM at step (\d+); training state saved", output)
    assert stopped, output[-4000:]
    assert newest_state_step(run_dir) == int(stopped.group(1)) < 64
    assert not (run_dir / DICTIONARY_DIR).exists()

    result = launch("cpu_2proc_zero2.yaml", [*overrides, "trainer.resume=auto"], tmp_path, num_processes=4)
    assert f"resumed from {run_dir / TRAINING_STATES_DIR / f'step_{int(stopped.group(1)):07d}'}" in result.stdout
    resumed, _ = load_dictionary(run_dir / DICTIONARY_DIR)
    uninterrupted, _ = load_dictionary(reference / DICTIONARY_DIR)
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), f"{name} differs from the uninterrupted run"
    run_ids = {path.name.rsplit("-", 1)[1] for path in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 3 and len(run_ids) == 1, run_ids


def test_layers_of_one_snapshot_split_across_two_snapshot_ranks(toy_cache: Path, tiny_snapshots: list,
                                                                tmp_path: Path) -> None:
    """Three hooks of one snapshot as the sources, snapshot_parallel=2 online (inline runners): the shares (2 + 1
    sources) cut through the snapshot, so each rank loads it and reads only its own hooks; the token check holds,
    and the export has all three sources."""
    run_dir = tmp_path / "run"
    hooks = "[blocks.0.hook_resid_post,blocks.1.hook_attn_out,blocks.1.hook_resid_post]"
    result = launch("cpu_2proc_zero2.yaml", [*tiny_overrides(toy_cache), SPLIT, *QUIET, "sources.kind=hf",
                                             "data.workers.num_workers=0",
                                             f"sources.paths=[{tiny_snapshots[-1].path}]", f"sources.hooks={hooks}",
                                             f"hydra.run.dir={run_dir}"], tmp_path)
    assert "(1 data x 2 snapshot rank(s), 1/2 snapshot(s) each)" in result.stdout
    summary = json.loads((run_dir / RUN_SUMMARY_FILE).read_text())
    assert summary["snapshots_loaded_per_rank"] == [["step12"], ["step12"]]
    assert summary["layout"]["shares"] == [["blocks.0.hook_resid_post", "blocks.1.hook_attn_out"],
                                           ["blocks.1.hook_resid_post"]]
    model, meta = load_dictionary(run_dir / DICTIONARY_DIR)
    assert model.W_dec.shape == (64, 3, 32) and meta.source_axis == "hook"
    assert torch.isfinite(model.W_dec).all()
