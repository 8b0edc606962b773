"""The fusion section: each fusion (dvme, concat) against concat and against each of its sources on its own.

A fusion record's sources are the inits whose keys its rows carry (`config.init_key`, then `config.source_keys`);
each source's own record is its linear-probe record at the same budget, the natural single-source baseline of a
fusion of frozen features. The tests are `Run.compare` (stats.paired_from_scores, seed s against seed s) and
join the report's one Holm family, so their adjusted p-values count every other test shown.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from medpretrain.report.text import fmt
from medpretrain.stats import format_p

if TYPE_CHECKING:
    from medpretrain.report.run import Run

SINGLE_SOURCE_PROTOCOL = "linear"


def source_keys(rec: dict[str, Any], run: Run) -> list[str]:
    """The init keys a fusion record combines, in the order of its attention weights."""
    row = next(iter(run.seeds_of(rec).values()))
    config = row.get("config") or {}
    return [row["init_key"], *config.get("source_keys", [])]


def source_records(rec: dict[str, Any], run: Run) -> list[tuple[str, dict[str, Any] | None]]:
    """(key, that source's linear record at the same budget, or None when the study has none) per source."""
    out = []
    for key in source_keys(rec, run):
        found = None
        for other in run.records:
            if (other["dataset"], other["budget"], other["protocol"]) != (
                rec["dataset"],
                rec["budget"],
                SINGLE_SOURCE_PROTOCOL,
            ) or other["init_kind"] == "fusion":
                continue
            if next(iter(run.seeds_of(other).values()))["init_key"] == key:
                found = other
                break
        out.append((key, found))
    return out


def comparisons(run: Run) -> list[dict[str, Any]]:
    """The fusion tests, as family entries: dvme against concat over the same sources, and every fusion against
    each source's own linear probe (each test once)."""
    entries = []
    for rec in run.records:
        if rec["init_kind"] != "fusion":
            continue
        against: list[tuple[str, dict[str, Any]]] = []
        if rec["protocol"] != "concat":
            concat = next(
                (r for r in run.records if r["protocol"] == "concat" and r["arm"] == rec["arm"]
                 and (r["dataset"], r["budget"]) == (rec["dataset"], rec["budget"])),
                None,
            )  # fmt: skip
            if concat is not None:
                against.append(("concat", concat))
        for _, single in source_records(rec, run):
            if single is not None:
                against.append((f"source {single['arm']} ({SINGLE_SOURCE_PROTOCOL})", single))
        for role, other in against:
            entries.append(
                {"dataset": rec["dataset"], "protocol": rec["protocol"], "budget": rec["budget"], "best": rec,
                 "other": other, "roles": [role], "test": run.compare(rec, other)}
            )  # fmt: skip
    return entries


def _attention(rec: dict[str, Any], run: Run) -> list[float] | None:
    """Each source's mean attention weight, averaged over the seeds (dvme rows only)."""
    means = [((r.get("extra") or {}).get("attention") or {}).get("mean") for r in run.seeds_of(rec).values()]
    if not means or any(m is None for m in means):
        return None
    return [float(v) for v in np.mean(np.asarray(means, dtype=float), axis=0)]


def section(run: Run) -> list[dict[str, Any]]:
    """One block per fusion record: its AUC with the interval of the mean over seeds, each source's weight and
    own AUC, and every test of it from the family (raw and Holm-adjusted p)."""
    family = run.family()
    out = []
    for rec in run.records:
        if rec["init_kind"] != "fusion":
            continue
        weights = _attention(rec, run)
        sources = []
        for i, (key, single) in enumerate(source_records(rec, run)):
            sources.append(
                {
                    "name": single["arm"] if single else key,
                    "weight": f"{weights[i]:.1%}" if weights else "—",
                    "auc": fmt(single["auc_mean"]) if single else "not evaluated alone",
                }
            )
        tests = []
        for e in family:
            if e["best"] is not rec:
                continue
            test = e["test"]
            if test is None or not math.isfinite(test.p):
                tests.append({"against": e["roles"][0], "note": "no seed with predictions of both: no test"})
                continue
            floor = test.n_boot if test.n_seeds == 1 else None
            tests.append(
                {
                    "against": e["roles"][0],
                    "delta": f"{test.delta:+.3f}",
                    "interval": f"{test.low:+.3f} to {test.high:+.3f}",
                    "p": format_p(test.p, floor),
                    "p_adj": format_p(e["p_adj"], floor),
                    "significant": e["significant"],
                    "verdict": _verdict(test.delta, e["significant"]),
                }
            )
        out.append(
            {
                "dataset": rec["dataset"],
                "budget": rec["budget"],
                "protocol": rec["protocol"],
                "arm": rec["arm"],
                "auc": f"{fmt(rec['auc_mean'])} [{fmt(rec['auc_ci_low'])}, {fmt(rec['auc_ci_high'])}]",
                "sources": sources,
                "tests": tests,
                "summary": _summary(rec["arm"], tests),
            }
        )
    return out


def _summary(arm: str, tests: list[dict[str, Any]]) -> str:
    """One sentence: does the fusion win, that is, beat every baseline it was tested against (Holm-adjusted)?"""
    tested = [t for t in tests if "delta" in t]
    if not tested:
        return f"{arm} could not be tested against any baseline."
    unbeaten = [t["against"] for t in tested if not (t["significant"] and float(t["delta"]) > 0)]
    if not unbeaten:
        return f"{arm} wins: significantly better than each of the {len(tested)} baselines tested (Holm-adjusted)."
    worse = [t["against"] for t in tested if t["significant"] and float(t["delta"]) < 0]
    text = f"{arm} does not win: not significantly better than {', '.join(unbeaten)} (Holm-adjusted)"
    return text + (f"; significantly worse than {', '.join(worse)}." if worse else ".")


def _verdict(delta: float, significant: bool) -> str:
    if significant:
        return "fusion better" if delta > 0 else "fusion worse"
    return "no significant difference"


__all__ = ["comparisons", "section", "source_keys", "source_records"]
