"""Goodput planning: latency models fitted from profiles (latency.py), and later the
discrete-event simulator and the planner. No torch here: profiles are measured by
bench/lab/latency_profile.py and read as JSON."""
