"""Mutants caught by the learning test and the notebook-record tests (see tests/mutants.py)."""
from mutants import Mutant

MUTANTS = [
    Mutant("optimizer-never-steps", "vlm2rec_lab.train", "                self.opt.step()\n", "                pass\n",
           "training computes losses and gradients but never updates the adapter",
           ("tests/test_learning.py::test_a_short_training_run_learns",)),
]
