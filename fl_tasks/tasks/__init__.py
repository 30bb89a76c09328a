"""The task API, and the built-in tasks."""
