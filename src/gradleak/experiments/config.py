"""The experiment schema (pydantic) and loading a YAML file with ``--set key=value`` overrides.

Every error names the dotted key and the problem on one line, before any work starts.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from gradleak.audit.config import AuditConfig
from gradleak.data.partition import Partition
from gradleak.data.sources import SOURCES
from gradleak.defenses import Defense
from gradleak.errors import ConfigError
from gradleak.modality import load_modalities
from gradleak.schema import Section, one_line

load_modalities()
# ``data:`` is the tagged union of every registered source (each modality registers its own).
_SOURCE_TYPES = tuple(SOURCES.values())
DataSource = Annotated[typing.Union[_SOURCE_TYPES], Field(discriminator="source")]  # noqa: UP007 - built at run time


class ModelConfig(Section):
    name: str = Field(
        "lenet",
        description="A built-in model (lenet, convnet, resnet18, resnet20, mlp) or "
        "'package.module:factory' for your own.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the model factory."
    )


class TrainingConfig(Section):
    rounds: int = Field(10, gt=0, description="Number of FL rounds.")
    local_epochs: int = Field(1, gt=0, description="Local epochs per round on each client.")
    lr: float = Field(0.01, gt=0, description="Local SGD learning rate (a client may override it).")
    momentum: float = Field(0.0, ge=0, lt=1, description="Local SGD momentum (reset every round).")
    weight_decay: float = Field(0.0, ge=0, description="Local SGD weight decay.")
    clients_per_round: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of clients drawn (seeded) to take part in each round.",
    )
    batch_norm: Literal["train", "eval"] = Field(
        "train",
        description="How clients run batch-norm layers: train (batch statistics, running "
        "statistics updated and sent) or eval (frozen running statistics, as in fine-tuning with "
        "batch norm frozen). Sent with each update; the attack's replay follows it.",
    )


class AggregationConfig(Section):
    strategy: str = Field(
        "fedavg",
        description="Server aggregation: fedavg (the server sees every update), or secure-sum (the "
        "server sees only each round's sum of updates and steps by their mean, all clients "
        "weighing the same).",
    )
    recalibrate_bn: bool = Field(
        False,
        description="After each round the server recomputes the global model's batch-norm running "
        "statistics on its public data (the test split's examples), for clients that keep theirs "
        "(bn-stats-local in local mode), whose global statistics otherwise stay at their initial "
        "values.",
    )

    @field_validator("strategy")
    @classmethod
    def _known(cls, v: str) -> str:
        from gradleak.fl.server import STRATEGIES

        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r} (known: {', '.join(STRATEGIES.names())})")
        return v


class DisaggregationConfig(Section):
    """The gradient-disaggregation attack on a secure-sum run, run once training has finished."""

    window: int = Field(
        10,
        gt=0,
        description="Rounds per window of the participation logs the server is given "
        "(how often each client took part in each window).",
    )
    invert: list[int] = Field(
        default_factory=list,
        description="Clients whose recovered update is then attacked with the audit's attack and "
        "scored like an audit row, as if there had been no secure aggregation (needs audit:).",
    )
    time_limit: float = Field(
        60.0, gt=0, description="Seconds the MILP solver may spend on one client's program."
    )
    chunk: int | None = Field(
        None,
        ge=0,
        description="Rounds per chunk of the attack (the updates must be nearly constant within "
        "one); null: chosen from the sums' spectrum; 0: all rounds at once.",
    )
    separation: float = Field(
        0.25,
        ge=0,
        le=1,
        description="A recovered column is certain when the best other column found fits "
        "worse by at least this fraction of what each round it changes costs on exact sums (1: the "
        "data "
        "pins the column; 0: the alternative fits as well), the spectrum has a clear gap, and no "
        "other "
        "client has the same counts.",
    )
    on_uncertain: Literal["warn", "fail"] = Field(
        "warn",
        description="When some column is not certain: warn (log it, mark it in the summary) or "
        "fail (stop with an error naming the clients).",
    )
    workers: int | None = Field(
        None, gt=0, description="Processes solving clients in parallel (null: the cores)."
    )
    solver: Literal["highs", "scip", "gurobi"] = Field(
        "highs",
        description="MILP back-end: HiGHS (scipy, always present), SCIP (pip install "
        "'gradleak[scip]') or Gurobi (pip install 'gradleak[gurobi]'; its bundled licence is "
        "size-limited).",
    )


class RecommendationConfig(Section):
    """How a sweep's report, and `gradleak recommend`, pick the defence they recommend."""

    level: float = Field(
        0.0,
        description="RDLV that every audited client must reach or go below in every audited "
        "round, over every attack of the audit (`gradleak sweep/report/recommend --level` "
        "overrides it).",
    )
    accuracy_budget: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Final test accuracy a defence may cost against the baseline (a sweep's "
        "smallest swept value; recommend's run without defence), as a fraction: 0.05 is 5 points "
        "(`--accuracy-budget` overrides it).",
    )
    families: list[str] | None = Field(
        None,
        description="recommend: the defence families to search (adaptive-gaussian, gaussian, "
        "laplace, dp-gaussian, prune, quantize, group-gaussian, bn-stats-local, and "
        "bn-stats-local+adaptive-gaussian: the statistics kept local with noise searched on the "
        "parameters); null: all (`--family` overrides it).",
    )
    ranges: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="recommend: a family's search space replaced: [weakest, strongest] for a "
        "numeric strength (e.g. {adaptive-gaussian: [0.1, 50]}), the settings weakest first for "
        "a discrete one.",
    )
    fixed: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="recommend: further keys of a family's defenses: entry, e.g. {dp-gaussian: "
        "{clip: 1.0}} (dp-gaussian's clip defaults to the median update norm of the run without "
        "defence).",
    )
    tolerance: float = Field(
        0.02,
        gt=0,
        lt=1,
        description="recommend: a numeric strength is bisected until the bracket around the "
        "weakest setting that holds is at most this fraction of its range (in log space for "
        "scales).",
    )
    max_points: int = Field(
        8,
        ge=1,
        description="recommend: the most settings evaluated per family (`--max-points` overrides "
        "it).",
    )


