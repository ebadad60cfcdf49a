"""Serving engines as bench subjects: an OpenAI-compatible endpoint, its workload, its metrics."""
