"""The content-addressed blob store: a Django project served over HTTPS by uvicorn (serve.py, asgi.py)."""
