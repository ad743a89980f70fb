"""Fixtures of the jobs tests."""

from tests.jobs.tiny_model import trained_export  # noqa: F401 - a fixture: one tiny trained export per session
