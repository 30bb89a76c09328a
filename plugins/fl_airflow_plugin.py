"""The project's Airflow plugin: the Federation page (plugins/fl_airflow/federation_page.py).

The api-server mounts the page's FastAPI app at its url_prefix, and the UI's navigation shows
an entry "Federations" that opens it inside the UI (an external view with a url_route: the
UI frames `href`, relative to its base URL, at /plugin/federations).

Every Airflow component loads plugins, the scheduler, dag-processor, triggerer and workers
included: this file and the page module import only FastAPI and the standard library; the
page loads Airflow's API internals, the coordinator and boto3 when a request comes.
"""

from __future__ import annotations

from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin
from fl_airflow.federation_page import URL_PREFIX, app

# Three linked nodes, drawn for a 24x24 box; the UI shows it as an image in the nav bar.
_ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="{color}" '
         'stroke-width="2" stroke-linecap="round"><circle cx="12" cy="5" r="2.5"/><circle cx="5" cy="18" r="2.5"/>'
         '<circle cx="19" cy="18" r="2.5"/><path d="M10.8 7.2 6.2 15.8M13.2 7.2l4.6 8.6M7.5 18h9"/></svg>')


def _icon(color: str) -> str:
    return "data:image/svg+xml," + quote(_ICON.format(color=color))


class FlAirflowPlugin(AirflowPlugin):
    name = "fl_airflow"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "Federation page"}]
    external_views = [{
        "name": "Federations",
        "href": URL_PREFIX.lstrip("/") + "/",  # relative: the UI resolves it against its own base URL
        "url_route": "federations",
        "destination": "nav",
        "nav_top_level": True,
        "icon": _icon("#4a5568"),
        "icon_dark_mode": _icon("#e2e8f0"),
    }]
