"""Pipelines: the target grammar, named pipelines' validation and expansion, and plans.

A request's *target* names what to run on one document: an expert, a
``[pipeline:NAME]``, or stages written ``a, b + c`` (``,`` separates stages run
in order, ``+`` joins the independent experts of one stage).  This module
turns a target into a :class:`Plan` (:func:`plan_of`), validates and expands
the config's ``[pipeline:NAME]`` sections (:func:`load_pipelines`, called by
:func:`expertd.config.load_config`) and checks that every expert that declares
``@expert(reads=...)`` finds those opinions written by an earlier stage
(:func:`check_reads`, called once the experts are loaded).

Pure: no I/O and no state; standard library and :mod:`expertd.errors` only,
so that the master, the workers and the tests share it (docs: the pipeline
design, issue #16).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from expertd.errors import BadRequest, ConfigError, UnknownExpert

ON_ERROR = ("continue", "stop")
# Experts and pipelines share this rule; it leaves ',' and '+' free for the target grammar.
EXPERT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
NAME_RULE = "use letters, digits, '_', '.', '-', starting with a letter or '_'"
PIPELINE_PREFIX = "pipeline:"
_KNOWN_SHOWN = 10  # names listed in an unknown-name error: enough to spot a typo, short enough for one line

Stages = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class PipelineSpec:
    """A ``[pipeline:NAME]`` section, validated; ``stages`` hold experts only (nested pipelines expanded)."""

    name: str
    stages: Stages
    on_error: str = "continue"
    timeout: float | None = None  # the section's own; None: summed over the stages (see plan_of)
    text: str = ""  # the stages as written in the file


@dataclass(frozen=True)
class Plan:
    """What one pipeline request runs: experts in stages, in order, within ``timeout`` seconds in all."""

    target: str  # as the request gave it
    name: str | None  # the pipeline's, when the target is exactly one pipeline name
    stages: Stages
    on_error: str
    timeout: float
    limits: tuple[float, ...] = ()  # per stage: its longest expert timeout (what the stage may take)


class _Unknown(LookupError):
    """A target names something that is neither an expert nor a pipeline (``args[0]``: the name)."""


def _show(text: str) -> str:
    """``text`` quoted for a one-line message; targets come from clients, so long ones are cut."""
    return repr(text) if len(text) <= 80 else repr(text[:77] + "...")


def parse_target(text: str) -> tuple[tuple[str, ...], ...]:
    """The stages a target writes, as names; syntax only (a name may be anything well formed).

    Raises ValueError with a one-line reason for empty text, an empty stage or
    name, or a malformed name.
    """
    if not isinstance(text, str):
        raise ValueError(f"a target is text, not {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty; name an expert, a pipeline, or stages such as 'a, b + c'")
    stages = []
    for number, stage in enumerate(text.split(","), 1):
        if not stage.strip():
            raise ValueError(f"stage {number} is empty; separate stages with one ','")
        names = []
        for name in stage.split("+"):
            name = name.strip()
            if not name:
                raise ValueError(f"stage {number} has an empty name; "
                                 "join the experts of a stage with one '+' between names")
            if not EXPERT_NAME.fullmatch(name):
                raise ValueError(f"{_show(name)} is not a name; {NAME_RULE} "
                                 "(',' separates stages, '+' joins the experts of one stage)")
            names.append(name)
        stages.append(tuple(names))
    return tuple(stages)


def _expand(parsed: Stages, experts: Container[str], stages_of: Callable[[str], Stages | None]) -> Stages:
    """``parsed`` with each pipeline replaced by its stages.

    ``stages_of(name)`` gives a pipeline's expanded stages (None: not a
    pipeline).  Raises _Unknown, or ValueError (one line) for a pipeline
    sharing a stage or an expert named twice.
    """
    expanded: list[tuple[str, ...]] = []
    origin: dict[str, str] = {}  # expert -> where it came from, for the "twice" message
    for number, stage in enumerate(parsed, 1):
        pieces: list[tuple[tuple[str, ...], str]] = []  # (stages, where), one entry per name
        for name in stage:
            if name in experts:
                pieces.append((((name,),), f"stage {number}"))
                continue
            nested = stages_of(name)
            if nested is None:
                raise _Unknown(name)
            if len(stage) > 1:
                raise ValueError(f"stage {number}: a pipeline cannot share a stage; give {name} its own stage")
            pieces.append((nested, f"stage {number} (through pipeline {name})"))
        for part, where in pieces:
            for expert in (expert for nested_stage in part for expert in nested_stage):
                if expert in origin:
                    places = f"in {where}" if origin[expert] == where else f"in {origin[expert]} and {where}"
                    raise ValueError(f"{expert} is named twice {places}; name each expert once (its opinion "
                                     "would be overwritten)")
                origin[expert] = where
        if len(pieces) == 1:
            expanded.extend(pieces[0][0])  # an expert, or a pipeline alone in its stage: its stages, in order
        else:
            expanded.append(tuple(expert for part, _ in pieces for expert in part[0]))
    return tuple(expanded)


def _timeout(parsed: Stages, experts: Container[str], pipelines: Mapping[str, PipelineSpec],
             expert_timeout: Callable[[str], float], seen: frozenset[str] = frozenset()) -> float:
    """Seconds ``parsed`` (already expanded once, so every name is known) may take.

    Each stage takes its longest expert's timeout; a pipeline's stage takes the
    pipeline's own timeout if it sets one, so that a nested pipeline's bound
    holds wherever it is named.
    """
    total = 0.0
    for stage in parsed:
        name = stage[0]
        spec = pipelines.get(name) if len(stage) == 1 and name not in experts else None
        if spec is None:
            total += max(expert_timeout(expert) for expert in stage)
        elif spec.timeout is not None:
            total += spec.timeout
        else:
            total += _spec_timeout(spec, experts, pipelines, expert_timeout, seen)
    return total


def _spec_timeout(spec: PipelineSpec, experts: Container[str], pipelines: Mapping[str, PipelineSpec],
                  expert_timeout: Callable[[str], float], seen: frozenset[str]) -> float:
    """A pipeline's timeout with none of its own: over its stages as written (so nested bounds count)."""
    try:
        written = parse_target(spec.text)
        if spec.name in seen or _expand(written, experts, _stages_in(pipelines)) != spec.stages:
            raise ValueError("text and stages disagree")
    except (ValueError, _Unknown):  # a spec not built by load_pipelines: its expanded stages are the truth
        return sum(max(expert_timeout(expert) for expert in stage) for stage in spec.stages)
    return _timeout(written, experts, pipelines, expert_timeout, seen | {spec.name})


