"""Routing rules and destinations from the model-serve spec (``routes:`` and ``destinations:``).

A rule names the series it wants by regular expressions over the series' attributes, the model
(or cascade) to run on it, the request fields to run it with, and where to send the DICOM results.
The format (kept from the issue that introduced it, extended with ``rerun`` and retry settings)::

    destinations:                  # also the only allowed C-MOVE destinations
      PACS: {ae_title: PACS, host: 127.0.0.1, port: 11113, max_attempts: 5, retry_delay_s: 5}
    routes:
      - name: phantom-ct
        match: {Modality: CT, SeriesDescription: "(?i).*phantom.*", called_ae: NNUNET_NODE}
        nnunet_id: phantom         # or a list: a cascade
        args: {tta: false}         # any /infer request field but the paths the node fills in
        destinations: [PACS]
        quiet_seconds: 5           # overrides NNUNET_NODE_SERIES_QUIET_S
        rerun: true                # later instances run it again and supersede the earlier job

Everything is checked when the spec is loaded; a mistake raises :class:`ConfigError` naming the
rule and the key, so a node never starts with a rule that cannot fire.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from nnunet_node.core.errors import ConfigError
from nnunet_node.inference.request import InferenceRequest

LOGGER = logging.getLogger(__name__)

# Attributes of the association rather than of the dataset.
ASSOCIATION_KEYS = ("called_ae", "calling_ae")
# Request fields the node fills in for an archive job: a rule may not set them. (A rule may set
# ``series_folders`` with ``{series}`` placeholders, e.g. to feed a cascade: see JobService.submit.)
NODE_FILLED_FIELDS = frozenset({"study_path", "output_dir"})
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2
_DESTINATION_KEYS = {"ae_title", "host", "port", "max_attempts", "retry_delay_s"}
_ROUTE_KEYS = {"name", "match", "nnunet_id", "args", "destinations", "quiet_seconds", "rerun"}


@dataclass(frozen=True)
class Destination:
    """A peer AE the node sends to: a rule's results, or a C-MOVE's sub-operations."""

    name: str
    ae_title: str
    host: str
    port: int
    max_attempts: int = 5
    """Dispatch attempts before a dispatch is marked failed (it can be retried by hand)."""
    retry_delay_s: float = 5.0
    """Delay before the second attempt; doubled after each failure (at most 10 minutes)."""


@dataclass(frozen=True)
class Route:
    """One routing rule. ``match`` maps an attribute keyword to a compiled full-match pattern."""

    name: str
    match: Mapping[str, re.Pattern[str]]
    nnunet_id: str | tuple[str, ...]
    args: Mapping[str, Any] = field(default_factory=dict)
    destinations: tuple[str, ...] = ()
    quiet_seconds: float | None = None
    rerun: bool = True

    def matches(self, attributes: Mapping[str, str]) -> bool:
        """Every pattern matches the whole value; an absent attribute counts as empty."""
        return all(p.fullmatch(attributes.get(k, "")) for k, p in self.match.items())

    def quiet_period(self, default_s: float) -> float:
        return default_s if self.quiet_seconds is None else self.quiet_seconds

    def request(self) -> dict[str, Any]:
        """The /infer request a matching series gets (the node adds paths and series)."""
        nnunet_id: str | list[str] = (
            list(self.nnunet_id) if isinstance(self.nnunet_id, tuple) else self.nnunet_id
        )
        return {"nnunet_id": nnunet_id, "is_dicom": True, **dict(self.args)}


@dataclass(frozen=True)
class RoutingTable:
    destinations: Mapping[str, Destination] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()

    @classmethod
    def from_spec(cls, raw: Mapping[str, Any] | None) -> RoutingTable:
        """Parse the spec's ``destinations`` and ``routes`` (other keys are ignored)."""
        raw = raw or {}
        destinations = _parse_destinations(raw.get("destinations"))
        routes = _parse_routes(raw.get("routes"), destinations)
        LOGGER.info("routing: %d destination(s), %d rule(s)", len(destinations), len(routes))
        return cls(destinations=destinations, routes=routes)

    def matching(self, attributes: Mapping[str, str]) -> list[Route]:
        return [route for route in self.routes if route.matches(attributes)]

    def route(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)

    def destination_by_ae(self, ae_title: str) -> Destination | None:
        """The destination a C-MOVE names by AE title (PS3.4 C.4.2.1.4.1); ``None`` if unknown."""
        wanted = ae_title.strip()
        return next((d for d in self.destinations.values() if d.ae_title == wanted), None)

    def match_keywords(self) -> set[str]:
        """Every attribute keyword some rule looks at."""
        return {k for r in self.routes for k in r.match}

    def check_models(self, resolve: Any) -> None:
        """Resolve each rule's model names with ``resolve(name)`` (a registry's ``resolve``) so
        an unknown model fails at start-up, naming the rule."""
        for route in self.routes:
            ids = route.nnunet_id if isinstance(route.nnunet_id, tuple) else (route.nnunet_id,)
            for model in ids:
                try:
                    resolve(model)
                except Exception as exc:
                    raise ConfigError(f"routes[{route.name}].nnunet_id: {exc}") from exc


