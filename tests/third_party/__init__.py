"""Tests: third_party."""
