"""Datasets: loading sources, corrupting training data, partitioning it over clients."""
