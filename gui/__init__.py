"""The Flask application for clinical data managers."""
