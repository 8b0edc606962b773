"""A run directory read back for the report: rows, predictions, kept networks and cached features, grouped.

Artefacts only. Everything here is read from what the runner left behind — the results store, the test-set
predictions, `study.json`, `run_log.jsonl`, the feature arrays under the cache and the networks in `models/`
(listed here; the Grad-CAM figure loads them) — and nothing is built or extracted: a missing feature array is
reported as missing, never recomputed. So a report costs no GPU time, cannot change the cache a running study
is using, and works on a study that is still running or was killed (it shows what exists). Comparisons go
through `medpretrain.stats`, the one place that turns predictions into evidence.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps

from medpretrain.backbones import DEFAULT_INPUT_NORM
from medpretrain.data import load_dataset
from medpretrain.data.base import Dataset, Task
from medpretrain.errors import MedpretrainError
from medpretrain.features import FeatureCache
from medpretrain.protocols import protocol_cost
from medpretrain.runtime import cache_root
from medpretrain.stats import ALPHA, N_BOOTSTRAP, Estimate, TestResamples, combine, holm, paired_from_scores
from medpretrain.store import Store
from medpretrain.summary import budget_label, summarize

# Every cell of a data set is scored on the same stratified test resamples: all arms and seeds share one test
# set, so its noise is shared too (stats.TestResamples).
RESAMPLE_SEED = 0
ROLES = ("runner-up", "ImageNet transfer", "scratch")  # what the best of a group is compared with


def init_kind(row: dict[str, Any]) -> str:
    """A row's `init_kind`; rows stored before that column existed are told apart by their init key (our own
    pre-training checkpoints are keyed `pre-…`, other files `ckpt-…`)."""
    if row.get("init_kind"):
        return str(row["init_kind"])
    key = str(row.get("init_key", ""))
    return "pretrained" if key.startswith("pre-") else "checkpoint" if key.startswith("ckpt-") else key


def finite(values: Iterable[Any]) -> np.ndarray:
    arr = np.array([v for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr)]


def mean(values: Iterable[Any]) -> float:
    arr = finite(values)
    return float(arr.mean()) if len(arr) else float("nan")


def std(values: Iterable[Any]) -> float:
    arr = finite(values)
    return float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")


def sort_value(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut off by a killed writer: the others still count
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _arm_labels(rows: list[dict[str, Any]]) -> dict[tuple, str]:
    """Display label per (dataset, init, backbone, image_size, mitigation): the init label, plus backbone and/or
    image size only where one init label covers several of them in a data set (otherwise they would merge), plus
    the imbalance mitigation when there is one (each is an arm of its own: its cells differ)."""
    variants: dict[tuple[str, str], set[tuple[str, int]]] = defaultdict(set)
    for r in rows:
        variants[(r["dataset"], r["init"])].add((r["backbone"], r["image_size"]))
    labels = {}
    for r in rows:
        combos = variants[(r["dataset"], r["init"])]
        backbones = {b for b, _ in combos}
        sizes = {s for _, s in combos}
        extra = ([r["backbone"]] if len(backbones) > 1 else []) + ([f"{r['image_size']} px"] if len(sizes) > 1 else [])
        label = f"{r['init']} ({', '.join(extra)})" if extra else r["init"]
        labels[_arm_key(r)] = label if _arm_key(r)[-1] == "none" else f"{label} · {_arm_key(r)[-1]}"
    return labels


def _arm_key(r: dict[str, Any]) -> tuple:
    return (r["dataset"], r["init"], r["backbone"], r["image_size"], r.get("mitigation") or "none")


class Run:
    """A run directory's rows, grouped, plus memoised test labels, predictions and bootstrap results."""

    def __init__(self, out_dir: Path) -> None:
        self.out = out_dir
        if not (out_dir / "results.db").exists():
            raise MedpretrainError(
                f"no results in {out_dir} (results.db is missing)",
                "give the --out directory of a study run with `medpretrain run`",
            )
        self.store = Store(out_dir)
        rows = self.store.rows()
        if not rows:
            raise MedpretrainError(
                f"{out_dir}/results.db holds no finished cells yet", "wait until the first cells of the study finish"
            )
        labels = _arm_labels(rows)
        self.rows = [{**r, "arm": labels[_arm_key(r)], "budget": budget_label(r)} for r in rows]
        self.study = _read_json(out_dir / "study.json")
        self.run_log = _read_jsonl(out_dir / "run_log.jsonl")
        self.arm_order = self._arm_order()
        palette = colormaps["tab10" if len(self.arm_order) <= 10 else "tab20"]
        self.colors = {arm: palette(i % palette.N) for i, arm in enumerate(self.arm_order)}
        # (dataset, protocol, budget, arm) → seed → row; a later row of the same seed replaces an earlier one.
        self.cells: dict[tuple[str, str, str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
        for r in self.rows:
            self.cells[(r["dataset"], r["protocol"], r["budget"], r["arm"])][r["seed"]] = r
        self.feature_cache = FeatureCache(cache_root(out_dir))
        self._datasets: dict[tuple, Dataset] = {}
        self._proba: dict[str, np.ndarray | None] = {}
        self._labels: dict[str, tuple[np.ndarray, Task, list[str]]] = {}
        self._resamples: dict[str, TestResamples] = {}
        self._scores: dict[tuple[str, str], tuple[float, np.ndarray] | None] = {}
        self._family: list[dict[str, Any]] | None = None
        self._imbalance_tests: list[dict[str, Any]] = []
        self.notes: list[str] = []
        if any(r.get("val_auc") is None for r in self.rows):
            self.notes.append(
                "Some cells were stored by an older version without validation metrics: they are ranked last, "
                "so no best is chosen from them; re-run them (delete their rows) to rank them on validation."
            )

    def _arm_order(self) -> list[str]:
        """scratch, then ImageNet, then the rest in the order the study ran them (its own init order)."""
        seen: list[str] = []
        for r in self.rows:
            if r["arm"] not in seen:
                seen.append(r["arm"])
        rank = {"scratch": 0, "ImageNet": 1}
        return sorted(seen, key=lambda a: (rank.get(a.split(" · ")[0].split(" (")[0], 2), seen.index(a)))

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        """One record per (dataset, protocol, budget, arm): means over seeds, the 95% interval of each mean over
        seeds (seed and test-set variance: stats.combine), the mean validation AUC that ranks it, and what the
        recommendation needs to word it (init kind, number of classes and of test images)."""
        labels = _arm_labels(self.rows)
        out = []
        for rec in summarize(self.rows):
            rec["arm"] = labels[_arm_key(rec)]
            members = list(self.cells[(rec["dataset"], rec["protocol"], rec["budget"], rec["arm"])].values())
            for metric in ("auc", "acc"):
                estimate = self.mean_estimate(members, metric)
                rec[f"{metric}_ci_low"] = estimate.low if estimate else math.nan
                rec[f"{metric}_ci_high"] = estimate.high if estimate else math.nan
            val = [m.get("val_auc") for m in members]
            rec["val_auc_mean"] = mean(val) if all(v is not None for v in val) else math.nan
            rec["seeds"] = sorted(m["seed"] for m in members)
            rec["init_kind"] = init_kind(members[0])
            rec["n_classes"] = len(self.labels(members[0])[2])
            rec["n_test"] = members[0]["n_test"]
            out.append(rec)
        return out

    # -- grouping helpers

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r["dataset"] for r in self.rows))

    def protocols(self, dataset: str) -> list[str]:
        present = {r["protocol"] for r in self.rows if r["dataset"] == dataset}
        return sorted(present, key=lambda p: (protocol_cost(p), p))

    def budgets(self, dataset: str, protocol: str | None = None) -> list[str]:
        """Budget labels of a data set, fewest labels first."""
        recs = [r for r in self.records if r["dataset"] == dataset and protocol in (None, r["protocol"])]
        sizes: dict[str, list[float]] = defaultdict(list)
        for r in recs:
            sizes[r["budget"]].append(r["n_labeled"])
        return sorted(sizes, key=lambda b: float(np.mean(sizes[b])))

    def group(self, dataset: str, protocol: str | None, budget: str) -> list[dict[str, Any]]:
        """Records of one (dataset, protocol, budget) — all protocols when None — best mean *validation* AUC
        first (the test split never chooses), then cheaper protocols, then the init order."""
        recs = [
            r
            for r in self.records
            if r["dataset"] == dataset and r["budget"] == budget and protocol in (None, r["protocol"])
        ]
        order = {a: i for i, a in enumerate(self.arm_order)}
        return sorted(
            recs,
            key=lambda r: (-sort_value(r["val_auc_mean"]), protocol_cost(r["protocol"]), order[r["arm"]]),
        )

    def ranked(self) -> list[dict[str, Any]]:
        """Every record: per data set, budgets fewest labels first, each budget's records ranked as `group`."""
        return [r for d in self.datasets for b in self.budgets(d) for r in self.group(d, None, b)]

    def seeds_of(self, rec: dict[str, Any]) -> dict[int, dict[str, Any]]:
        return self.cells[(rec["dataset"], rec["protocol"], rec["budget"], rec["arm"])]

    # -- data, predictions and other artefacts

    def dataset(self, row: dict[str, Any], *, image_size: int | None = None) -> Dataset:
        """The row's data set at its own image size (or `image_size`), splits as the study saw them."""
        size = int(image_size or row["image_size"])
        key = (row["config"]["dataset"], row["size"], size)
        if key not in self._datasets:
            self._datasets[key] = load_dataset(
                row["config"]["dataset"], size=row["size"], image_size=size, split_dir=self.out / "splits"
            )
        return self._datasets[key]

    def _smallest(self, dataset: str) -> Dataset:
        """The data set at its smallest image size in the study: the cheapest load where pixels do not matter."""
        return self.dataset(min((r for r in self.rows if r["dataset"] == dataset), key=lambda r: r["image_size"]))

    def labels(self, row: dict[str, Any]) -> tuple[np.ndarray, Task, list[str]]:
        """Test labels do not depend on the image size: one load per data set serves every arm."""
        if row["dataset"] not in self._labels:
            ds = self._smallest(row["dataset"])
            self._labels[row["dataset"]] = (ds.labels["test"], ds.task, ds.classes)
        return self._labels[row["dataset"]]

    def val_split_size(self, dataset: str) -> int:
        """Images in the data set's whole validation split (what rows without `n_val` validated on)."""
        return len(self._smallest(dataset).labels["val"])

    def proba(self, row: dict[str, Any]) -> np.ndarray | None:
        key = row["cell_key"]
        if key not in self._proba:
            proba = self.store.predictions(key)
            y, _, _ = self.labels(row)
            if proba is not None and len(proba) != len(y):
                self.notes.append(f"predictions of {row['arm']} ({key}) do not match the test split; left out")
                proba = None
            self._proba[key] = proba
        return self._proba[key]

    def features(self, rows: list[dict[str, Any]], split: str = "test") -> tuple[np.ndarray | None, Path, bool]:
        """The cached frozen features of one arm (`rows`: its rows in one data set): (array or None when never
        written, where it was looked for, whether BatchNorm was re-estimated first). The un-adapted backbone's
        features come first; the BN-adapted ones (`bn_adapt` in a linear or kNN cell's params) when only those
        exist. The key comes from the row's recorded `init_key` and `dataset_key`: no checkpoint is re-hashed."""
        row = rows[0]
        adapted = any(((r.get("config") or {}).get("params") or {}).get("bn_adapt") for r in rows)
        first: Path | None = None
        for bn_adapt in (False, True) if adapted else (False,):
            key = FeatureCache.key_of(
                row["init_key"],
                row["backbone"],
                bool(row["small_stem"]),
                row["dataset_key"],
                bn_adapt=bn_adapt,
                input_norm=(row.get("config") or {}).get("input_norm", DEFAULT_INPUT_NORM),
            )
            feats, path = self.feature_cache.load(key, split), self.feature_cache.path(key, split)
            first = first or path
            if feats is not None:
                return feats, path, bn_adapt
        assert first is not None
        return None, first, False

    def kept_models(self) -> dict[str, list[tuple[dict[str, Any], Path]]]:
        """Kept fine-tuned networks per data set, one per arm (most labels, then lowest seed), in arm order."""
        per_arm: dict[tuple[str, str], tuple[dict[str, Any], Path]] = {}
        by_key = {r["cell_key"]: r for r in self.rows}
        for path in sorted((self.out / "models").glob("*.pt")):
            row = by_key.get(path.stem)
            if row is None:
                continue  # the network of a cell killed before its row was committed
            key = (row["dataset"], row["arm"])
            current = per_arm.get(key)
            if current is None or (-row["n_labeled"], row["seed"]) < (-current[0]["n_labeled"], current[0]["seed"]):
                per_arm[key] = (row, path)
        out: dict[str, list[tuple[dict[str, Any], Path]]] = defaultdict(list)
        for arm in self.arm_order:
            for (dataset, a), value in per_arm.items():
                if a == arm:
                    out[dataset].append(value)
        return out

    # -- statistics

    def scores(self, row: dict[str, Any], metric: str) -> tuple[float, np.ndarray] | None:
        """(metric on the test set, metric on each shared test resample) of one cell, or None without
        predictions; the table, the tests and the recommendation use the same cells, so each is scored once."""
        key = (row["cell_key"], metric)
        if key not in self._scores:
            proba = self.proba(row)
            y, task, _ = self.labels(row)
            if row["dataset"] not in self._resamples:
                self._resamples[row["dataset"]] = TestResamples(y, task, n_boot=N_BOOTSTRAP, seed=RESAMPLE_SEED)
            self._scores[key] = None if proba is None else self._resamples[row["dataset"]].scores(proba, metric)
        return self._scores[key]

    def mean_estimate(self, members: list[dict[str, Any]], metric: str) -> Estimate | None:
        """The mean over these seeds' cells with its seed-and-test-set interval (None without predictions)."""
        scored = [s for s in (self.scores(m, metric) for m in members) if s is not None]
        if not scored:
            return None
        return combine([p for p, _ in scored], np.stack([b for _, b in scored]), metric=metric)

    def compare(self, a: dict[str, Any], b: dict[str, Any], metric: str = "auc") -> Estimate | None:
        """`stats.paired_from_scores` of record `a` against record `b`, seed s paired with seed s, over the
        seeds both have with predictions."""
        seeds_a, seeds_b = self.seeds_of(a), self.seeds_of(b)
        shared = sorted(set(seeds_a) & set(seeds_b))
        pairs = [(self.scores(seeds_a[s], metric), self.scores(seeds_b[s], metric)) for s in shared]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if not pairs:
            return None
        return paired_from_scores([x for x, _ in pairs], [y for _, y in pairs], metric=metric)

    def family(self) -> list[dict[str, Any]]:
        """Every test the report shows, Holm-adjusted together: per (dataset, protocol, budget) the best arm on
        validation against the runner-up, ImageNet transfer and training from scratch (each once, where present),
        and each fusion against concat and against each of its sources (report.fusion)."""
        if self._family is not None:
            return self._family
        family = []
        for dataset in self.datasets:
            for protocol in self.protocols(dataset):
                for budget in self.budgets(dataset, protocol):
                    ranked = [r for r in self.group(dataset, protocol, budget) if math.isfinite(r["val_auc_mean"])]
                    if len(ranked) < 2:
                        continue
                    best, others = ranked[0], ranked[1:]
                    candidates = {
                        "runner-up": others[0],
                        "ImageNet transfer": next((r for r in others if r["init_kind"] == "imagenet"), None),
                        "scratch": next((r for r in others if r["init_kind"] == "scratch"), None),
                    }
                    against: dict[str, dict[str, Any]] = {}
                    roles: dict[str, list[str]] = defaultdict(list)
                    for role in ROLES:
                        rec = candidates[role]
                        if rec is not None:
                            against.setdefault(rec["arm"], rec)
                            roles[rec["arm"]].append(role)
                    for arm, other in against.items():
                        test = self.compare(best, other)
                        family.append(
                            {"dataset": dataset, "protocol": protocol, "budget": budget, "best": best,
                             "other": other, "roles": roles[arm], "test": test}
                        )  # fmt: skip
        from medpretrain.report.fusion import comparisons  # fusion's own tests join the one family

        family.extend(comparisons(self))
        from medpretrain.report.imbalance import mitigation_tests  # so do the imbalance section's (balanced acc.)

        extra = mitigation_tests(self)
        everything = family + extra
        adjusted = holm([e["test"].p if e["test"] is not None else math.nan for e in everything])
        for entry, p_adj in zip(everything, adjusted, strict=True):
            entry["p_adj"] = p_adj
            entry["significant"] = bool(math.isfinite(p_adj) and p_adj < ALPHA)
        self._family, self._imbalance_tests = family, extra
        return family

    def imbalance_tests(self) -> list[dict[str, Any]]:
        """The imbalance section's tests (each mitigation against none), adjusted in the one family."""
        self.family()
        return self._imbalance_tests

    @property
    def n_tests(self) -> int:
        """How many tests the report shows, all Holm-adjusted together."""
        return len(self.family()) + len(self._imbalance_tests)
