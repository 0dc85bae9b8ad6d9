"""Mutants of the data split as the method uses it (DESIGN §1, §4, §5): training examples and Task 2
training windows stop before the validation target, training-item counts (popularity, cold-start
buckets) see the training items only, and Task 2's early stopping reads the validation split.
See tests/mutants.py; run with ``python tools/mutation_check.py``."""
from mutants import Mutant

PINS = "tests/test_data_pins.py"

MUTANTS = [
    Mutant(
        name="train_examples_reach_the_valid_target",
        module="vlm2rec_lab.data.dataset",
        old="train_end = self.offsets[1:] - 2",
        new="train_end = self.offsets[1:] - 1",
        why="Dataset.train_examples' window ends one item later: the validation target becomes a training "
            "target (and the last training item a history item)",
        caught_by=(f"{PINS}::test_train_examples_are_the_hand_listed_ones",
                   f"{PINS}::test_train_examples_match_a_plain_implementation",
                   "tests/test_dataset.py::test_leave_one_out_split_and_training_examples"),
    ),
    Mutant(
        name="task2_windows_reach_the_valid_target",
        module="vlm2rec_lab.task2.train",
        old="n_targets = np.maximum(dataset.offsets[1:] - 2 - starts - 1, 0)",
        new="n_targets = np.maximum(dataset.offsets[1:] - 1 - starts - 1, 0)",
        why="Task 2's SASRec/GRU4Rec training windows predict the validation target too (training on the "
            "split early stopping reads)",
        caught_by=(f"{PINS}::test_task2_training_windows_are_the_hand_listed_ones",
                   f"{PINS}::test_task2_training_windows_match_a_plain_implementation",
                   "tests/test_downstream.py::test_training_windows_predict_every_training_item_once"),
    ),
    Mutant(
        name="train_item_counts_count_whole_sequences",
        module="vlm2rec_lab.data.dataset",
        old="positions = _ranges(self.offsets[:-1], self.offsets[1:] - 2)",
        new="positions = _ranges(self.offsets[:-1], self.offsets[1:])",
        why="train_item_counts counts the validation and test targets too: popularity and the cold-start "
            "buckets see the held-out items",
        caught_by=(f"{PINS}::test_train_item_counts_are_the_hand_counted_training_occurrences",
                   f"{PINS}::test_popularity_ranks_by_training_counts_only",
                   f"{PINS}::test_cold_start_buckets_use_training_counts",
                   f"{PINS}::test_task2_cold_start_buckets_use_training_counts"),
    ),
    Mutant(
        name="cooccurrence_learns_the_valid_transition",
        module="vlm2rec_lab.scorers",
        old="pos = _ranges(dataset.offsets[:-1], dataset.offsets[1:] - 3)",
        new="pos = _ranges(dataset.offsets[:-1], dataset.offsets[1:] - 2)",
        why="the co-occurrence scorer counts the (last training item -> validation target) transition",
        caught_by=(f"{PINS}::test_cooccurrence_counts_training_transitions_only",),
    ),
    Mutant(
        name="task2_early_stopping_reads_test",
        module="vlm2rec_lab.task2.train",
        old='split="valid"',
        new='split="test"',
        why="Task 2's early stopping (task2.train.validate) selects the epoch on the test split",
        caught_by=(f"{PINS}::test_validate_is_valid_ndcg_by_hand",
                   f"{PINS}::test_task2_best_valid_ndcg_is_the_restored_models_valid_ndcg"),
    ),
]
