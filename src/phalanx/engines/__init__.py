"""Execution engines: where sweep cells and verification queries run (serial, local process pool,
Ray). See :mod:`phalanx.engines.base` for the contract."""

from phalanx.engines.base import ENGINES, Engine, Outcome, SerialEngine, Status, Task, create_engine, execute

__all__ = ["ENGINES", "Engine", "Outcome", "SerialEngine", "Status", "Task", "create_engine", "execute"]
