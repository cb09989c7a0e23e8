"""Who may do what over HTTP: the :class:`Principal` a request authenticates as, and the one
place that decides whether it may read or change a project.

Two kinds of principal exist. The admin token (``KP_GATEWAY_HTTP_TOKEN`` or the generated
``<data dir>/token``) is :data:`ADMIN`: every project, ``admin`` (the union of all projects)
included, and the routes that span projects (creating projects, tokens, the quarantine). A
project token (:mod:`kp_gateway.tokens`) is one project with the scope ``read`` or
``read-write``; it never sees ``admin`` nor any other project. Pure: no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Scope(enum.StrEnum):
    """What a project token may do in its project."""

    READ = "read"
    READ_WRITE = "read-write"


@dataclass(frozen=True, slots=True)
class Principal:
    """The credentials of one request: the admin token, or one project token.

    ``project`` is None for the admin; ``token_id`` names the project token (None for the
    admin), so a session can be ended when its token is revoked or expires.
    """

    project: str | None
    scope: Scope
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        """Whether this is the admin token (every project and the cross-project routes)."""
        return self.project is None

    def can_read(self, project: str) -> bool:
        """Whether the project's series, datasets, uploads and files are visible."""
        return self.project is None or self.project == project.lower()

    def can_write(self, project: str) -> bool:
        """Whether uploads and STOW into the project are allowed."""
        return self.can_read(project) and self.scope is Scope.READ_WRITE

    def readable(self, projects: Iterable[str]) -> list[str]:
        """The projects of `projects` this principal can read, in their order."""
        return [p for p in projects if self.can_read(p)]


ADMIN = Principal(project=None, scope=Scope.READ_WRITE)


__all__ = ["ADMIN", "Principal", "Scope"]
