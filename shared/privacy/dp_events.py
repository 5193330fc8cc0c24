"""Report entries as dp-accounting DpEvents, and DpEvents as JSON with dp-accounting's own (de)serialiser.

Why: privacy-report.json should be recomputable with dp-accounting alone. Each guarantee carries, next to its
readable mechanism entries, the DpEvent the PLD accountant composed, serialised with `DpEvent.to_named_tuple` and
read back with `DpEvent.from_named_tuple` (dp-accounting 0.6.0's own conversion, documented there as "for
serialization"). dp-accounting has no JSON form, so the only glue here is named tuple <-> JSON object (field
names kept, nesting recursive).

`DpEvent.from_named_tuple` imports the module and calls the class the data names; fed an untrusted report, that is
arbitrary code (e.g. {"module_name": "subprocess", "class_name": "run", ...}). `event_from_json` therefore
refuses anything but the dp-accounting event classes listed in `_ALLOWED` before handing over.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from typing import Any

import dp_accounting

from fedscore.shared.privacy.mechanisms import Neighbouring, flip_probability

_ALLOWED = {cls.__name__: cls for cls in (
    dp_accounting.ComposedDpEvent, dp_accounting.SelfComposedDpEvent, dp_accounting.PoissonSampledDpEvent,
    dp_accounting.GaussianDpEvent, dp_accounting.RandomizedResponseDpEvent)}
_MODULE = dp_accounting.GaussianDpEvent.__module__  # "dp_accounting.dp_event"


def rr_noise_parameter(epsilon: float) -> float:
    """dp-accounting's RR outputs a uniform bucket with probability p; on 2 buckets the flip rate is p/2."""
    return 2.0 * flip_probability(epsilon)


def entry_event(entry: dict[str, Any], relation: Neighbouring) -> dp_accounting.DpEvent:
    """The dp-accounting event of one report entry (`Mechanism.report_entry()`): the one translation both the
    reported epsilon and the report's `dp_event` come from.

    dp-accounting's replace-one Gaussian shifts both outputs by its noise multiplier's unit (distance 2), so a
    distance-`sensitivity` entry maps to 2*sigma/sensitivity there; under add/remove to sigma/sensitivity.
    """
    kind = entry.get("kind")
    count = int(entry.get("count", 1))
    if kind == "randomized_response":
        if relation != "replace_one":
            raise ValueError("randomized response is accounted under replace_one only")
        # Spelled out, not SelfComposedDpEvent: dp-accounting 0.6.0's PLD accountant drops the count of a
        # self-composed RandomizedResponseDpEvent (it composes it once), which would under-report.
        rr = dp_accounting.RandomizedResponseDpEvent(noise_parameter=rr_noise_parameter(float(entry["epsilon"])),
                                                     num_buckets=2)
        return dp_accounting.ComposedDpEvent([rr] * count)
    if kind != "gaussian":
        raise ValueError(f"report entry of unknown kind {kind!r}")
    scale = 2.0 if relation == "replace_one" else 1.0
    sigma = float(entry["noise_multiplier"]) / float(entry["sensitivity"])
    if entry.get("sampling", "none") != "poisson":
        # k Gaussians of multiplier s on one user are exactly one Gaussian of s / sqrt(k) (the privacy loss of a
        # Gaussian pair is Gaussian, and k of them add up to one): one event, instead of a k-fold self-composition
        # whose cost grows with k (an online service's k-th answer) and whose discretisation error adds up
        return dp_accounting.GaussianDpEvent(scale * sigma / math.sqrt(count))
    event = dp_accounting.PoissonSampledDpEvent(float(entry["sample_rate"]), dp_accounting.GaussianDpEvent(
        scale * sigma))
    return dp_accounting.SelfComposedDpEvent(event, count)


def guarantee_event(entries: Sequence[dict[str, Any]], relation: Neighbouring) -> dp_accounting.ComposedDpEvent:
    """All of one guarantee's entries composed: what its PLD epsilon is the epsilon of."""
    return dp_accounting.ComposedDpEvent([entry_event(e, relation) for e in entries])


def _plain(value: Any) -> Any:
    """A named tuple from `to_named_tuple` as JSON-ready dicts and lists (field names kept)."""
    if isinstance(value, dp_accounting.dp_event.DpEventNamedTuple):
        return {name: _plain(getattr(value, name)) for name in value._fields}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def event_to_json(event: dp_accounting.DpEvent) -> dict[str, Any]:
    """`event` in JSON, via dp-accounting's `to_named_tuple` (module_name and class_name included)."""
    return _plain(event.to_named_tuple())


def _named(value: Any) -> Any:
    """JSON back to the named-tuple form `DpEvent.from_named_tuple` reads, refusing any class not in `_ALLOWED`."""
    if isinstance(value, dict):
        if value.get("module_name") != _MODULE or value.get("class_name") not in _ALLOWED:
            raise ValueError(f"not a dp-accounting event this report may contain: "
                             f"{value.get('module_name')!r}.{value.get('class_name')!r}")
        fields = {name: _named(v) for name, v in value.items()}
        return collections.namedtuple(f"_{value['class_name']}Json", list(fields))(**fields)
    if isinstance(value, list):
        return [_named(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"non-finite number in a dp_event: {value}")
    return value


def event_from_json(data: dict[str, Any]) -> dp_accounting.DpEvent:
    """The DpEvent a report's `dp_event` describes, rebuilt by dp-accounting's own `DpEvent.from_named_tuple`."""
    return dp_accounting.DpEvent.from_named_tuple(_named(data))
