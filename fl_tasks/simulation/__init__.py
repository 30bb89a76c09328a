"""Simulated silos over a real or generated data set, and attacks that wrap the honest agent."""
