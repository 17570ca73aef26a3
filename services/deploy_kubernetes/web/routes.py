"""Every route of the web front end (pages, badges, the operator console); the app puts them
beside the JSON API's."""

from __future__ import annotations

from starlette.routing import BaseRoute

from services.deploy_kubernetes.web.badge import BADGE_ROUTES
from services.deploy_kubernetes.web.console import CONSOLE_ROUTES
from services.deploy_kubernetes.web.ended import ENDED_ROUTES
from services.deploy_kubernetes.web.pages import PAGE_ROUTES

WEB_ROUTES: list[BaseRoute] = [*PAGE_ROUTES, *BADGE_ROUTES, *CONSOLE_ROUTES, *ENDED_ROUTES]