def _stages_in(pipelines: Mapping[str, PipelineSpec]) -> Callable[[str], Stages | None]:
    def stages_of(name: str) -> Stages | None:
        spec = pipelines.get(name)
        return spec.stages if spec is not None else None

    return stages_of


def _known(name: str, experts: Container[str], pipelines: Mapping[str, Any]) -> str:
    """What to say after an unknown name: a close match, and a short list of what there is."""
    names = sorted({*(experts if isinstance(experts, Iterable) else ()), *pipelines})
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(names[:_KNOWN_SHOWN]) or "none"
    more = f" and {len(names) - _KNOWN_SHOWN} more" if len(names) > _KNOWN_SHOWN else ""
    return f"{hint}known: {shown}{more}"


def plan_of(target: str, experts: Container[str], pipelines: Mapping[str, PipelineSpec],
            expert_timeout: Callable[[str], float]) -> Plan:
    """The plan a request's target names.

    A single expert name is a one-stage plan; a single pipeline name is that
    pipeline (its ``on_error`` and name); anything else is an ad-hoc plan that
    continues past failures.  Its timeout is the pipeline's own if it sets one,
    else the sum over the stages of each stage's longest expert timeout
    (``expert_timeout`` is called with expert names only).

    Raises UnknownExpert for a name that is neither an expert nor a pipeline,
    BadRequest for bad syntax, a pipeline sharing a stage, or an expert named
    twice.
    """
    try:
        parsed = parse_target(target)
        stages = _expand(parsed, experts, _stages_in(pipelines))
    except _Unknown as exc:
        name = exc.args[0]
        raise UnknownExpert(f"no expert or pipeline named {name!r}; {_known(name, experts, pipelines)}",
                            expert=name) from None
    except ValueError as exc:
        raise BadRequest(f"target {_show(target)}: {exc}") from None
    spec = pipelines.get(parsed[0][0]) if len(parsed) == 1 and len(parsed[0]) == 1 else None
    if spec is not None and parsed[0][0] not in experts:
        timeout = spec.timeout if spec.timeout is not None else _spec_timeout(
            spec, experts, pipelines, expert_timeout, frozenset())
        return Plan(target, spec.name, stages, spec.on_error, timeout, _limits(stages, expert_timeout))
    return Plan(target, None, stages, ON_ERROR[0], _timeout(parsed, experts, pipelines, expert_timeout),
                _limits(stages, expert_timeout))


