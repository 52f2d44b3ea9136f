"""A stand-in for the pueue client and daemon, for tests only (pueue cannot be installed here).

It follows /work/shared/pueue/INTERFACE.md: real processes run as `sh -c`, the client and the
daemon share a state directory (a JSON state file guarded by an fcntl lock), and both the v3 and
the v4 JSON formats can be served. Only the standard library is used, so the wrapper scripts
start quickly and work the same when called locally or through SSH on this machine.
"""
