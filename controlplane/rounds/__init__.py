"""Federated rounds: eligibility, invitations, Flower runs, schedules."""