def _limits(stages: Stages, expert_timeout: Callable[[str], float]) -> tuple[float, ...]:
    return tuple(max(expert_timeout(expert) for expert in stage) for stage in stages)


def load_pipelines(sections: Mapping[str, Mapping[str, Any]], path: str,
                   experts: Container[str]) -> dict[str, PipelineSpec]:
    """Validate the ``[pipeline:NAME]`` sections and expand nested pipelines.

    ``sections`` maps each pipeline's name (already checked against
    EXPERT_NAME) to its settings, parsed by their types: ``stages`` (text),
    ``on_error``, ``timeout`` (seconds); an absent key takes its default.
    Raises ConfigError, one line naming ``path``, the section and the key.
    """
    written: dict[str, Stages] = {}
    for name, values in sections.items():
        where = f"{path}: [{PIPELINE_PREFIX}{name}]"
        if name in experts:
            raise ConfigError(f"{where}: an expert is named {name} too; rename the pipeline "
                              "(experts and pipelines share one namespace)")
        if "stages" not in values:
            raise ConfigError(f"{where}: no stages; add 'stages = EXPERT, EXPERT + EXPERT' (',' separates "
                              "stages, '+' joins the experts of one stage)")
        try:
            written[name] = parse_target(values["stages"])
        except ValueError as exc:
            raise ConfigError(f"{where} stages: {exc}") from None

    expanded: dict[str, Stages] = {}

    def expand(name: str, chain: tuple[str, ...]) -> Stages:
        # Depth first, so that a pipeline that names itself, however far round, is found before it loops.
        if name in chain:
            cycle = [*chain[chain.index(name):], name]
            head, *rest = cycle
            path_text = ", which names ".join(rest) if len(cycle) > 2 else f"{head} itself"
            raise ConfigError(f"{path}: [{PIPELINE_PREFIX}{head}] stages: names {path_text}: a cycle; "
                              "remove one of these references")
        if name not in expanded:
            def stages_of(nested: str) -> Stages | None:
                return expand(nested, (*chain, name)) if nested in written else None

            try:
                expanded[name] = _expand(written[name], experts, stages_of)
            except _Unknown as exc:
                unknown = exc.args[0]
                raise ConfigError(f"{path}: [{PIPELINE_PREFIX}{name}] stages: no expert or pipeline named "
                                  f"{unknown!r}; {_known(unknown, experts, written)}") from None
            except ValueError as exc:
                raise ConfigError(f"{path}: [{PIPELINE_PREFIX}{name}] stages: {exc}") from None
        return expanded[name]

    return {
        name: PipelineSpec(name=name, stages=expand(name, ()), on_error=values.get("on_error", ON_ERROR[0]),
                           timeout=values.get("timeout"), text=values["stages"].strip())
        for name, values in sections.items()
    }


def check_reads(pipelines: Mapping[str, PipelineSpec], reads: Mapping[str, Iterable[str]]) -> str | None:
    """The first named pipeline where an expert reads an opinion no earlier stage writes, as one line.

    ``reads`` maps expert names to the opinions they declare they read
    (``@expert(reads=...)``); experts missing from it read nothing.  The line
    starts at the section (``[pipeline:NAME] stages: ...``): the caller adds
    the file.  None when every pipeline is sound.  Ad-hoc targets are never
    checked: their document may already carry the opinion.
    """
    for spec in pipelines.values():
        stage_of = {expert: number for number, stage in enumerate(spec.stages, 1) for expert in stage}
        for number, stage in enumerate(spec.stages, 1):
            for expert in stage:
                for opinion in reads.get(expert, ()):
                    writer = stage_of.get(opinion)
                    if writer is not None and writer < number:
                        continue
                    if writer == number:
                        why = (f"which {opinion} writes in the same stage (each expert of a stage sees the "
                               "document as it was before the stage)")
                    elif writer is not None:
                        why = f"which only a later stage ({writer}) writes"
                    else:
                        why = "which no earlier stage writes"
                    return (f"[{PIPELINE_PREFIX}{spec.name}] stages: {expert} (stage {number}) reads "
                            f"opinions.{opinion}, {why}; put {opinion} in an earlier stage")
    return None
