"""``ubc-serve``: an HTTP scoring service (ASGI, FastAPI on uvicorn) over one ``Predictor``
per process, with health, readiness and Prometheus metrics. Needs ``pip install ubc[serve]``.
"""

from __future__ import annotations

from ubc.serve.app import ServeConfig, app_from_env, create_app

__all__ = ["ServeConfig", "create_app", "app_from_env"]
