"""Task 2 (docs/method.md §4): SASRec / GRU4Rec initialised from learned item embeddings.

:mod:`.config` (the run's config), :mod:`.models` (the sequence models), :mod:`.items` (frozen
item tables read from run folders), :mod:`.train` (training per seed and evaluation).
"""
