"""The exemplar files: Parquet tables (through pyarrow) and one JSON header, in one folder, readable without the
trainer by anything that reads Parquet (pandas, polars, DuckDB, Arrow in a browser).

Why Parquet: typed columns, compressed (the tables are mostly small integers), read by column or by row group
without loading the rest, and read by every data tool a researcher already has; pyarrow is its reference
implementation. The folder (docs/analysis.md, "Exemplar files"):

- `exemplars.json`: format version, kind (crosscoder / stack), channel names, dict_size, tokens replayed,
  sequence length, settings;
- `exemplars.parquet`: one row per exemplar: latent, channel, kind (`top` / `sample`), rank (0 = the strongest
  for `top`, the weakest for `sample`), activation, quantile (a sampled firing's place among the latent's
  firings in that channel, estimated from the uniform sample; null for `top`), sequence, position, token_id;
- `latents.parquet`: one row per (latent, channel): firing count, density, mean activation when firing, max,
  top-token entropy (crosscoder.analysis.interpretation.scores);
- `sequences.parquet`: the token ids of every sequence an exemplar points into;
- `vocabulary.parquet`: the text of every token id those sequences hold.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from crosscoder.analysis.interpretation.exemplars import Exemplars
from crosscoder.analysis.interpretation.scores import top_token_entropy
from crosscoder.errors import DictionaryError
from crosscoder.storage import building_dir

EXEMPLARS_FORMAT_VERSION = 1
EXEMPLARS_DIR = "exemplars"
"""The exemplar folder's name in an analysis folder."""
HEADER_FILE = "exemplars.json"
TABLES = ("exemplars", "latents", "sequences", "vocabulary")


def write_exemplars(found: Exemplars, out_dir: str | Path, dictionary: str | Path) -> Path:
    """The exemplar folder at `out_dir`, built under a hidden name and renamed into place."""
    out_dir = Path(out_dir)
    with building_dir(out_dir) as tmp:
        pq.write_table(_exemplar_table(found), tmp / "exemplars.parquet")
        pq.write_table(_latent_table(found), tmp / "latents.parquet")
        sequences = sorted(found.sequences)
        pq.write_table(pa.table({"sequence": pa.array(sequences, pa.int32()),
                                 "token_ids": pa.array([found.sequences[s] for s in sequences],
                                                       pa.list_(pa.int32()))}), tmp / "sequences.parquet")
        tokens = sorted(found.vocabulary)
        pq.write_table(pa.table({"token_id": pa.array(tokens, pa.int32()),
                                 "text": pa.array([found.vocabulary[t] for t in tokens], pa.string())}),
                       tmp / "vocabulary.parquet")
        header = {"format_version": EXEMPLARS_FORMAT_VERSION, "kind": found.kind, "channels": found.channels,
                  "dict_size": found.dict_size, "n_tokens": found.n_tokens, "seq_len": found.seq_len,
                  "settings": asdict(found.settings), "dictionary": str(Path(dictionary).resolve())}
        (tmp / HEADER_FILE).write_text(json.dumps(header, indent=2))
    return out_dir


def _rows(found: Exemplars, store: str) -> dict[str, torch.Tensor]:
    """The held entries of `store` (top or sample) as columns, ranked within their (latent, channel): the top by
    activation, strongest first (as kept); the sample by activation, weakest first (the order of its quantiles)."""
    kept = getattr(found, store)
    held, values, keys = kept.held(), kept.values, kept.keys
    if store == "sample":
        order = torch.where(held, values, torch.inf).argsort(dim=1, stable=True)  # empty slots last
        held, values, keys = held.gather(1, order), values.gather(1, order), keys.gather(1, order)
    channel_rows, rank = held.nonzero(as_tuple=True)
    columns = {"row": channel_rows, "rank": rank, "activation": values[channel_rows, rank],
               "key": keys[channel_rows, rank]}
    if store == "sample":
        count = held.sum(dim=1).clamp(min=1)
        columns["quantile"] = (rank.float() + 0.5) / count[channel_rows].float()
    return columns