class SecAggConfig(Section):
    """Flower's SecAgg+ protocol, used on the flower engine when aggregation.strategy is secure-sum.

    Each client clips every value of its update to [-clip, clip] and quantises it to an integer in
    [0, quantization]; the server can only unmask the sum. The sum is exact to about
    participants x 2 clip / quantization per value, and values beyond the clip are cut (each client
    records the fraction it cut as ``secagg_clipped``). Masks live modulo 2^32, so participants x
    quantization must stay below 2^32.
    """

    clip: float = Field(
        0.05, gt=0, description="Clipping range: update values beyond +-clip are cut."
    )
    quantization: int = Field(
        2**28,
        gt=1,
        lt=2**31,
        description="Quantisation levels over [-clip, clip] (below 2^31; "
        "participants x quantization below 2^32).",
    )
    shares: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of the round's participants each client shares its "
        "masking keys with (1: all).",
    )
    threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Fraction of those shares needed to remove a dropped client's mask.",
    )


class EngineConfig(Section):
    name: Literal["inprocess", "flower", "nvflare"] = Field(
        "inprocess",
        description="What runs the federation: inprocess (this process, the default) or "
        "flower (Flower's simulation on Ray: each client a ClientApp, the defences and the audit a "
        "mod, "
        "secure-sum rounds on Flower's SecAgg+; pip install -c constraints.txt "
        "'gradleak[flower]'), or nvflare "
        "(a job in NVIDIA FLARE's simulator: gradleak's controller on the server, the training an "
        "executor, "
        "the defences and the audit a task-result filter; pip install -c constraints.txt "
        "'gradleak[nvflare]').",
    )
    threads: int | None = Field(
        None,
        gt=0,
        description="Torch threads of each client's work (in-process: of the whole run); "
        "null: torch's default. Results are identical across engines only at equal thread counts.",
    )
    workers: int | None = Field(
        None,
        gt=0,
        description="inprocess: processes that run a round's clients (their training, defences "
        "and audit) in parallel, with the sequential run's results; null or 1: this process only.",
    )
    pool: Literal["auto", "ray", "processes"] = Field(
        "auto",
        description="inprocess with workers: what the workers are: ray (Ray actors; a running Ray "
        "instance is joined, else a local one started; pip install -c constraints.txt "
        "'gradleak[ray]'), processes "
        "(spawned Python processes: no Ray start-up, about 15 s less on 2 cores), or auto (ray "
        "when Ray is installed).",
    )
    cpus_per_client: float = Field(
        1.0,
        gt=0,
        description="flower: CPUs Ray reserves for each client (so clients run in parallel "
        "up to the machine's CPUs divided by this).",
    )
    secagg: SecAggConfig = Field(
        default_factory=SecAggConfig,
        description="flower with aggregation.strategy secure-sum: the "
        "SecAgg+ protocol's clip, quantisation and key sharing.",
    )


