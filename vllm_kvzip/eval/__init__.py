"""Evaluation data shared by the project: seeded synthetic long-context tasks (`synthetic`) and text generators (`textgen`)."""
