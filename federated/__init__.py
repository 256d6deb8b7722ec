"""Federated learning: tasks, Flower apps, model build/quantize/sign, burst worker."""