def attribute_text(value: Any) -> str:
    """An attribute value as matched by rules: multiple values joined by a backslash (PS3.5 6.4)."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(attribute_text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    return str(value).strip()


def series_attributes(
    header: Dataset, *, called_ae: str = "", calling_ae: str = "", keywords: Iterable[str] = ()
) -> dict[str, str]:
    """What rules match on: ``keywords`` of the series' first instance (read without pixels)
    plus the AE titles of the association that brought it."""
    attributes = {"called_ae": called_ae.strip(), "calling_ae": calling_ae.strip()}
    for keyword in keywords:
        if keyword in ASSOCIATION_KEYS:
            continue
        element = header.get(keyword)
        attributes[keyword] = "" if element is None else attribute_text(element)
    return attributes


# --- parsing ------------------------------------------------------------------------------


def _parse_destinations(raw: Any) -> dict[str, Destination]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError("destinations: must be a mapping of name -> {ae_title, host, port}")
    found: dict[str, Destination] = {}
    titles: dict[str, str] = {}
    for name, entry in raw.items():
        where = f"destinations.{name}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: must be a mapping with ae_title, host and port")
        unknown = set(entry) - _DESTINATION_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        ae_title = str(entry.get("ae_title", "")).strip()
        if not _AE_TITLE.match(ae_title):
            raise ConfigError(
                f"{where}.ae_title: {ae_title!r} is not 1 to 16 printable characters "
                "without a backslash"
            )
        if ae_title in titles:
            raise ConfigError(f"{where}.ae_title: {ae_title!r} is also used by {titles[ae_title]}")
        host = entry.get("host")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{where}.host: required (a host name or address)")
        port = entry.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ConfigError(f"{where}.port: {port!r} is not a port number (1-65535)")
        attempts = entry.get("max_attempts", 5)
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise ConfigError(f"{where}.max_attempts: {attempts!r} is not a positive integer")
        delay = entry.get("retry_delay_s", 5.0)
        if not isinstance(delay, int | float) or isinstance(delay, bool) or delay < 0:
            raise ConfigError(f"{where}.retry_delay_s: {delay!r} is not a number >= 0")
        titles[ae_title] = str(name)
        found[str(name)] = Destination(
            str(name), ae_title, host, port, max_attempts=attempts, retry_delay_s=float(delay)
        )
    return found


def _compile_match(where: str, raw: Any) -> dict[str, re.Pattern[str]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping of attribute keyword -> regular expression")
    patterns: dict[str, re.Pattern[str]] = {}
    for keyword, pattern in raw.items():
        keyword = str(keyword)
        if keyword not in ASSOCIATION_KEYS and keyword not in keyword_dict:
            raise ConfigError(
                f"{where}.{keyword}: not a DICOM attribute keyword (nor called_ae/calling_ae)"
            )
        if keyword in keyword_dict and dictionary_VR(keyword_dict[keyword]) == "SQ":
            raise ConfigError(f"{where}.{keyword}: a sequence cannot be matched")
        if isinstance(pattern, bool) or not isinstance(pattern, str | int | float):
            raise ConfigError(f"{where}.{keyword}: must be a regular expression (a string)")
        try:
            patterns[keyword] = re.compile(str(pattern))
        except re.error as exc:
            raise ConfigError(
                f"{where}.{keyword}: bad regular expression {pattern!r}: {exc}"
            ) from exc
    return patterns


def _parse_routes(raw: Any, destinations: Mapping[str, Destination]) -> tuple[Route, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("routes: must be a list of rules")
    routes: list[Route] = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"routes[{index}]: must be a mapping")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise ConfigError(f"routes[{index}].name: required, a string of at most 64 characters")
        where = f"routes[{name}]"
        if any(r.name == name for r in routes):
            raise ConfigError(f"{where}: the name is used by an earlier rule")
        unknown = set(entry) - _ROUTE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        match = _compile_match(f"{where}.match", entry.get("match"))

        nnunet_id = entry.get("nnunet_id")
        if isinstance(nnunet_id, list) and nnunet_id and all(isinstance(m, str) for m in nnunet_id):
            model: str | tuple[str, ...] = tuple(nnunet_id)
        elif isinstance(nnunet_id, str) and nnunet_id:
            model = nnunet_id
        else:
            raise ConfigError(f"{where}.nnunet_id: required, a model name or a list of them")

        args = entry.get("args") or {}
        if not isinstance(args, Mapping):
            raise ConfigError(f"{where}.args: must be a mapping of /infer request fields")
        for key in args:
            if key in NODE_FILLED_FIELDS or key == "nnunet_id":
                raise ConfigError(f"{where}.args.{key}: set by the node for archive jobs")
            if key not in InferenceRequest.model_fields:
                raise ConfigError(f"{where}.args.{key}: not an /infer request field")

        targets = entry.get("destinations") or []
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list):
            raise ConfigError(f"{where}.destinations: must be a list of destination names")
        for target in targets:
            if target not in destinations:
                raise ConfigError(
                    f"{where}.destinations: {target!r} is not in destinations "
                    f"({sorted(destinations) or 'none defined'})"
                )

        quiet = entry.get("quiet_seconds")
        if quiet is not None and (
            isinstance(quiet, bool) or not isinstance(quiet, int | float) or quiet < 0
        ):
            raise ConfigError(f"{where}.quiet_seconds: {quiet!r} is not a number >= 0")
        rerun = entry.get("rerun", True)
        if not isinstance(rerun, bool):
            raise ConfigError(f"{where}.rerun: must be true or false")
        route = Route(
            name=name,
            match=match,
            nnunet_id=model,
            args=dict(args),
            destinations=tuple(str(t) for t in targets),
            quiet_seconds=None if quiet is None else float(quiet),
            rerun=rerun,
        )
        try:
            InferenceRequest.model_validate(route.request())
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"{where}.args: {problems}") from exc
        routes.append(route)
    return tuple(routes)
