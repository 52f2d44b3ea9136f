"""The case ledger's database as a Prefect block, for sites that keep the URL's password in Prefect."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, ValidationError

from mqi.errors import ConfigError
from mqi.settings import LedgerSettings


class LedgerDatabase(Block):
    """The SQL database holding the MQI case ledger (SQLite or PostgreSQL URL)."""

    _block_type_name = "MQI Ledger"
    _block_type_slug = "mqi-ledger"

    url: SecretStr = Field(
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user:password@host/db; kept secret"
    )

    def to_ledger_settings(self) -> LedgerSettings:
        """The ledger settings, validated as the `ledger` section of the settings file."""
        try:
            return LedgerSettings(url=self.url)
        except ValidationError as exc:
            name = self._block_document_name or "(unsaved)"
            reasons = [error["msg"].removeprefix("Value error, ") for error in exc.errors()]
            raise ConfigError([f"ledger block {name!r}: url: {reason}" for reason in reasons]) from None
