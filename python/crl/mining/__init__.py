"""Hard-negative mining: the representation bank, the indexes and the miner (docs/hard_negatives.md)."""

from crl.mining.bank import FrozenBank, TrainedQueue, build_or_load_bank, model_fingerprint, open_bank
from crl.mining.index import BACKENDS, IndexParams, NegativeIndex, exact_search, make_index, resolve_backend
from crl.mining.miner import MINING_STAT_KEYS, HardNegativeMiner, Mined, MiningStats

__all__ = [
    "BACKENDS", "MINING_STAT_KEYS", "FrozenBank", "HardNegativeMiner", "IndexParams", "Mined", "MiningStats", "NegativeIndex",
    "TrainedQueue", "build_or_load_bank", "exact_search", "make_index", "model_fingerprint", "open_bank",
    "resolve_backend",
]
