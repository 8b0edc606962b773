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


def test_a_re_put_keeps_the_first_row_and_its_predictions(tmp_path):
    store = Store(tmp_path)
    row = {"cell_key": "abc", "dataset": "bloodmnist", "auc": 0.9}
    store.put(row, np.array([[0.2, 0.8]]))
    # The same cell again, with other results: ignored as a whole, predictions included (keep-first).
    store.put({**row, "auc": 0.1}, np.array([[0.7, 0.3]]))
    assert store.get("abc")["auc"] == 0.9
    np.testing.assert_allclose(store.predictions("abc"), [[0.2, 0.8]])
    # A put killed between its predictions file and its commit leaves a file without a row; the cell's next
    # put (without predictions) must not be paired with it.
    orphan = np.array([[0.5, 0.5]], dtype=np.float32)
    np.savez_compressed(tmp_path / "predictions" / "other.npz", test_proba=orphan)
    store.put({**row, "cell_key": "other"})
    assert store.done("other") and store.predictions("other") is None
    # Nothing but the predictions files is left in their folder (no temporary files).
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == ["abc.npz"]