class CheckpointConfig(Section):
    keep_every: int = Field(
        0, ge=0, description="Also keep every k-th round's global model; 0 keeps only the latest."
    )


class ExperimentConfig(Section):
    """One FL experiment: data, clients, model, training and aggregation."""

    name: str = Field(
        "experiment",
        description="A name for the run: its default directory is runs/NAME, so it is one plain "
        "name (letters, digits, '.', '_', '-', '=', ',' or '+', not starting with '.', at most 100 "
        "characters).",
    )
    seed: int = Field(0, ge=0, description="Seed of every random choice; same seed, same results.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to compute: auto uses a GPU when there is one."
    )
    data: DataSource = Field(description="The data source, chosen by its 'source' key.")
    partition: Partition = Field(description="How the training pool is split into clients.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Local training.")
    aggregation: AggregationConfig = Field(
        default_factory=AggregationConfig, description="Server aggregation."
    )
    checkpoints: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Which global models to keep."
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="What runs the federation."
    )
    defenses: list[Defense] = Field(
        default_factory=list,
        description="Update filters applied in order on each client before its update leaves it.",
    )
    audit: AuditConfig | None = Field(
        None, description="The leakage audit, run on each update after the defences; null: none."
    )
    disaggregation: DisaggregationConfig | None = Field(
        None,
        description="With aggregation.strategy secure-sum: recover every client's participation "
        "and update from the round sums, and invert chosen clients' updates; null: none.",
    )
    recommendation: RecommendationConfig = Field(
        default_factory=RecommendationConfig,
        description="For `gradleak sweep` and `gradleak recommend`: the leakage target and "
        "accuracy budget of the recommendation, and how recommend searches.",
    )
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="For `gradleak sweep`: values per dotted key, e.g. {defenses.0.sigma0: [0, 5, "
        "10]}.",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        from gradleak.rundir import safe_component

        return safe_component(v, "name")

    @model_validator(mode="after")
    def _audited_clients_exist(self) -> ExperimentConfig:
        if self.audit is not None and self.audit.clients != "all":
            n = self.partition.num_clients
            inverts = self.disaggregation is not None and bool(self.disaggregation.invert)
            if not self.audit.clients and not inverts:  # with invert, audit: lends only its attack
                raise ConfigError(
                    "audit.clients", f"is empty: name clients (1 to {n}), use all, or drop audit:"
                )
            unknown = [c for c in self.audit.clients if not 1 <= c <= n]
            if unknown:
                raise ConfigError(
                    "audit.clients",
                    f"client {unknown[0]} is not one of the run's clients (1 to {n})",
                )
        return self

    @model_validator(mode="after")
    def _attack_fits_the_training(self) -> ExperimentConfig:
        if self.audit is not None:
            refused = self.audit.build_attack().refuses(self.training)
            if refused is not None:
                key, problem = refused
                raise ConfigError(key, f"{self.audit.preset}: {problem}")
        return self

    def defense_summary(self) -> str:
        """The defences in force, e.g. 'adaptive-gaussian(sigma0=5.0, percentile=95.0)'."""
        parts = []
        for d in self.defenses:
            args = ", ".join(f"{k}={v}" for k, v in d.model_dump().items() if k != "name")
            parts.append(f"{d.name}({args})")
        return "; ".join(parts) or "none"

    def resolved(self) -> dict[str, Any]:
        """Plain data (JSON types) with every default filled in: what the run directory records."""
        return self.model_dump(mode="json")


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted key where two config trees differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{prefix}{i}.")
            if d:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


# The keys whose value selects a variant in a tagged union (data.source, partition.scheme,
# defenses.N.name).
_TAG_KEYS = ("source", "scheme", "name")


