"""Prefect blocks of MQI Communicator. Register them with `prefect block register -m blocks`."""

from blocks.gpu_host import GpuHost, resolve_host_blocks
from blocks.ledger import LedgerDatabase

__all__ = ["GpuHost", "LedgerDatabase", "resolve_host_blocks"]
