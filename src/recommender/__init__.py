"""Exact, location-aware restaurant recommendations."""
