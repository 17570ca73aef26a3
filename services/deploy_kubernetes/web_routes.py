"""Every route of the web front end (pages, badges, the operator console), for the deploy API's
route table."""

from __future__ import annotations

from starlette.routing import BaseRoute

from services.deploy_kubernetes.badge import BADGE_ROUTES
from services.deploy_kubernetes.console import CONSOLE_ROUTES
from services.deploy_kubernetes.pages import PAGE_ROUTES

WEB_ROUTES: list[BaseRoute] = [*PAGE_ROUTES, *BADGE_ROUTES, *CONSOLE_ROUTES]
