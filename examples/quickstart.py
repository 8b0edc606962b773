"""Quickstart: a tiny study from Python, its results as a DataFrame, and a label-efficiency plot from it.

Run it as a script (`python examples/quickstart.py [OUT]`, about 15 s on 2 CPU cores) or paste the cells into a
notebook; `# %%` marks the cells (VS Code, Jupytext and Spyder run them as such). It needs the MedMNIST file
pneumoniamnist.npz in $MEDPRETRAIN_DATA (or a connection: it is downloaded once).
"""

# %% A study: two inits under the linear probe at two label budgets, two seeds, on a small fixed subset
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: also runs headless (in a notebook, drop this line)
import matplotlib.pyplot as plt

import medpretrain as mp

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
study = mp.Study(
    name="quickstart",
    datasets=["pneumoniamnist[train=60,val=40,test=40]"],
    inits=["scratch", "noise"],  # random weights against the no-signal control
    protocols=["linear"],
    budgets={"fractions": [0.5, 1.0]},
    seeds=2,
)

# %% Run it (again: the stored cells are skipped) and read the results as a DataFrame
run = mp.run(study, out=out, progress=False)
df = run.results()
print(df[["init", "fraction", "seed", "n_labeled", "auc", "auc_ci_low", "auc_ci_high", "chosen.C"]])

# %% Mean test AUC over seeds per init and number of labels, plotted
curve = df.groupby(["init", "n_labeled"], as_index=False)["auc"].agg(["mean", "std"])
fig, ax = plt.subplots(figsize=(5, 3.5))
for init, part in curve.groupby("init"):
    ax.errorbar(part["n_labeled"], part["mean"], yerr=part["std"].fillna(0), marker="o", capsize=3, label=init)
ax.set(xlabel="labelled training images", ylabel="test AUC (mean ± std over seeds)", title=study.name)
ax.legend()
fig.tight_layout()
figure = out / "quickstart.png"
fig.savefig(figure, dpi=100)
print(f"figure: {figure}")

# %% Is scratch better than the noise control? The report's paired test, per budget
print(run.compare("scratch", "noise", protocol="linear")[["budget", "delta", "ci_low", "ci_high", "p_adj"]])
