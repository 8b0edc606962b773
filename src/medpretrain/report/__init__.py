"""The study report: `<out>/report.html`, one self-contained file built from a run directory.

Everything comes from what the runner left behind — the results store, test-set predictions, the kept
fine-tuned networks, cached frozen features, `study.json` and `run_log.jsonl` — so the report can be rebuilt
at any time, also from a study that is still running or was killed (it shows what exists), and building it
trains nothing and extracts nothing. Figures are matplotlib PNGs inlined as data URIs and the CSS is inline;
there are no scripts and no external requests.

Modules: `run` reads the run directory and runs the comparisons (`medpretrain.stats`); `figures` and `tables`
turn it into the sections; `recommend` words the advice (a pure function of records); `provenance` says where
the numbers came from; `render` fills the template and writes the file; `text` formats numbers.
"""

from medpretrain.report.recommend import recommend
from medpretrain.report.render import REPORT_NAME, SECTIONS, build_report
from medpretrain.report.run import Run, init_kind

__all__ = ["REPORT_NAME", "SECTIONS", "Run", "build_report", "init_kind", "recommend"]
