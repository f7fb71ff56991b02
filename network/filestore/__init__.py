"""The content-addressed blob store: a Django project served by waitress (serve.py)."""
