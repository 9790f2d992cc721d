"""Execution engines: where sweep cells and verification queries run (serial, local process pool,
Ray). See :mod:`phalanx.engines.base` for the contract."""

from phalanx.engines.base import ENGINES, Engine, Outcome, SerialEngine, Setup, Status, Task, create_engine, execute
from phalanx.engines.local import LocalEngine

__all__ = ["ENGINES", "Engine", "LocalEngine", "Outcome", "SerialEngine", "Setup", "Status", "Task", "create_engine",
           "execute"]