def model_variants(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside a (possibly annotated, possibly listed) union, or []."""
    if get_origin(annotation) is list:
        return model_variants(get_args(annotation)[0])
    if get_origin(annotation) is typing.Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _tag_values(section: str) -> list[str]:
    """The allowed values of a tagged section, e.g. the data sources' names."""
    out = []
    for model in model_variants(ExperimentConfig.model_fields[section].annotation):
        tag = next(t for t in _TAG_KEYS if t in model.model_fields)
        out.append(model.model_fields[tag].default)
    return out


def _strip_tags(loc: list[Any], raw: Any) -> tuple[list[Any], str | None]:
    """Drop the variant names pydantic inserts into error locations; also return the tag key
    of the last tagged section passed (for 'unknown variant' errors)."""
    out, node, tag_key = [], raw, None
    i = 0
    while i < len(loc):
        part = loc[i]
        out.append(part)
        node = node[part] if isinstance(node, dict | list) and _has(node, part) else None
        if isinstance(node, dict):
            tag_key = next((t for t in _TAG_KEYS if t in node), tag_key)
            if i + 1 < len(loc) and tag_key and loc[i + 1] == node.get(tag_key):
                i += 1  # skip the variant name
        i += 1
    return out, tag_key


def _has(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(part, int) and 0 <= part < len(node)


def _error_line(exc: ValidationError, raw: dict[str, Any]) -> ConfigError:
    """The first problem as one line under its key, the variant names pydantic inserts left out and
    an unknown or missing variant tag (``data.source: 'mnist' is not one of ...``) named as such."""
    err = exc.errors()[0]
    loc, _ = _strip_tags(list(err["loc"]), raw)
    if err["type"] not in ("union_tag_invalid", "union_tag_not_found"):
        return one_line(exc, loc=loc)
    section = str(loc[0])
    tag = {"data": "source", "partition": "scheme", "defenses": "name"}.get(section, "name")
    tags = ", ".join(_tag_values(section))
    if err["type"] == "union_tag_not_found":
        msg = f"required key is missing (one of {tags})"
    else:
        msg = f"{err['ctx']['tag']!r} is not one of {tags}"
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(".".join(str(p) for p in [*loc, tag]), msg)


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts and lists, creating dicts on the way."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(dotted, f"{part!r} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict | list):
                    raise ConfigError(dotted, f"{'.'.join(parts[: i + 1])} is not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``2`` is an int, ``[1, 2]`` a list)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"expected key=value, got {text!r}")
    try:
        return key.strip(), parse_yaml(value)
    except yaml.YAMLError as exc:
        raise ConfigError(key.strip(), f"cannot read value {value!r}: {exc}") from None


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise _error_line(exc, raw) from None
    except ConfigError as exc:  # raised inside a validator (e.g. an attack setting of the audit)
        raise ConfigError(
            f"audit.{exc.key}" if exc.key.startswith("attack") else exc.key, exc.problem
        ) from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _Loader(yaml.SafeLoader):
    """Safe YAML without aliases: ``*name`` can expand a few hundred bytes into gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: ANN401 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(
                f"aliases (*{event.anchor}) are not allowed in configs{event.start_mark}"
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """YAML text as plain data (safe: no tags that build objects, no aliases, nesting bounded)."""
    from gradleak.safeio import MAX_JSON_DEPTH, json_depth

    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except RecursionError:
        value = None
        deep = True
    else:
        deep = json_depth(value) > MAX_JSON_DEPTH
    if deep:
        raise yaml.YAMLError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value


# ``base:`` chains deeper than this are refused (a chain is meant to be a few files).
MAX_BASES = 16


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a mapping; ``base: other.yaml`` (relative to this file) is read first and
    this file's keys are merged on top of it."""
    from gradleak.errors import DataError
    from gradleak.safeio import read_file

    try:
        data = read_file(path, kind="config")
    except DataError as exc:
        raise ConfigError("", f"config {exc}" if "not found" in str(exc) else str(exc)) from None
    try:
        raw = parse_yaml(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path} must hold a mapping of keys to values")
    if "base" in raw:
        base_path = (path.parent / str(raw.pop("base"))).resolve()
        if base_path in _seen:
            raise ConfigError("base", f"{path} includes itself through {base_path}")
        if len(_seen) >= MAX_BASES:
            raise ConfigError("base", f"{path}: more than {MAX_BASES} nested base: files")
        raw = _merge(read_yaml(base_path, (*_seen, path.resolve())), raw)
    return raw


def load_config(path: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment file; relative data paths resolve from the CWD."""
    raw = read_yaml(path)
    for text in overrides or []:
        _set(raw, *parse_override(text))
    data = raw.get("data")
    if isinstance(data, dict):
        for k in ("root", "split_file"):
            if isinstance(data.get(k), str):
                data[k] = str(Path(data[k]).expanduser().resolve())
    return validate_config(raw)
