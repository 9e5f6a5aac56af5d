"""Flower server strategies by name (thin wrappers over ``flwr.serverapp.strategy``)."""
