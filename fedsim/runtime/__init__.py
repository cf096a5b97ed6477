"""Runtimes that drive fedsim's ServerApp logic against its ClientApp."""
