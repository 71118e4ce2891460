"""Benchmarks of django-pgnotify, each measured beside its baseline in the same run."""
