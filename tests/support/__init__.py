"""Helpers shared by the tests (not tests themselves).

Found through pytest's `pythonpath = ["tests"]` (pyproject), so a test imports them as
`from support.mqtt import ...`; no `sys.path` inserts.
"""
