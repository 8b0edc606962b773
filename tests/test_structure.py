"""The package's shape: no import cycle, one planner for `run` and `evaluate`, and the planner's bug fixes."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from medpretrain.cli import app
from medpretrain.errors import MedpretrainError
from medpretrain.plan import image_size_for
from medpretrain.study import validate_study

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "medpretrain"
runner = CliRunner()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_at_import_time(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """medpretrain modules imported when `module` is imported: top-level statements, not function bodies and
    not `if TYPE_CHECKING:` blocks (those never run)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("medpretrain"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
                if base.startswith("medpretrain"):
                    found.add(base)
                    found.update(f"{base}.{a.name}" for a in node.names)

    visit(tree.body)
    return found


def test_no_import_cycle_in_the_package() -> None:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {
        name: {
            dep
            for dep in _imports_at_import_time(ast.parse(path.read_text()), name, path.name == "__init__.py")
            if dep in modules and dep != name
        }
        for name, path in modules.items()
    }
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for name in graph:
        graph[name] = {d for d in graph[name] if not (d.startswith(name + ".") and modules[name].name == "__init__.py")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def dfs(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(graph[node]):
            # importing a.b.c imports the packages a and a.b first, which is not an edge of a.b.c's own
            if state.get(dep) == 1 and not node.startswith(dep + "."):
                cycle.extend([*stack[stack.index(dep) :], node, dep] if dep in stack else [node, dep])
                return True
            if state.get(dep) is None and dfs(dep, [*stack, node]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if state.get(name) is None and dfs(name, []):
            break
    assert not cycle, " → ".join(cycle)


def test_a_study_listing_one_init_twice_fails_before_any_work(tmp_path: Path) -> None:
    study = {
        "datasets": [{"name": "pneumoniamnist", "train": 40, "val": 20, "test": 20}],
        "inits": ["scratch", "scratch"],
        "budgets": {"fractions": [1.0]},
        "seeds": 1,
    }
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(study))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert "same initialization" in line and "scratch" in line
    assert not (tmp_path / "run" / "results.db").exists()


def _folder_of_64px(root: Path) -> Path:
    data = np.load(Path(__import__("os").environ["MEDPRETRAIN_DATA"]) / "pneumoniamnist.npz")
    images, labels = data["test_images"], data["test_labels"].ravel()
    for name, cls in (("normal", 0), ("pneumonia", 1)):
        (root / name).mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(labels == cls)[:24]):
            Image.fromarray(images[idx]).resize((64, 64)).save(root / name / f"{i}.png")
    return root


def test_user_images_keep_their_own_size(tmp_path: Path) -> None:
    """A folder of 64-px PNGs is evaluated at 64 px (it was evaluated at MedMNIST's --size, 28)."""
    folder = _folder_of_64px(tmp_path / "xrays")
    study = validate_study({"datasets": [str(folder)], "inits": ["scratch"], "budgets": {"fractions": [1.0]}}, "s")
    assert image_size_for(study, str(folder)) == 64
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "evaluate", "--dataset", str(folder), "--init", "scratch", "--protocol", "linear", "--shots", "5",
        "--out", str(out), "--json", str(out / "rows.json"), "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads((out / "rows.json").read_text())
    assert row["image_size"] == 64
    explicit = validate_study({**study.model_dump(), "image_size": 32}, "s")
    assert image_size_for(explicit, str(folder)) == 32


def test_evaluate_runs_on_the_ray_executor_with_the_same_values(tmp_path: Path) -> None:
    args = ["evaluate", "--dataset", "pneumoniamnist[train=80,val=40,test=60]", "--init", "scratch",
            "--protocol", "linear", "--fraction", "0.5", "--seeds", "2", "--no-progress"]  # fmt: skip
    rows = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        result = runner.invoke(app, [*args, "--executor", executor, "--out", str(out), "--json", str(out / "r.json")])
        assert result.exit_code == 0, result.output
        rows[executor] = {r["cell_key"]: r for r in json.loads((out / "r.json").read_text())}
    assert rows["local"].keys() == rows["ray"].keys() and len(rows["local"]) == 2
    for key, row in rows["local"].items():  # same cells, same numbers: CPU results agree to 1e-6
        assert abs(row["auc"] - rows["ray"][key]["auc"]) < 1e-6
        assert abs(row["val_auc"] - rows["ray"][key]["val_auc"]) < 1e-6


def test_a_bad_crop_scale_is_refused_when_the_study_is_read() -> None:
    study = {
        "datasets": ["pneumoniamnist"],
        "inits": [{"method": "dino", "epochs": 1, "hparams": {"global_crop_scale": [0.9, 0.4]}}],
        "budgets": {"fractions": [0.1]},
    }
    with pytest.raises(MedpretrainError, match="crop scale"):
        validate_study(study, "s.yaml")
    good = {"method": "swav", "epochs": 1, "hparams": {"local_crop_scale": [0.05, 0.2]}}
    validate_study({**study, "inits": [good]}, "s.yaml")


def test_every_named_choice_is_one_registry_shape() -> None:
    from medpretrain.backbones import BACKBONES
    from medpretrain.executors import EXECUTORS
    from medpretrain.protocols import PROTOCOLS
    from medpretrain.registry import Registry
    from medpretrain.ssl import METHODS

    for registry, what, known in ((METHODS, "method", "simclr"), (PROTOCOLS, "protocol", "linear"),
                                  (EXECUTORS, "executor", "local"), (BACKBONES, "backbone", "resnet18")):  # fmt: skip
        assert isinstance(registry, Registry) and known in registry.names()
        with pytest.raises(MedpretrainError, match=f"unknown {what} 'nope'") as err:
            registry.get("nope")
        assert known in err.value.hint
    with pytest.raises(ValueError, match="registered twice"):
        PROTOCOLS.add("linear", PROTOCOLS.get("linear"))


def test_no_module_is_above_400_lines() -> None:
    long = {
        p.relative_to(PACKAGE).as_posix(): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long


def test_a_multi_source_protocol_is_one_new_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cells over several inits: `sources` enter the key, each init's features come from the one cache, and a
    protocol reads them with `ctx.features(spec)`; the run path (executors, store) needs nothing new."""
    from medpretrain.budgets import Budget
    from medpretrain.cells import Cell, run_cell
    from medpretrain.protocols import PROTOCOLS, Protocol
    from medpretrain.protocols.linear import LinearProbe

    class Concat(Protocol):
        name, description, uses_features, cost = "concat-test", "features of every source side by side", True, 1

        def run(self, ctx):  # type: ignore[no-untyped-def]
            parts = [ctx.features()] + [ctx.features(spec) for spec in ctx.sources]
            joined = {split: np.concatenate([p[split] for p in parts], axis=1) for split in parts[0]}
            seen.append({split: x.shape for split, x in joined.items()})
            return LinearProbe().run(replace(ctx, features=lambda init=None: joined, params={}))

    from dataclasses import replace

    seen: list[dict] = []
    monkeypatch.setitem(PROTOCOLS._entries, Concat.name, Concat())
    from medpretrain.backbones import create_backbone
    from medpretrain.inits import parse_init, save_checkpoint

    other = str(save_checkpoint(tmp_path / "other.pt", create_backbone("resnet18"), image_size=28, method="test"))
    base = dict(dataset="pneumoniamnist[train=60,val=40,test=40]", size=28, image_size=28, backbone="resnet18",
                small_stem=False, init="scratch", protocol="concat-test", budget=Budget(fraction=1.0),
                seed=0)  # fmt: skip
    single, fused = Cell(**base), Cell(**base, sources=(other,))
    assert single.key != fused.key and len(fused.feature_keys) == 2 and len(single.feature_keys) == 1
    assert "source_keys" not in single.config()  # single-init cells keep their keys
    row, proba = run_cell(fused, tmp_path, progress=False)
    assert seen[0]["train"] == (60, 1024) and proba.shape == (40, 2)  # 512 features from each source
    assert 0.5 < row["auc"] <= 1.0 and row["config"]["source_keys"] == [parse_init(other).key]
