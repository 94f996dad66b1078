"""The one place ferry's state machines are built, from the YAML in ``statecharts/``.

The YAML is the source of truth: code asks a :class:`Statechart` what a state
means (``has_control``, ``clients_allowed``) instead of keeping its own list,
the diagrams are generated from it, and :func:`ferry.replay.replay` judges a
trace against it.  :func:`build` turns a chart into a ``transitions.Machine``
configured the same way every time: ``queued=True`` (a trigger fired from a
callback runs after the current transition, never in the middle of it),
``send_event=True``, no auto transitions, illegal triggers raise, and one
``finalize_event`` hook writes every event to the trace.

The file format, ``statecharts/NAME.yaml`` (the chart is named after its
file)::

    initial: starting            # the state every machine is built in

    states:                      # in the order the diagrams list them
      serving:
        description: one line saying what the state means
        has_control: true        # any other key is a property: bool, int or str;
        clients_allowed: true    # every state declares the same properties

    transitions:                 # one table: [trigger, source(s), dest]
      - [serve,    starting,                 serving]
      - [shutdown, [starting, serving],      stopped]
      - [quiesce,  migrating,  quiescing, {role: quiesce}]   # an effect on another machine

A row may end with its *effects*: ``{machine: trigger}``, the trigger that
another machine takes whenever this one takes the row's transition.  That is
how one machine drives another from a single table (the migration moves the
export's role): :func:`build` fires them, given a follower for the machine.

Names of states and triggers are Python identifiers (``transitions`` turns
them into methods on the model) that are not keywords and do not start with
``_``.  A trigger may leave a given state for only one destination, and
every state must be reachable from the initial one.
"""

from __future__ import annotations

import functools
import keyword
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from transitions import EventData, Machine, MachineError

from ferry.clock import Clock
from ferry.trace import CREATED, Tracer, TraceRecord

__all__ = [
    "StateSpec",
    "Statechart",
    "StatechartError",
    "TransitionSpec",
    "build",
    "charts_dir",
    "load",
    "load_all",
    "load_file",
    "render_all",
    "render_dot",
    "render_mermaid",
]

PropertyValue = bool | str | int

_TOP_LEVEL_KEYS = frozenset({"initial", "states", "transitions"})

# Names ``transitions`` puts on the model itself; a trigger with one of them
# would be skipped silently when the model is bound.
_RESERVED_TRIGGERS = frozenset({"trigger", "may_trigger"})
_RESERVED_TRIGGER_PREFIXES = ("is_", "may_")


class StatechartError(Exception):
    """A chart file (or a chart built in code) that cannot be a machine, and why."""

    def __init__(self, reason: str, path: Path | None = None) -> None:
        super().__init__(reason, path)
        self.reason = reason
        self.path = path

    def __str__(self) -> str:
        return self.reason if self.path is None else f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class StateSpec:
    """A state and what it means; code asks these properties instead of keeping its own lists."""

    name: str
    description: str
    properties: Mapping[str, PropertyValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Charts are cached and shared; a caller must not be able to edit one.
        object.__setattr__(self, "properties", MappingProxyType(dict(self.properties)))

    def __hash__(self) -> int:
        # A read-only mapping is still unhashable; hash its items instead.
        return hash((self.name, self.description, tuple(sorted(self.properties.items()))))


@dataclass(frozen=True)
class TransitionSpec:
    """One transition with one source: a YAML row listing several sources becomes several.

    ``effects`` maps another machine's name to the trigger it takes whenever
    this transition is taken (see :func:`build`'s ``followers``).
    """

    trigger: str
    source: str
    dest: str
    effects: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "effects", MappingProxyType(dict(self.effects)))

    def __hash__(self) -> int:
        return hash((self.trigger, self.source, self.dest, tuple(sorted(self.effects.items()))))


