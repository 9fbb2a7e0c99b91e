"""The testbed's built-in suites (testbed:<value>, testbed:<a>+<b>): target prompts in each wording kind and
preservation prompts, every prompt with its seed and the values it asks for. erasekit.evaluation.suites
builds them through BUILT_IN["testbed"]."""

from __future__ import annotations

from ..errors import UserError
from ..evaluation.suites import PromptSet, Suite, SuitePrompt
from .prompts import TestbedPrompt, attribute_of, concept_prompts, preservation_prompts
from .world import ATTRIBUTES, VALUES, WORDING_KINDS

CONCEPT_SEED = 2000  # testbed target prompts' first seed, as in testbed.evaluate.measure_concepts
PRESERVATION_SEED = 3000  # testbed preservation prompts' first seed (concept seed + 1000)


def names() -> list[str]:
    """testbed:<value> for each testbed value."""
    return [f"testbed:{value}" for attr in ATTRIBUTES for value in VALUES[attr]]


def hint() -> str:
    return (f"testbed:<concept> with a concept from {', '.join(v for a in ATTRIBUTES for v in VALUES[a])} "
            "(testbed:<a>+<b> for several)")



def build(names: str, samples: int, concept: str | None) -> Suite:
    """Target sets (one per wording kind, `samples` prompts per concept) and one preservation set."""
    concepts = tuple(c.strip() for c in names.split("+"))
    _check_testbed_concepts(concepts, concept)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserError(f"samples must be a whole number of at least 1, got {samples!r}: give a positive count")
    sets = [PromptSet(f"target:{kind}", "target", _target_prompts(concepts, kind, samples)) for kind in WORDING_KINDS]
    keep = preservation_prompts(list(concepts), samples, PRESERVATION_SEED)
    sets.append(PromptSet("preservation", "preservation", tuple(_from_testbed(p) for p in keep)))
    return Suite(f"testbed:{'+'.join(concepts)}", concepts, "testbed", tuple(sets), "testbed", "testbed")


def _check_testbed_concepts(concepts: tuple[str, ...], concept: str | None) -> None:
    """Known values, no repeats, some value left per attribute for preservation, and `concept` among them."""
    attrs = [attribute_of(c) for c in concepts]  # raises UserError for an unknown value
    if len(set(concepts)) < len(concepts):
        raise UserError(f"testbed suite names a concept twice ({'+'.join(concepts)}): name each concept once")
    for attr in set(attrs):
        if attrs.count(attr) == len(VALUES[attr]):
            raise UserError(f"testbed suite {'+'.join(concepts)} names every {attr}, so no preservation prompt "
                            f"is possible: leave at least one {attr} out")
    if concept is not None and concept not in concepts:
        raise UserError(f"testbed:{'+'.join(concepts)} takes its concepts from its name, not {concept!r}: "
                        "drop the concept option or name the suite testbed:<concept>")


def _target_prompts(concepts: tuple[str, ...], kind: str, samples: int) -> tuple[SuitePrompt, ...]:
    """`samples` prompts per concept in wording `kind`, the concepts one after another."""
    return tuple(_from_testbed(p) for c in concepts for p in concept_prompts(c, kind, samples, CONCEPT_SEED))


def _from_testbed(p: TestbedPrompt) -> SuitePrompt:
    return SuitePrompt(p.text, int(p.seed), values=dict(p.values))
