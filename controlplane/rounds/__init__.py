"""Federated rounds: eligibility, invitations, Flower runs, round records (schedules: controlplane.schedules)."""
