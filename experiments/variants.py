"""What both experiments do with a method name: a variant ("uce:positions=all") at the testbed's settings,
with fine-tuning progress bars off."""

from __future__ import annotations


def testbed_method(name: str):
    """(method, config) for a method or variant name, at the method's testbed settings."""
    from erasekit import methods

    method, values = methods.variant(name)
    if method.parts or method.fine_tuning:
        values = {"progress": "false", **values}
    return method, methods.build_config(method, values, testbed=True)