@dataclass(frozen=True)
class Statechart:
    """A validated machine definition: states with their properties, and transitions.

    Building one checks it (unknown states, a trigger with two destinations
    from one state, unreachable states, ...), so a chart made in code obeys
    the same rules as one loaded from YAML.
    """

    name: str
    initial: str
    states: tuple[StateSpec, ...]
    transitions: tuple[TransitionSpec, ...]
    _by_name: Mapping[str, StateSpec] = field(init=False, repr=False, compare=False)
    _next: Mapping[tuple[str, str], str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "states", tuple(self.states))
        object.__setattr__(self, "transitions", tuple(self.transitions))
        by_name: dict[str, StateSpec] = {}
        next_state: dict[tuple[str, str], str] = {}
        _check_name("chart", self.name)
        if not self.states:
            raise StatechartError("no states")
        for spec in self.states:
            _check_name("state", spec.name)
            if spec.name in by_name:
                raise StatechartError(f"state {spec.name!r} is declared twice")
            by_name[spec.name] = spec
        if self.initial not in by_name:
            raise StatechartError(f"initial state {self.initial!r} is not a declared state")
        first = self.states[0]
        for spec in self.states[1:]:
            if set(spec.properties) != set(first.properties):
                raise StatechartError(
                    f"state {spec.name!r} has properties {sorted(spec.properties)} but "
                    f"{first.name!r} has {sorted(first.properties)}: every state must set the same"
                )
        for t in self.transitions:
            _check_trigger(t.trigger)
            for machine, trigger in t.effects.items():
                _check_name("machine", machine)
                _check_trigger(trigger)
            for role, state in (("source", t.source), ("dest", t.dest)):
                if state not in by_name:
                    raise StatechartError(
                        f"transition {t.trigger!r} {t.source!r} -> {t.dest!r}: "
                        f"unknown {role} state {state!r}"
                    )
            key = (t.source, t.trigger)
            if key in next_state:
                raise StatechartError(
                    f"trigger {t.trigger!r} leaves {t.source!r} twice "
                    f"(to {next_state[key]!r} and to {t.dest!r})"
                )
            next_state[key] = t.dest
        object.__setattr__(self, "_by_name", MappingProxyType(by_name))
        object.__setattr__(self, "_next", MappingProxyType(next_state))
        unreachable = [s.name for s in self.states if s.name not in self.reachable()]
        if unreachable:
            raise StatechartError(
                f"unreachable from {self.initial!r}: {', '.join(map(repr, unreachable))}"
            )

    def state(self, name: str) -> StateSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.name} has no state {name!r}") from None

    def property(self, state: str, key: str) -> Any:
        properties = self.state(state).properties
        try:
            return properties[key]
        except KeyError:
            raise KeyError(f"{self.name} states have no property {key!r}") from None

    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    def states_where(self, key: str, value: PropertyValue = True) -> tuple[str, ...]:
        """The states whose property ``key`` equals ``value``, in declaration order."""
        return tuple(s.name for s in self.states if self.property(s.name, key) == value)

    def triggers(self) -> frozenset[str]:
        return frozenset(t.trigger for t in self.transitions)

    def triggers_from(self, state: str) -> tuple[str, ...]:
        """The triggers legal in ``state``, in table order (what a command may do there)."""
        self.state(state)
        return tuple(t.trigger for t in self.transitions if t.source == state)

    def next_state(self, source: str, trigger: str) -> str | None:
        """Where ``trigger`` takes a machine in ``source``; None if it is illegal there."""
        return self._next.get((source, trigger))

    def transition(self, source: str, trigger: str) -> TransitionSpec | None:
        """The transition ``trigger`` takes from ``source``; None if it is illegal there."""
        for t in self.transitions:
            if t.source == source and t.trigger == trigger:
                return t
        return None

    def effects_on(self, machine: str) -> dict[tuple[str, str], str]:
        """``(source, trigger) -> trigger of machine``: what this chart makes ``machine`` do."""
        return {
            (t.source, t.trigger): t.effects[machine]
            for t in self.transitions
            if machine in t.effects
        }

    def reachable(self) -> frozenset[str]:
        seen = {self.initial}
        frontier = [self.initial]
        while frontier:
            here = frontier.pop()
            for t in self.transitions:
                if t.source == here and t.dest not in seen:
                    seen.add(t.dest)
                    frontier.append(t.dest)
        return frozenset(seen)


