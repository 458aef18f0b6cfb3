"""Server-side sessions: the signed cookie only names a session kept here.

A session ends on logout, when its idle time or absolute lifetime runs out, and
when its user is removed or gets another password or role (the session keeps a
fingerprint of the user's settings from login time). The store is in memory:
restarting the console ends every session. It is bounded: at most
``per_user`` sessions a user (the oldest end first), and only logins make them.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from webui.settings import User


def fingerprint(user: User) -> str:
    """What a session depends on: a change ends the user's sessions."""
    text = "\0".join((user.name, user.role, user.password_hash or ""))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Session:
    user: str
    fingerprint: str
    created: float
    seen: float


class SessionStore:
    def __init__(self, *, idle: float = 3600.0, lifetime: float = 8 * 3600.0,
                 per_user: int = 16, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle, self.lifetime, self.per_user, self.clock = idle, lifetime, per_user, clock
        self.lock = threading.Lock()
        self.sessions: dict[str, _Session] = {}  # insertion order: oldest first

    def __len__(self) -> int:
        return len(self.sessions)

    def create(self, user: User) -> str:
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        with self.lock:
            self._prune(now)
            mine = [k for k, s in self.sessions.items() if s.user == user.name]
            for k in mine[:max(0, len(mine) - self.per_user + 1)]:
                del self.sessions[k]
            self.sessions[sid] = _Session(user.name, fingerprint(user), now, now)
        return sid

    def check(self, sid: object, users: Mapping[str, User]) -> User | None:
        """The session's user if it is still valid (and note the activity)."""
        if not isinstance(sid, str):
            return None
        now = self.clock()
        with self.lock:
            s = self.sessions.get(sid)
            if s is None:
                return None
            user = users.get(s.user)
            if user is None or fingerprint(user) != s.fingerprint or not self._live(s, now):
                del self.sessions[sid]
                return None
            s.seen = now
            return user

    def end(self, sid: object) -> None:
        if isinstance(sid, str):
            with self.lock:
                self.sessions.pop(sid, None)

    def end_user(self, name: str) -> int:
        """End every session of ``name``; how many there were."""
        with self.lock:
            mine = [k for k, s in self.sessions.items() if s.user == name]
            for k in mine:
                del self.sessions[k]
            return len(mine)

    def _live(self, s: _Session, now: float) -> bool:
        return now - s.seen < self.idle and now - s.created < self.lifetime

    def _prune(self, now: float) -> None:
        for k in [k for k, s in self.sessions.items() if not self._live(s, now)]:
            del self.sessions[k]
