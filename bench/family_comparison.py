"""The dictionary families side by side on the embedded toy model at matched L0 (issue 13): each family's shipped
group (conf/crosscoder/<family>.yaml) trains on the 8 toy snapshots through the real trainer, the other families'
L0 knob (KNOBS: lambda, or the shared gate's initial threshold) searched until their L0 is within --tolerance of
--target-l0 (TopK and BatchTopK get it by construction: k = the target), and each chosen dictionary is judged by
the spliced-in LM loss per snapshot (crosscoder.evaluation.spliced.spliced) on held-out tokens.

    python bench/family_comparison.py                       # all five families, L0 16, 300k tokens each
    python bench/family_comparison.py --families relu,topk --tokens 200000
    python bench/family_comparison.py --families jumprelu --knob crosscoder.l1_coeff --values 1,5,25 --tokens 150000

One line per training run (the search), then the table: L0, explained variance, dead share, fraction of CE
recovered (mean over snapshots, and at the first and last snapshot), KL, and the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("relu", "topk", "batchtopk", "jumprelu", "snapshot_jumprelu")
KNOBS = {"relu": "crosscoder.l1_coeff", "topk": "crosscoder.k", "batchtopk": "crosscoder.k",
         "jumprelu": "crosscoder.jumprelu.initial_threshold", "snapshot_jumprelu": "crosscoder.l1_coeff"}
"""The setting each family's L0 is matched with (L0 falls as it rises). The shared JumpReLU gate is matched by its
initial threshold: on the toy LM its L0 *rises* with lambda_S (bench/RESULTS.md), so lambda_S cannot match it."""
MAX_SEARCH_RUNS = 5


@dataclass
class Run:
    family: str
    sparsity: float
    """The value of the family's KNOBS setting."""
    l0: float
    explained_variance: float
    dead_fraction: float
    seconds: float
    dictionary_dir: Path


