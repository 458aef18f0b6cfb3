"""The ipvs-synproxy operations console (Flask): pages, JSON API, /metrics.

``create_app(settings)`` builds the app (:mod:`webui.app`); ``service`` may be
given to use a stand-in for the kernel (tests). All kernel access goes through
:mod:`webui.service`, which uses :mod:`ipvs_synproxy` only. Importing this
package is cheap (the CLI does it for every command): Flask is loaded by
:func:`create_app`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from webui.service import ConsoleService
    from webui.settings import Settings


def create_app(settings: Settings, service: ConsoleService | None = None) -> Flask:
    """Build the console app from ``settings``; refuses to without users."""
    from webui.app import build

    return build(settings, service)
