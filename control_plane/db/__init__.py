"""Storage: SQLAlchemy 2 async on SQLite (aiosqlite) or PostgreSQL (asyncpg)."""

from control_plane.db.engine import Database
from control_plane.db.models import Base
from control_plane.db.rollouts import Rollout, RolloutDevice  # their tables join Base

__all__ = ["Base", "Database", "Rollout", "RolloutDevice"]
