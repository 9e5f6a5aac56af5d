"""The central analysis module: pure functions of (model, ExampleTable) -> numbers.

Nothing here imports Flower.
"""
