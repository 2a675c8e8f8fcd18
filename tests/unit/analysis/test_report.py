"""analyze_dictionary on an exported dictionary: metrics from the right space, files, one self-contained page."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import pytest
import torch

from crosscoder.analysis.features.evolution import CLASSES
from crosscoder.analysis.features.matching import recovery
from crosscoder.analysis.report.dictionary import NotADictionaryError, analyze_dictionary, load_evolution
from crosscoder.dictionary.io import load_dictionary
from tests.helpers import EXPECTED_CLASSES, EXPECTED_EMERGENCE, expected_norms

PNGS = {"trajectories.png", "emergence.png", "drift.png", "similarity.png"}
OUTPUTS = PNGS | {"report.html", "features.csv", "summary.json"}


def test_metrics_use_normalised_norms(dictionary_dir: Path) -> None:
    """Exported W_dec has the input scale folded in; trajectories come from the normalised decoder norms."""
    evo, meta = load_evolution(dictionary_dir)
    torch.testing.assert_close(evo.norms, expected_norms(), atol=1e-5, rtol=1e-5)
    assert evo.class_counts() == EXPECTED_CLASSES
    assert evo.emergence_counts.tolist() == EXPECTED_EMERGENCE
    assert evo.steps == [0, 64, 512, None] and evo.names == meta.source_names
    model, _ = load_dictionary(dictionary_dir)
    raw = model.W_dec.detach().norm(dim=-1)
    assert not torch.allclose(raw, evo.norms, atol=1e-3)  # the folded weights alone would mislead


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_files_and_self_contained_html(dictionary_dir: Path) -> None:
    result = analyze_dictionary(dictionary_dir)
    out = dictionary_dir / "analysis"
    assert result.out_dir == out and result.report == out / "report.html"
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert not [p for p in dictionary_dir.iterdir() if p.name.startswith(".")]  # no temporaries left
    for name in PNGS:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    page = result.report.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    images = _images(page)
    assert len(images) == len(PNGS) and all(image[:4] == b"\x89PNG" for image in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # no external assets
    for text in ("blocks.1.hook_resid_pre", "step512", "/models/final", "1,000,000", *CLASSES):
        assert text in page
    assert "Planted ground truth" not in page

    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_counts"] == EXPECTED_CLASSES == result.summary["class_counts"]
    assert summary["emergence_counts"] == EXPECTED_EMERGENCE
    assert summary["steps"] == [0, 64, 512, None]
    assert summary["snapshot_similarity"][1][1] == pytest.approx(1.0)
    with (out / "features.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40 == len(result.table.rows)
    assert rows[0]["class"] == "persistent" and rows[-1]["class"] == "dead" and rows[-1]["emergence_step"] == ""
    assert rows[8]["emergence_name"] == "step64" and rows[8]["emergence_step"] == "64"


def test_report_with_recovery_and_extra_sections(dictionary_dir: Path, tmp_path: Path) -> None:
    model, _ = load_dictionary(dictionary_dir)
    learned = model.W_dec.detach()[:36]
    true_emergence = torch.tensor([e for _, e, _, count in [(0, 0, 0, 8), (0, 1, 0, 8), (0, 2, 0, 8), (0, 0, 0, 6),
                                                            (0, 1, 0, 6)] for _ in range(count)])
    found = recovery(model.W_dec.detach(), learned, true_emergence, learned_norms=expected_norms())
    assert found.fraction_recovered == 1.0 and found.emergence_accuracy == 1.0

    out = tmp_path / "elsewhere" / "report"
    result = analyze_dictionary(dictionary_dir, out, recovery=found,
                                extra_sections=[("Top-activating contexts", "<p id='ctx'>the cat</p>")])
    assert result.out_dir == out and {p.name for p in out.iterdir()} == OUTPUTS | {"recovery.png"}
    page = result.report.read_text()
    assert "Planted ground truth" in page and "Top-activating contexts" in page and "<p id='ctx'>" in page
    assert len(_images(page)) == len(PNGS) + 1
    assert json.loads((out / "summary.json").read_text())["recovery"]["fraction_recovered"] == 1.0

    (out / "stale.txt").write_text("from the first run")
    analyze_dictionary(dictionary_dir, out)  # a rerun replaces the whole folder
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_not_a_dictionary(tmp_path: Path) -> None:
    with pytest.raises(NotADictionaryError, match="no such folder"):
        analyze_dictionary(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(NotADictionaryError, match=r"half.*missing weights.safetensors, decoder_norms"):
        analyze_dictionary(tmp_path / "half")
    assert not (tmp_path / "half" / "analysis").exists()


def test_firing_frequency_gives_a_density_plot_a_column_and_counts(tmp_path: Path) -> None:
    """A dictionary exported with its firing frequency: the report adds the density plot, features.csv a
    firing_frequency column, summary.json the dense / never-fired counts (a dictionary without one has none of
    them: test_report_files_and_self_contained_html)."""
    from tests.helpers import write_dictionary

    frequency = torch.zeros(40)
    frequency[:30] = torch.logspace(-5, -1.5, 30)
    frequency[30:33] = torch.tensor([0.2, 0.5, 0.11])  # dense
    dictionary = write_dictionary(tmp_path / "dictionary", firing_frequency=frequency)
    result = analyze_dictionary(dictionary)
    out = dictionary / "analysis"
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"density.png"}
    assert len(_images(result.report.read_text())) == len(PNGS) + 1
    with (out / "features.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[31]["firing_frequency"]) == pytest.approx(0.5)
    assert float(rows[39]["firing_frequency"]) == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["firing_dense_latents"] == 3
    assert summary["firing_never_fired_fraction"] == pytest.approx(7 / 40)
