"""ForkPool: worker processes (one per device) holding engines; trunks move between them by snapshot/restore."""

from thaw_rl.pool.fork_pool import PLACEMENTS, WEIGHT_SYNCS, ForkPool
from thaw_rl.pool.handles import PoolCompletion, PoolHandle
from thaw_rl.pool.worker import WeightVersionError

__all__ = ["PLACEMENTS", "WEIGHT_SYNCS", "ForkPool", "PoolCompletion", "PoolHandle", "WeightVersionError"]