def _exemplar_table(found: Exemplars) -> pa.Table:
    parts = []
    for store in ("top", "sample"):
        columns = _rows(found, store)
        latent, channel = columns["row"] % found.dict_size, columns["row"] // found.dict_size
        sequence, position = columns["key"] // found.seq_len, columns["key"] % found.seq_len
        token = [found.sequences[s][p] for s, p in zip(sequence.tolist(), position.tolist(), strict=True)]
        quantile = columns.get("quantile")
        parts.append(pa.table({
            "latent": pa.array(latent.cpu().numpy().astype("int32")),
            "channel": pa.array(channel.cpu().numpy().astype("int16")),
            "kind": pa.array([store] * len(latent), pa.string()).dictionary_encode(),
            "rank": pa.array(columns["rank"].cpu().numpy().astype("int16")),
            "activation": pa.array(columns["activation"].cpu().numpy().astype("float32")),
            "quantile": pa.array(quantile.cpu().numpy().astype("float32") if quantile is not None
                                 else [None] * len(latent), pa.float32()),
            "sequence": pa.array(sequence.cpu().numpy().astype("int32")),
            "position": pa.array(position.cpu().numpy().astype("int16")),
            "token_id": pa.array(token, pa.int32()),
        }))
    return pa.concat_tables(parts).sort_by([("latent", "ascending"), ("channel", "ascending")])


def _latent_table(found: Exemplars) -> pa.Table:
    width = found.firing_counts.numel()
    rows = torch.arange(width)
    counts = found.firing_counts.cpu()
    top = torch.where(found.top.held(), found.top.values, 0.0).amax(dim=1).cpu()
    return pa.table({
        "latent": pa.array((rows % found.dict_size).numpy().astype("int32")),
        "channel": pa.array((rows // found.dict_size).numpy().astype("int16")),
        "firing_count": pa.array(counts.numpy()),
        "density": pa.array((counts.double() / max(found.n_tokens, 1)).numpy()),
        "mean_activation": pa.array((found.activation_sums.cpu() / counts.clamp(min=1)).numpy()),
        "max_activation": pa.array(top.numpy().astype("float32")),
        "top_token_entropy": pa.array(top_token_entropy(found).numpy()),
    })


@dataclass
class ExemplarContext:
    latent: int
    channel: str
    kind: str
    rank: int
    activation: float
    quantile: float | None
    before: str
    token: str
    after: str


class ExemplarFiles:
    """An exemplar folder, read (the tables are small enough to hold; the Parquet files can also be read by
    column or row group directly)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        header_file = self.folder / HEADER_FILE
        try:
            self.header = json.loads(header_file.read_text())
            if self.header.get("format_version") != EXEMPLARS_FORMAT_VERSION:
                raise DictionaryError(f"{header_file}: exemplar format {self.header.get('format_version')}, this "
                                      f"version reads {EXEMPLARS_FORMAT_VERSION}")
            self.tables = {name: pq.read_table(self.folder / f"{name}.parquet") for name in TABLES}
        except (OSError, ValueError, pa.ArrowException) as error:
            raise DictionaryError(f"{self.folder} is not a readable exemplar folder: {error}") from error
        sequences = self.tables["sequences"].to_pydict()
        self.sequences = dict(zip(sequences["sequence"], sequences["token_ids"], strict=True))
        vocabulary = self.tables["vocabulary"].to_pydict()
        self.vocabulary = dict(zip(vocabulary["token_id"], vocabulary["text"], strict=True))

    @property
    def channels(self) -> list[str]:
        return list(self.header["channels"])

    def contexts(self, latent: int, channel: int | str = 0, kind: str = "top",
                 window: tuple[int, int] = (8, 3)) -> list[ExemplarContext]:
        """The exemplars of one latent at one channel (an index or a name), decoded with `window` tokens before and
        after, in rank order."""
        index = self.channels.index(channel) if isinstance(channel, str) else channel
        wanted = (pc.field("latent") == latent) & (pc.field("channel") == index) & (pc.field("kind") == kind)
        table = self.tables["exemplars"].filter(wanted).sort_by("rank").to_pylist()

        def text(ids: list[int]) -> str:
            return "".join(self.vocabulary[token] for token in ids)

        contexts = []
        for row in table:
            ids, position = self.sequences[row["sequence"]], row["position"]
            contexts.append(ExemplarContext(latent, self.channels[index], kind, row["rank"], row["activation"],
                                            row["quantile"], text(ids[max(0, position - window[0]):position]),
                                            text([ids[position]]), text(ids[position + 1:position + 1 + window[1]])))
        return contexts
