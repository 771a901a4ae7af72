"""The browser annotator of ``gpual annotate``: a person labels a round's queried superpixels.

:mod:`gpual.annotator.server` holds the session (what may be served, the predictions, the
serialised writes into :mod:`gpual.label_store`), the Starlette app and its uvicorn
runner; ``static/`` holds the page (plain HTML, JavaScript and CSS: no build step, no
CDN, works offline).
"""
from __future__ import annotations

from gpual.annotator.server import MAX_BODY_BYTES, AnnotationSession, AnnotatorServer, create_app, is_local_host

__all__ = ["MAX_BODY_BYTES", "AnnotationSession", "AnnotatorServer", "create_app", "is_local_host"]
