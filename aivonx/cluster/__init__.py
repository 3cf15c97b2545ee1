"""Several instances as one, through Redis (--redis): node slots counted
cluster-wide, admin changes told to every instance at once, and who is alive.

Redis holds only live state; the store (PostgreSQL) stays the truth for
configuration. When Redis cannot be reached, each instance serves with its
share of every node's slots, says so, and returns to shared counting when
Redis answers again.
"""
from .service import Cluster, SharedSlots

__all__ = ["Cluster", "SharedSlots"]