def _check_name(kind: str, name: object) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise StatechartError(f"{kind} name {name!r} is not a Python identifier")
    if name.startswith("_"):
        raise StatechartError(f"{kind} name {name!r} starts with '_'")


def _check_trigger(name: object) -> None:
    _check_name("trigger", name)
    assert isinstance(name, str)
    if name in _RESERVED_TRIGGERS or name.startswith(_RESERVED_TRIGGER_PREFIXES):
        raise StatechartError(
            f"trigger name {name!r} clashes with the methods transitions adds to the model"
        )


# -- loading ------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice is an error.

    Plain ``safe_load`` keeps the last of two equal keys, so a state pasted
    twice would silently lose its first definition.
    """


def _construct_strict_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_strict_mapping,
)


def charts_dir() -> Path:
    """Where the chart YAML is: inside the installed package, else in the checkout.

    A wheel carries ``statecharts/`` as ``ferry/statechart_data`` (hatch
    ``force-include``), so a plain ``pip install`` finds it.  An editable
    install imports ``src/ferry`` straight from the checkout, where no such
    directory exists; there the repository's own ``statecharts/`` is used.
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "statechart_data", package.parent.parent / "statecharts"):
        if candidate.is_dir():
            return candidate
    raise StatechartError(
        f"no statecharts found: neither {package / 'statechart_data'} (installed) "
        f"nor {package.parent.parent / 'statecharts'} (checkout) exists"
    )