def run_config(family: str, overrides: list[str], out_dir: Path):  # noqa: ANN201 (RunConfig, imported late)
    """The composed Hydra config of `crosscoder-train crosscoder=<family> <overrides>` as a RunConfig."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from crosscoder.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        composed = compose(config_name="config", overrides=[f"output_dir={out_dir}", f"crosscoder={family}",
                                                            *overrides])
    return OmegaConf.to_object(composed)


def train_once(family: str, sparsity: float, tokens: int, root: Path, knob: str | None = None) -> Run:
    from crosscoder.cli.train import train
    from crosscoder.constants import RUN_SUMMARY_FILE

    key = knob or KNOBS[family]
    value = int(sparsity) if key == "crosscoder.k" else sparsity
    out = Path(tempfile.mkdtemp(prefix=f"{family}_", dir=root))
    cfg = run_config(family, [f"{key}={value}", f"trainer.total_tokens={tokens}", "trainer.eval_tokens=0",
                              "tracking=disabled", "trainer.state_every=0"], out)
    started = time.perf_counter()
    result = train(cfg)
    summary = json.loads((result.output_dir / RUN_SUMMARY_FILE).read_text())
    run = Run(family, sparsity, summary["l0"], summary["explained_variance/mean"], summary["dead_fraction"],
              time.perf_counter() - started, result.dictionary_dir)
    print(f"[run] {family} {key}={value:.4g}: L0 {run.l0:.2f}, EV {run.explained_variance:.3f}, dead "
          f"{run.dead_fraction:.2f} ({run.seconds:.0f} s)", flush=True)
    return run


def shipped_value(family: str, root: Path) -> float:
    target = run_config(family, [], root / "unused")
    for part in KNOBS[family].split("."):
        target = getattr(target, part)
    return float(target)


def matched_run(family: str, target_l0: float, tolerance: float, tokens: int, root: Path) -> Run:
    """TopK / BatchTopK at k = target; the others from the shipped group's value of their knob, stepped along an
    assumed L0 ~ 1/knob until the target is bracketed, then bisected (geometrically) inside the bracket."""
    if KNOBS[family] == "crosscoder.k":
        return train_once(family, target_l0, tokens, root)
    runs = [train_once(family, shipped_value(family, root), tokens, root)]
    while abs(runs[-1].l0 / target_l0 - 1) > tolerance and len(runs) < MAX_SEARCH_RUNS:
        dense = [run for run in runs if run.l0 > target_l0]  # the knob must go up from these
        sparse = [run for run in runs if run.l0 < target_l0]
        if dense and sparse:
            low, high = max(run.sparsity for run in dense), min(run.sparsity for run in sparse)
            value = math.sqrt(low * high)
        else:
            last = runs[-1]
            value = last.sparsity * math.exp(max(-2.0, min(2.0, math.log(max(last.l0, 1e-3) / target_l0))))
        runs.append(train_once(family, value, tokens, root))
    return min(runs, key=lambda run: abs(math.log(max(run.l0, 1e-3) / target_l0)))


def finished_run(run_dir: Path) -> Run:
    """A run this script (or crosscoder-train) finished earlier: its summary, family and knob value."""
    from crosscoder.constants import DICTIONARY_DIR, RUN_SUMMARY_FILE
    from crosscoder.dictionary.io import read_meta

    summary = json.loads((run_dir / RUN_SUMMARY_FILE).read_text())
    meta = read_meta(run_dir / DICTIONARY_DIR)
    value = meta.training
    for part in KNOBS[meta.activation].split(".")[:-1] if meta.activation in KNOBS else []:
        value = value[part]
    knob = float(value[KNOBS[meta.activation].split(".")[-1]])
    return Run(meta.activation, knob, summary["l0"], summary["explained_variance/mean"], summary["dead_fraction"],
               summary["wall_seconds"], run_dir / DICTIONARY_DIR)


def _mean(values: list[float]) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return sum(finite) / max(len(finite), 1)


def report(runs: list[Run], eval_tokens: int, target_l0: float) -> None:
    from crosscoder.evaluation.spliced import evaluate_dictionary

    rows = []
    for run in runs:
        result = evaluate_dictionary(run.dictionary_dir, eval_tokens, "cpu", log=lambda _: None)
        recovered = [snapshot.ce_recovered for snapshot in result.per_snapshot]
        kl = [snapshot.kl for snapshot in result.per_snapshot]
        rows.append((run, recovered, _mean(recovered), _mean([snapshot.ce_recovered_mean for snapshot in
                                                             result.per_snapshot]), _mean(kl), result))
    tokens = json.loads((runs[0].dictionary_dir / "config.json").read_text())["tokens_seen"]
    print(f"\ntoy model, {len(result.snapshots)} snapshots ({', '.join(result.snapshots)}), {tokens:,} training "
          f"tokens per run, target L0 {target_l0:g}, spliced-in loss on {result.n_positions:,} held-out "
          f"positions ({result.tokens_from})")
    last = result.per_snapshot[-1]
    print(f"CE at the last snapshot: clean {last.ce_clean:.3f}, zero-ablated {last.ce_zero:.3f}, mean-ablated "
          f"{last.ce_mean:.3f} nats")
    print(f"{'family':<18} {'knob':>9} {'L0':>6} {'EV':>6} {'dead':>5} {'CE rec':>7} {'first':>6} {'last':>6} "
          f"{'vs mean':>8} {'KL':>7} {'CE spliced last':>15} {'wall s':>7}")
    for run, recovered, mean_recovered, mean_vs_mean, mean_kl, result in rows:
        print(f"{run.family:<18} {run.sparsity:>9.3g} {run.l0:>6.2f} {run.explained_variance:>6.3f} "
              f"{run.dead_fraction:>5.2f} {mean_recovered:>7.3f} {recovered[0]:>6.3f} {recovered[-1]:>6.3f} "
              f"{mean_vs_mean:>8.3f} {mean_kl:>7.4f} {result.per_snapshot[-1].ce_spliced:>15.3f} {run.seconds:>7.0f}")
    print("(CE rec: fraction of CE recovered against zero ablation, mean over snapshots; vs mean: against mean "
          "ablation; KL(clean || spliced), mean over snapshots, nats)")
    print("per-snapshot CE recovered:")
    for run, recovered, *_ in rows:
        print(f"  {run.family:<18} " + " ".join(f"{value:6.3f}" for value in recovered))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--target-l0", type=float, default=16.0)
    parser.add_argument("--tolerance", type=float, default=0.15, help="relative L0 mismatch accepted")
    parser.add_argument("--tokens", type=int, default=300_000, help="training tokens per run")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out positions of the spliced-in loss")
    parser.add_argument("--values", help="train the one family of --families at these comma-separated values of "
                                           "--knob (its KNOBS setting by default) and print the runs, no search")
    parser.add_argument("--knob", help="the setting --values sets, e.g. crosscoder.l1_coeff")
    parser.add_argument("--runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="evaluate these finished run folders (their dictionary/) instead of training")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.runs:
        report([finished_run(run_dir) for run_dir in args.runs], args.eval_tokens, args.target_l0)
        return
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    if args.values:  # a plain sweep of one setting, e.g. how L0 answers lambda
        root = Path(tempfile.mkdtemp(prefix="family_sweep_"))
        for value in args.values.split(","):
            train_once(families[0], float(value), args.tokens, root, args.knob)
        return
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    root = Path(tempfile.mkdtemp(prefix="family_comparison_"))
    runs = [matched_run(family, args.target_l0, args.tolerance, args.tokens, root) for family in families]
    report(runs, args.eval_tokens, args.target_l0)


if __name__ == "__main__":
    main()
