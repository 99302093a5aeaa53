"""Deployment: Triton model repository, server lifecycle, client."""
