"""Federated runs: Flower ClientApp / ServerApp and the engine that runs them on Ray."""
