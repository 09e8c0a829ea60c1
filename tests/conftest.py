"""Test-session settings shared by every module."""
from __future__ import annotations

# The modules that run the workflow, slowest first: `make test` spreads whole modules over 2 workers (pytest-xdist
# --dist loadfile) in collection order, so the long ones start at once and the short ones fill in around them.
SLOWEST_FIRST = ("test_workflow.py", "test_slurm.py", "test_planted_effects.py", "test_reruns.py",
                 "test_mimic_demo.py", "test_resume.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order
