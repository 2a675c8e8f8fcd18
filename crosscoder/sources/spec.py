"""What a source is, as values: a snapshot at a hook (`SnapshotSpec`) and what the stream, the crosscoder and the
export need to know of all of them (`SourceInfo`). No torch, no model: every floor above may hold these."""

from __future__ import annotations

from dataclasses import dataclass

SYNTHETIC_PATH = "planted"
"""The `path` of a snapshot with no files (generated activations): its `revision` is the digest of what generates
it, and that digest is its fingerprint."""


@dataclass(frozen=True)
class SnapshotSpec:
    """One source of the crosscoder: where its snapshot lives, which training step it is, the hook it reads, and
    (once `describe_sources` has run) what the snapshot is: `fingerprint` is
    `crosscoder.sources.fingerprint.snapshot_fingerprint`, compared whenever a cache or a training state made from these
    sources is read back. With one hook a source is a snapshot and carries its name; with several
    (`sources.hooks`), each (snapshot, hook) pair is a source named after its hook (one snapshot) or
    `<snapshot>:<hook>` (several), and `snapshot` keeps the snapshot's own name."""

    name: str
    path: str
    revision: str | None = None
    step: int | None = None
    fingerprint: str | None = None
    hook: str | None = None
    """The hook point this source reads (None: the run's `sources.hook`)."""
    layer: int | None = None
    """The block the hook reads, when the sources differ by layer (what the analysis plots them against)."""
    snapshot: str | None = None
    """The snapshot's own name when several hooks read it (None: `name`)."""

    @property
    def snapshot_name(self) -> str:
        return self.snapshot or self.name


@dataclass
class SourceInfo:
    """What the token stream, the crosscoder and the export need to know of the snapshots (no weights)."""

    specs: list[SnapshotSpec]
    """One per source, in the crosscoder's source order."""
    tokenizer: object
    d_model: int
    hook: str
    """The hook point (several: comma-separated)."""
    axis: str = "step"
    """What the source axis is (`source_axis`): `step`, `layer`, `hook` or `source`."""
    folder: str | None = None
    """The activation folder every source is read from (sources.kind=files); None for snapshots."""
    max_positions: int | None = None
    """The most token positions every snapshot was built for (their configs' max_position_embeddings); None where
    unknown or without a model."""
