import json

import numpy as np

from medpretrain.store import Store, export_json


def test_rows_are_unique_and_survive_reopen(tmp_path):
    store = Store(tmp_path)
    row = {"cell_key": "abc", "dataset": "bloodmnist", "auc": 0.9, "seed": 0, "history": [{"epoch": 1}]}
    store.put(row, np.array([[0.2, 0.8]]))
    store.put({**row, "auc": 0.1})  # the same cell again is ignored, never duplicated
    again = Store(tmp_path)
    assert again.done("abc") and not again.done("other")
    assert len(again.rows()) == 1
    assert again.get("abc")["auc"] == 0.9
    assert again.get("abc")["history"] == [{"epoch": 1}]
    np.testing.assert_allclose(again.predictions("abc"), [[0.2, 0.8]])
    out = export_json(again.rows(), tmp_path / "rows.json")
    assert json.loads(out.read_text())[0]["dataset"] == "bloodmnist"
