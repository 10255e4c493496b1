"""`somabrain admin serve`: the admin API in a process of its own."""

from __future__ import annotations

import logging

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from somabrain.config.settings import AdminSettings
from somabrain.edges.admin.api import create_app
from somabrain.edges.admin.auth import TokenFile
from somabrain.store.engine import make_engine

log = logging.getLogger(__name__)


def serve(settings: AdminSettings) -> None:
    """Serve until SIGTERM or SIGINT (uvicorn stops taking requests and lets the ones
    in progress finish)."""
    tokens = TokenFile(settings.admin_tokens_file)
    engine = make_engine(settings.database_url, pool_size=5)
    app = create_app(sessionmaker(engine, class_=Session), tokens)
    log.info("admin API listening on %s:%d", settings.admin_host, settings.admin_port)
    try:
        uvicorn.run(
            app,
            host=settings.admin_host,
            port=settings.admin_port,
            log_config=None,
            timeout_graceful_shutdown=20,
        )
    finally:
        engine.dispose()
