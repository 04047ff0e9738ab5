"""Test-wide settings.

Hypothesis draws new examples on every run here (a developer's run explores), but CI, where a
failure blocks the submission, runs a fixed set: `.ci/run` sets HYPOTHESIS_PROFILE=ci
(derandomize: the examples follow from each test's name, so a CI result is reproducible).
"""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
