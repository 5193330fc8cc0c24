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
    """The dp-accounting event of one report entry (`Mechanism.report_entry()`) on its own.

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
    if _unsampled_gaussian(entry):
        return dp_accounting.GaussianDpEvent(_gaussian_multiplier([entry], relation))
    event = dp_accounting.PoissonSampledDpEvent(float(entry["sample_rate"]), dp_accounting.GaussianDpEvent(
        _scale(relation) * float(entry["noise_multiplier"]) / float(entry["sensitivity"])))
    return dp_accounting.SelfComposedDpEvent(event, count)


def _scale(relation: Neighbouring) -> float:
    return 2.0 if relation == "replace_one" else 1.0


def _unsampled_gaussian(entry: dict[str, Any]) -> bool:
    return entry.get("kind") == "gaussian" and entry.get("sampling", "none") != "poisson"


def _gaussian_multiplier(entries: Sequence[dict[str, Any]], relation: Neighbouring) -> float:
    """The noise multiplier (dp-accounting's units) of the one Gaussian that unsampled Gaussian entries compose to:
    1/s^2 = sum_i count_i / s_i^2, with s_i = sigma_i / sensitivity_i (times 2 under replace-one); 0 if any is 0.

    Exact, not an approximation (this is not the GDP accountant's central-limit composition, which the project
    never uses): the privacy loss of one Gaussian pair, N(0, s^2) against N(1, s^2) in units of the sensitivity, is
    itself Gaussian with mean 1/(2 s^2) and variance 1/s^2, so independent releases add means and variances and
    their composition is the pair of one Gaussian with 1/s^2 = sum 1/s_i^2. Multi-dimensional releases reduce to
    this one dimension along the difference of the two means (rotation invariance of isotropic noise).
    """
    precision = 0.0
    for entry in entries:
        sigma = _scale(relation) * float(entry["noise_multiplier"]) / float(entry["sensitivity"])
        if sigma == 0:
            return 0.0  # not DP: dp-accounting's accountant marks a zero-noise Gaussian non-private
        precision += int(entry.get("count", 1)) / sigma**2
    return 1.0 / math.sqrt(precision)


def gaussian_mu(gaussian: dp_accounting.GaussianDpEvent, relation: Neighbouring) -> float:
    """mu of this Gaussian event (mean shift over noise std, in GDP's terms; dp-accounting's replace-one Gaussian has
    distance 2): infinite without noise."""
    return math.inf if gaussian.noise_multiplier == 0 else _scale(relation) / gaussian.noise_multiplier


def split_event(entries: Sequence[dict[str, Any]], relation: Neighbouring
                ) -> tuple[dp_accounting.ComposedDpEvent, dp_accounting.GaussianDpEvent | None]:
    """(everything but the unsampled Gaussians, as one composed event; the one Gaussian those compose to, or None).

    Entries equal but for their count are one entry with the counts added (k then m releases of one mechanism are
    k + m releases). Randomized response stays spelled out, one event per entry (see `entry_event`).
    """
    gaussians = [e for e in entries if _unsampled_gaussian(e)]
    slots: list[dp_accounting.DpEvent | str] = []  # in entry order: an event, or the key of merged entries
    merged: dict[str, tuple[dict[str, Any], int]] = {}
    for e in entries:
        if _unsampled_gaussian(e):
            continue
        if e.get("kind") == "randomized_response":
            slots.append(entry_event(e, relation))
            continue
        key = repr(sorted((k, v) for k, v in e.items() if k != "count"))
        if key not in merged:
            slots.append(key)
        first, count = merged.get(key, (e, 0))
        merged[key] = (first, count + int(e.get("count", 1)))
    rest = [entry_event({**merged[s][0], "count": merged[s][1]}, relation) if isinstance(s, str) else s
            for s in slots]
    gaussian = dp_accounting.GaussianDpEvent(_gaussian_multiplier(gaussians, relation)) if gaussians else None
    return dp_accounting.ComposedDpEvent(rest), gaussian


def guarantee_event(entries: Sequence[dict[str, Any]], relation: Neighbouring) -> dp_accounting.ComposedDpEvent:
    """All of one guarantee's entries composed: what its PLD epsilon is the epsilon of.

    Every unsampled Gaussian entry (whatever its noise, count or sensitivity, one neighbouring relation) is merged
    into ONE GaussianDpEvent, last (`_gaussian_multiplier`: exact), instead of one event per entry: a guarantee
    that gains a Gaussian release per online answer then costs dp-accounting one Gaussian PLD whatever the count,
    not a composition per release whose cost (and discretisation error) grows with it. The rest comes first, in
    entry order, so the accountant's state after it is a prefix that can be remembered (accounting.py).
    """
    rest, gaussian = split_event(entries, relation)
    return dp_accounting.ComposedDpEvent([*rest.events, *([gaussian] if gaussian is not None else [])])


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
