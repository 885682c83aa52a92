"""The Arrow IPC backend passes the shard conformance suite."""

from softcache.format.testing import ShardBackendTests


class TestArrow(ShardBackendTests):
    backend_name = "arrow"
