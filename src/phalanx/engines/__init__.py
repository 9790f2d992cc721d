"""Execution engines: where sweep cells and verification queries run (serial, local process pool,
Ray). See :mod:`phalanx.engines.base` for the contract."""

from phalanx.engines.base import ENGINES, Engine, Outcome, SerialEngine, Setup, Status, Task, create_engine, execute
from phalanx.engines.local import LocalEngine
from phalanx.engines.ray import RayEngine

__all__ = ["ENGINES", "Engine", "LocalEngine", "RayEngine", "Outcome", "SerialEngine", "Setup", "Status", "Task", "create_engine",
           "execute"]
