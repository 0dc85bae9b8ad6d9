"""Record the numbers the redesign must reproduce (tests/reference_runs.py) into tests/reference/.
Run once, before code moves; tests/test_reference.py then checks every later version against them."""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_runs import HERE, TRAINING, item_embeddings, reference_dataset, short_run  # noqa: E402


def main() -> None:
    HERE.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ds = reference_dataset(Path(tmp))
        losses = {}
        for method in TRAINING:
            losses[method], tr = short_run(ds, method, Path(tmp) / method)
            print(method, losses[method]["loss"], flush=True)
            if method == "vlm2rec":
                np.save(HERE / "vlm2rec_item_F.npy", item_embeddings(tr))
    (HERE / "losses.json").write_text(json.dumps(losses, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
