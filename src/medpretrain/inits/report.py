"""The weight-load report: what an initialisation put into a backbone, and what it left out or dropped."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoadReport:
    """What an initialisation put into a backbone.

    `loaded`/`missing` are backbone (timm) keys; `unexpected` are checkpoint keys that matched nothing;
    `skipped` are checkpoint keys dropped on purpose (classifier heads, other modules, shape mismatches).
    BatchNorm's `num_batches_tracked` counters are never reported as missing.
    """

    source: str
    loaded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        if not self.loaded and not self.missing and not self.unexpected:
            return self.source
        total = len(self.loaded) + len(self.missing)
        parts = [f"{self.source}: loaded {len(self.loaded)}/{total} tensors"]
        if self.missing:
            parts.append(f"missing {len(self.missing)} ({_preview(self.missing)})")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} ({_preview(self.unexpected)})")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} on purpose ({_preview(self.skipped)})")
        text = ", ".join(parts)
        return f"{text}; {'; '.join(self.notes)}" if self.notes else text


def _preview(keys: tuple[str, ...] | list[str], n: int = 3) -> str:
    head = ", ".join(keys[:n])
    return f"{head}, …" if len(keys) > n else head


def _is_counter(key: str) -> bool:
    # BatchNorm's step counters carry no learned weights, so they never count as missing or loaded coverage.
    return key.endswith("num_batches_tracked")
