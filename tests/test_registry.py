"""The mixer registry: every registered class conforms to the Mixer Protocol's signatures (and
to MixerWithAuxLoss's where it has an aux_loss), and its defaults are an instance of its Args.

The LM calls every mixer one way (x, positions=, cache=, segment_ids=) with no probing at run
time, so a class whose signatures drift from the Protocol is caught here, not in a trace.
"""

import dataclasses
import inspect

import pytest

from layers.registry import MIXERS, Mixer, MixerWithAuxLoss

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
KEYWORD = inspect.Parameter.KEYWORD_ONLY


def signature_problems(want_fn, got_fn) -> list[str]:
    """How `got_fn` fails to accept every call `want_fn`'s signature allows (positional
    parameters by position, keyword-only ones by name, optional ones staying optional); its
    extra parameters must be optional."""
    want = list(inspect.signature(want_fn).parameters.values())
    got = list(inspect.signature(got_fn).parameters.values())
    problems = []
    want_pos = [p for p in want if p.kind in POSITIONAL]
    got_pos = [p for p in got if p.kind in POSITIONAL]
    if len(got_pos) < len(want_pos):
        problems.append(f"takes {len(got_pos)} positional parameters, not {len(want_pos)}")
    for w, g in zip(want_pos, got_pos):
        if w.default is not inspect.Parameter.empty and g.default is inspect.Parameter.empty:
            problems.append(f"positional parameter {g.name!r} must be optional")
    got_kw = {p.name: p for p in got if p.kind in (*POSITIONAL, KEYWORD)}
    for w in (p for p in want if p.kind == KEYWORD):
        g = got_kw.get(w.name)
        if g is None:
            problems.append(f"lacks keyword parameter {w.name!r}")
        elif w.default is not inspect.Parameter.empty and g.default is inspect.Parameter.empty:
            problems.append(f"keyword parameter {w.name!r} must be optional")
    named = {p.name for p in want if p.kind == KEYWORD}
    for g in got[len(want_pos):]:
        if g.name not in named and g.kind in (*POSITIONAL, KEYWORD) \
                and g.default is inspect.Parameter.empty:
            problems.append(f"extra parameter {g.name!r} must be optional")
    return problems


def test_signature_check_catches_drift():
    """The check itself: a missing keyword, a required extra and a required optional fail."""
    def want(self, x, *, positions, cache=None, segment_ids=None): ...

    def fine(self, x, *, positions, cache=None, segment_ids=None, dispatch=None): ...
    def no_segments(self, x, *, positions, cache=None): ...
    def required_extra(self, x, *, positions, cache=None, segment_ids=None, extra): ...
    def required_cache(self, x, *, positions, cache, segment_ids=None): ...

    assert signature_problems(want, fine) == []
    assert signature_problems(want, no_segments) == ["lacks keyword parameter 'segment_ids'"]
    assert signature_problems(want, required_extra) == ["extra parameter 'extra' must be optional"]
    assert signature_problems(want, required_cache) == ["keyword parameter 'cache' must be "
                                                        "optional"]


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_registered_mixer_conforms_to_the_protocol(name):
    cls = MIXERS[name].cls
    assert dataclasses.is_dataclass(cls.Args), name
    assert cls.Args.__dataclass_params__.frozen, name
    assert isinstance(MIXERS[name].defaults, cls.Args), name
    # check_config runs on the class, before any instance exists.
    assert isinstance(inspect.getattr_static(cls, "check_config"), staticmethod), name
    for method in ("check_config", "init_cache", "__call__"):
        assert signature_problems(getattr(Mixer, method), getattr(cls, method)) == [], \
            (name, method)
    if hasattr(cls, "aux_loss"):
        assert signature_problems(MixerWithAuxLoss.aux_loss, cls.aux_loss) == [], name