def load_file(path: Path) -> Statechart:
    """Parse and check one chart file (not cached: tests and ``render_all`` use it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise StatechartError(f"cannot read: {err.strerror or err}", path) from None
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise StatechartError(f"not valid YAML: {err}", path) from None
    try:
        return _parse(path.stem, doc)
    except StatechartError as err:
        raise StatechartError(err.reason, path) from None


def _parse(name: str, doc: object) -> Statechart:
    if not isinstance(doc, dict):
        raise StatechartError("expected a mapping with initial, states and transitions")
    missing = sorted(_TOP_LEVEL_KEYS - set(doc))
    if missing:
        raise StatechartError(f"missing {', '.join(missing)}")
    unknown = sorted(map(str, set(doc) - _TOP_LEVEL_KEYS))
    if unknown:
        raise StatechartError(f"unknown top-level key {', '.join(unknown)}")

    initial = doc["initial"]
    if not isinstance(initial, str):
        raise StatechartError(f"initial must be a state name, not {initial!r}")

    raw_states = doc["states"]
    if not isinstance(raw_states, dict) or not raw_states:
        raise StatechartError("states must be a non-empty mapping of state name to properties")
    states = tuple(_parse_state(state_name, body) for state_name, body in raw_states.items())

    raw_transitions = doc["transitions"]
    if not isinstance(raw_transitions, list):
        raise StatechartError("transitions must be a list of [trigger, source(s), dest] rows")
    transitions: list[TransitionSpec] = []
    for number, row in enumerate(raw_transitions, start=1):
        transitions.extend(_parse_row(number, row))

    return Statechart(name, initial, states, tuple(transitions))


def _parse_state(name: object, body: object) -> StateSpec:
    _check_name("state", name)
    assert isinstance(name, str)
    if not isinstance(body, dict):
        raise StatechartError(f"state {name!r}: expected a mapping with a description")
    description = body.get("description")
    if not isinstance(description, str) or not description.strip() or "\n" in description.strip():
        raise StatechartError(f"state {name!r}: description must be one line of text")
    properties: dict[str, PropertyValue] = {}
    for key, value in body.items():
        if key == "description":
            continue
        if not isinstance(key, str) or not key.isidentifier():
            raise StatechartError(f"state {name!r}: property name {key!r} is not an identifier")
        if not isinstance(value, bool | int | str):
            raise StatechartError(
                f"state {name!r}: property {key!r} must be a bool, int or str, not {value!r}"
            )
        properties[key] = value
    return StateSpec(name, description.strip(), properties)


def _parse_row(number: int, row: object) -> list[TransitionSpec]:
    where = f"transition #{number} {row!r}"
    if not isinstance(row, list) or len(row) not in (3, 4):
        raise StatechartError(f"{where}: expected a row [trigger, source(s), dest, {{effects}}?]")
    trigger, sources, dest = row[:3]
    effects = row[3] if len(row) == 4 else {}
    if not isinstance(effects, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in effects.items()
    ):
        raise StatechartError(f"{where}: effects must map a machine's name to its trigger")
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list) or not sources:
        raise StatechartError(f"{where}: source must be a state or a non-empty list of states")
    for value, what in [(trigger, "trigger"), (dest, "dest"), *((s, "source") for s in sources)]:
        if not isinstance(value, str):
            raise StatechartError(f"{where}: {what} must be a name, not {value!r}")
    if len(set(sources)) != len(sources):
        raise StatechartError(f"{where}: a source state is listed twice")
    return [TransitionSpec(trigger, source, dest, effects) for source in sources]


@functools.cache
def load(name: str) -> Statechart:
    """The chart ``NAME.yaml`` from :func:`charts_dir`, parsed once per process."""
    _check_name("chart", name)
    return load_file(charts_dir() / f"{name}.yaml")


def load_all() -> dict[str, Statechart]:
    """Every chart in :func:`charts_dir`, by name, in name order."""
    return {path.stem: load(path.stem) for path in sorted(charts_dir().glob("*.yaml"))}


# -- building machines ----------------------------------------------------------


def build(
    chart: Statechart,
    model: object,
    *,
    instance: str,
    tracer: Tracer | None,
    clock: Clock,
    followers: Mapping[str, Callable[[str], object]] | None = None,
    on_change: Callable[[str, str, str], object] | None = None,
) -> Machine:
    """Bind a ``transitions.Machine`` for ``chart`` to ``model``; the one way ferry makes one.

    The model gains a method per trigger (``model.serve()``), ``is_<state>()``
    and ``may_<trigger>()``, and a ``state`` attribute; callbacks named
    ``on_enter_<state>`` / ``on_exit_<state>`` on the model are picked up and
    receive the ``EventData``.

    Every event the machine processes is given to ``tracer`` as one record,
    stamped with ``clock.seconds()``: legal ones with ``ok=True``, illegal
    triggers and callbacks that raised with ``ok=False`` and the error text.
    The error still reaches whoever fired the trigger.  The machine's first
    record is :data:`ferry.trace.CREATED`, in the initial state.

    With ``queued=True``, a trigger fired while another is being processed
    returns True at once and runs afterwards, and any error it meets is
    raised from the outermost trigger call.  When a queued event raises,
    ``transitions`` throws away whatever was still queued behind it; those
    events are recorded too, ``ok=False``, so the trace shows they never ran.

    ``followers`` maps a machine's name to a function that fires one of its
    triggers: after every transition whose row names an effect on that
    machine, the function is called with the effect's trigger (a machine
    not among the followers is not driven).  ``on_change(trigger, source,
    dest)`` is called after every transition taken, for a model that must
    act on a state's meaning (the data plane on ``clients_held``).
    """
    if not instance:
        raise ValueError("a machine needs a non-empty instance name for its trace")
    # transitions skips, with only a log warning, any name the model already
    # has: the trigger would then call the model's own method and bypass the
    # machine and the trace.  Refuse instead.
    names = ["trigger", "may_trigger"]
    names += [f"is_{state}" for state in chart.state_names()]
    for trigger in sorted(chart.triggers()):
        names += [trigger, f"may_{trigger}"]
    clashes = [n for n in names if getattr(model, n, None) is not None]
    if clashes:
        raise ValueError(
            f"cannot bind {chart.name} to {model!r}: it already has {', '.join(clashes)}"
        )

    def finalize(event: EventData) -> None:
        if tracer is None:
            return
        now = clock.seconds()
        dest = str(getattr(event.model, event.machine.model_attribute))
        if event.transition is not None:
            source = event.transition.source
        elif event.state is not None:
            source = event.state.name
        else:
            source = dest
        error = None
        if event.error is not None:
            error = _describe(event.error)
        elif not event.result:
            error = "no transition taken"
        reason = event.kwargs.get("reason")
        tracer.record(
            TraceRecord(
                now,
                chart.name,
                instance,
                event.event.name,
                source,
                dest,
                error is None,
                error,
                reason if isinstance(reason, str) else None,
            )
        )
        if event.error is not None:
            _record_dropped(event, tracer, now, chart.name, instance, dest)

    driven = {
        name: (follow, chart.effects_on(name)) for name, follow in (followers or {}).items()
    }

    def after(event: EventData) -> None:
        assert event.transition is not None
        source, trigger = event.transition.source, event.event.name
        if on_change is not None:
            on_change(trigger, source, str(event.transition.dest))
        for follow, effects in driven.values():
            effect = effects.get((source, trigger))
            if effect is not None:
                follow(effect)

    machine = Machine(
        model=model,
        states=list(chart.state_names()),
        transitions=[
            {"trigger": t.trigger, "source": t.source, "dest": t.dest} for t in chart.transitions
        ],
        initial=chart.initial,
        name=f"{chart.name}/{instance}",
        queued=True,
        send_event=True,
        auto_transitions=False,
        ignore_invalid_triggers=False,
        finalize_event=finalize,
        after_state_change=after if driven or on_change is not None else None,
    )
    if tracer is not None:
        tracer.record(
            TraceRecord(
                clock.seconds(), chart.name, instance, CREATED, chart.initial, chart.initial, True
            )
        )
    return machine


def _describe(err: BaseException) -> str:
    # MachineError.__str__ is repr(value), quotes and all; use the message itself.
    message = err.value if isinstance(err, MachineError) else str(err)
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _record_dropped(
    event: EventData, tracer: Tracer, now: float, machine: str, instance: str, state: str
) -> None:
    """Record the queued events ``transitions`` is about to discard because ``event`` raised.

    ``Machine._process`` clears its queue when a queued event raises; the
    queue holds ``partial(Event._trigger, EventData)`` for each event still
    waiting, the first being the one that raised.  This reads that private
    queue, and records nothing if its shape ever changes.
    """
    queue = getattr(event.machine, "_transition_queue", ())
    for item in list(queue)[1:]:
        args = getattr(item, "args", ())
        waiting = args[0] if args else None
        if not isinstance(waiting, EventData) or waiting.event is None:
            continue
        tracer.record(
            TraceRecord(
                now,
                machine,
                instance,
                waiting.event.name,
                state,
                state,
                False,
                f"dropped: queued behind {event.event.name!r}, which raised",
            )
        )


# -- diagrams -------------------------------------------------------------------

_CONTROL_PROPERTY = "has_control"
"""States with this property true are drawn filled and bold, in every chart that has it."""


def _header(chart: Statechart, comment: str) -> list[str]:
    lines = [
        f"{comment} Generated from statecharts/{chart.name}.yaml: do not edit.",
        f"{comment} Regenerate with `ferry statecharts render`.",
    ]
    if any(_has_control(state) for state in chart.states):
        lines.append(f"{comment} Filled, bold states have {_CONTROL_PROPERTY}.")
    return lines


def _edges(chart: Statechart) -> list[tuple[str, str, list[str]]]:
    """Transitions grouped per (source, dest) pair, in table order, so parallel arrows merge.

    A transition with effects is labelled ``trigger / machine.trigger``.
    """
    grouped: dict[tuple[str, str], list[str]] = {}
    for t in chart.transitions:
        label = t.trigger + "".join(f" / {m}.{e}" for m, e in sorted(t.effects.items()))
        grouped.setdefault((t.source, t.dest), []).append(label)
    return [(source, dest, labels) for (source, dest), labels in grouped.items()]


def _has_control(state: StateSpec) -> bool:
    return state.properties.get(_CONTROL_PROPERTY) is True


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_dot(chart: Statechart) -> str:
    """Graphviz source for ``chart``; the same chart always gives the same bytes."""
    lines = [
        *_header(chart, "//"),
        f"digraph {chart.name} {{",
        "  rankdir=LR;",
        '  node [shape=box, style=rounded, fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
        '  __start [shape=point, label=""];',
        f"  __start -> {chart.initial};",
    ]
    for state in chart.states:
        attrs = [f"tooltip={_dot_quote(state.description)}"]
        if _has_control(state):
            attrs += ['style="rounded,filled,bold"', 'fillcolor="#cde8cd"']
        lines.append(f"  {state.name} [{', '.join(attrs)}];")
    for source, dest, triggers in _edges(chart):
        # Trigger names are identifiers, so the label needs no escaping; \n is dot's line break.
        label = "\\n".join(triggers)
        lines.append(f'  {source} -> {dest} [label="{label}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_mermaid(chart: Statechart) -> str:
    """Mermaid ``stateDiagram-v2`` source for ``chart``; deterministic like :func:`render_dot`."""
    lines = [
        *_header(chart, "%%"),
        "stateDiagram-v2",
        "    direction LR",
        "    classDef control fill:#cde8cd,stroke:#2e7d32,stroke-width:2px,font-weight:bold",
        f"    [*] --> {chart.initial}",
    ]
    for source, dest, triggers in _edges(chart):
        lines.append(f"    {source} --> {dest}: {', '.join(triggers)}")
    controlled = [s.name for s in chart.states if _has_control(s)]
    if controlled:
        lines.append(f"    class {','.join(controlled)} control")
    return "\n".join(lines) + "\n"


def _renderings(directory: Path) -> Iterator[tuple[Path, str]]:
    charts = [load_file(path) for path in sorted(directory.glob("*.yaml"))]
    for chart in charts:
        yield directory / f"{chart.name}.dot", render_dot(chart)
        yield directory / f"{chart.name}.mmd", render_mermaid(chart)
    if directory.resolve() == charts_dir().resolve():
        yield names_module_path(), render_names(charts)


def names_module_path() -> Path:
    """Where the generated state and trigger names live: ``ferry/chartnames.py``."""
    return Path(__file__).resolve().parent / "chartnames.py"


def render_names(charts: Iterable[Statechart]) -> str:
    """Python source: a ``StrEnum`` of the states and one of the triggers of each chart.

    Code fires ``RoleTrigger.SERVE``, not ``"serve"``: mypy rejects a name
    the YAML does not have, and ``render --check`` fails when the module and
    the YAML disagree.
    """
    classes: list[tuple[str, str, str, tuple[str, ...]]] = []
    for chart in charts:
        stem = "".join(part.capitalize() for part in chart.name.split("_"))
        classes.append((f"{stem}State", "states", chart.name, chart.state_names()))
        classes.append((f"{stem}Trigger", "triggers", chart.name, tuple(sorted(chart.triggers()))))
    lines = [
        '"""The states and triggers of every statechart, as names mypy can check.',
        "",
        "Generated from statecharts/*.yaml by `ferry statecharts render`: do not edit.",
        "`ferry statecharts render --check` (run by CI) fails when it is stale.",
        '"""',
        "",
        "from enum import StrEnum",
        "",
        "__all__ = [",
        *(f'    "{name}",' for name in sorted(c[0] for c in classes)),
        "]",
    ]
    for name, kind, chart_name, members in classes:
        lines += ["", "", f"class {name}(StrEnum):"]
        lines += [f'    """The {kind} of statecharts/{chart_name}.yaml."""', ""]
        lines += [f'    {member.upper()} = "{member}"' for member in members]
    return "\n".join(lines) + "\n"


def stale_diagrams(directory: str | Path | None = None) -> list[Path]:
    """The diagram files that differ from what their YAML renders to now (or are missing)."""
    directory = charts_dir() if directory is None else Path(directory)
    return [
        target
        for target, text in _renderings(directory)
        if not target.exists() or target.read_text(encoding="utf-8") != text
    ]


def render_all(directory: str | Path | None = None) -> list[Path]:
    """Write ``NAME.dot`` and ``NAME.mmd`` beside each ``NAME.yaml``; return the paths written.

    ``directory`` defaults to :func:`charts_dir`.  Charts are read afresh
    (not from :func:`load`'s cache) so an edit made in this process counts.
    """
    directory = charts_dir() if directory is None else Path(directory)
    written: list[Path] = []
    for target, text in _renderings(directory):
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written
