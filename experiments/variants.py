"""What both experiments do with a method name: a variant ("uce:positions=all") at the testbed's settings,
with fine-tuning progress bars off, and the spec it erases with."""

from __future__ import annotations


def testbed_method(name: str):
    """(method, config) for a method or variant name, at the method's testbed settings."""
    from erasekit import methods

    method, values = methods.variant(name)
    if method.parts or method.fine_tuning:
        values = {"progress": "false", **values}
    return method, methods.build_config(method, values, testbed=True)


def testbed_spec(method, concepts):
    """The testbed erasure spec in the form the method takes: captions, except for the ESD family (ESD,
    Co-Erasing, SCORE), which gets the concept phrases alone, as their papers do."""
    from erasekit.testbed.spec import erasure_spec

    return erasure_spec(list(concepts), captions=not method.phrases_only)
