"""Feature-evolution analysis of exported crosscoder dictionaries (trajectories, emergence, drift, recovery)."""

from crosscoder.analysis.features.evolution import (
    CLASSES,
    EMERGENCE_THRESHOLD,
    Evolution,
    FeatureTable,
    analyze_evolution,
    classify,
    consecutive_cosine,
    cosine_to_last,
    dead_latents,
    emergence_counts,
    emergence_snapshots,
    emergence_steps,
    feature_table,
    lifetime_cosine,
    min_present_cosine,
    normalized_trajectories,
    presence_segments,
    snapshot_similarity,
)
from crosscoder.analysis.features.matching import (
    RECOVERY_COSINE,
    Recovery,
    decoder_cosine,
    linear_sum_assignment,
    recovery,
)
from crosscoder.analysis.report.dictionary import (
    AnalysisResult,
    NotADictionaryError,
    analyze_dictionary,
    check_dictionary_dir,
    load_evolution,
)

__all__ = [
    "CLASSES", "EMERGENCE_THRESHOLD", "RECOVERY_COSINE", "AnalysisResult", "Evolution", "FeatureTable",
    "NotADictionaryError", "Recovery", "analyze_dictionary", "analyze_evolution", "check_dictionary_dir",
    "classify", "consecutive_cosine", "cosine_to_last", "dead_latents", "decoder_cosine", "emergence_counts",
    "emergence_snapshots", "emergence_steps", "feature_table", "lifetime_cosine", "linear_sum_assignment",
    "load_evolution", "min_present_cosine", "normalized_trajectories", "presence_segments", "recovery",
    "snapshot_similarity",
]
