"""Jinja2 templates shipped as package data (listed as a package so setuptools installs them without a deprecation
warning about an unlisted importable folder)."""
