"""Experiment configuration: one pydantic model per section, loaded from YAML plus overrides.

An experiment is fully described by an :class:`ExperimentConfig`. It is built from a YAML file
and dotted ``key=value`` overrides (``train.lr=0.05 data.noise.rate=0.4``), validated before any
work starts, and hashed (:func:`config_hash`) to name the run directory.

Every model forbids unknown keys and is frozen. Validation errors are turned into a single line
that names the dotted key and what is allowed (:class:`ConfigError`); the CLI prints it and exits
with code 2.

The hash (:func:`config_hash`) covers only fields that differ from their defaults, so adding a
field with a default renames no run directory.

This module is longer than 400 lines because it is the whole schema (one small pydantic model
per section) plus the one place that loads, overrides and hashes it: splitting it would scatter
the schema that ``--help`` and every error message walk.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedmem.config_io import (
    dotted_key,
    load_override_value,
    misplaced_bool,
    read_config_file,
    yes_no_word,
)
from fedmem.errors import ConfigError

DATASETS = ("mnist1d", "digits", "mnist", "fashionmnist", "cifar10", "cifar100")
MODELS = ("mlp", "cnn1d", "cnn", "resnet9")


class _Section(BaseModel):
    """Base of every section: unknown keys, booleans read as numbers (``train.rounds=true``)
    and non-finite floats (``.inf``, ``.nan``) are errors in every field, nested ones included.
    A YAML ``yes``/``no`` given to a choice spelled with those words stays a word."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        value = yes_no_word(value, field.annotation)
        where = misplaced_bool(value, field.annotation)
        if where is not None:
            inside = f" at {where}" if where else ""
            got = str(value).lower() if isinstance(value, bool) else repr(value)
            raise ValueError(
                f"a number is needed, not a boolean{inside} (got {got}; YAML reads "
                "true/false/yes/no/on/off as booleans)"
            )
        return value


# ---------------------------------------------------------------------------------------------
# data: source, label noise, outliers, canaries
# ---------------------------------------------------------------------------------------------
class NoiseConfig(_Section):
    """Label noise applied to the training set (test labels stay clean)."""

    kind: Literal["symmetric", "pair"] = Field(
        "symmetric",
        description="symmetric: a uniformly random *other* class; pair: class c -> (c+1) mod C",
    )
    rate: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of training examples whose label is flipped"
    )
    client_rates: dict[int, float] | None = Field(
        None,
        description="per-client rates {client_id: rate}; clients not listed stay clean. "
        "Replaces `rate` when set.",
    )

    @field_validator("client_rates")
    @classmethod
    def _rates_in_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v is None:
            return v
        for client, rate in v.items():
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"rate for client {client} is {rate}; allowed: 0 <= rate < 1")
            if client < 0:
                raise ValueError(f"client id {client} is negative")
        return dict(sorted(v.items()))


class OutlierConfig(_Section):
    """Atypical examples: inputs strongly corrupted, labels kept (Carlini et al. 2019)."""

    share: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of training examples made atypical"
    )
    kind: Literal["noise", "invert", "shuffle"] = Field(
        "noise",
        description="noise: x + strength*std*N(0,1); invert: x -> -x scaled; "
        "shuffle: features permuted randomly",
    )
    strength: float = Field(2.0, gt=0.0, description="corruption strength (noise: std multiple)")


class CanaryConfig(_Section):
    """Canaries: random inputs with random labels, each inserted `repeats` times (Carlini 2019).

    ``repeats`` and ``clients_per_canary`` may be lists: the canaries then cycle through every
    (repeats, clients) pair with clients <= repeats, so exposure can be compared by insertion
    count and by how many clients held a canary (Thakkar et al. 2020).
    """

    count: int = Field(0, ge=0, description="number of distinct canaries inserted")
    repeats: int | list[int] = Field(
        1, description="copies of each canary in the training data (a list: canaries cycle)"
    )
    num_clients: int = Field(
        1, ge=1, description="how many clients hold canaries (chosen by the seed)"
    )
    clients_per_canary: int | list[int] = Field(
        1, description="a canary's copies are spread over this many of those clients (or a list)"
    )
    reference: int = Field(
        100, ge=0, description="never-inserted canaries from the same distribution (exposure)"
    )

    @model_validator(mode="after")
    def _spread(self) -> CanaryConfig:
        for key in ("repeats", "clients_per_canary"):
            values = _as_list(getattr(self, key))
            if not values or min(values) < 1:
                raise ValueError(f"{key}={getattr(self, key)}; every value must be >= 1")
        if max(_as_list(self.clients_per_canary)) > self.num_clients:
            raise ValueError(
                f"clients_per_canary={self.clients_per_canary} exceeds num_clients="
                f"{self.num_clients}"
            )
        if not self.kinds():
            raise ValueError(
                f"clients_per_canary={self.clients_per_canary} exceeds repeats={self.repeats}"
            )
        return self

    def kinds(self) -> list[tuple[int, int]]:
        """The (copies, holding clients) pairs the canaries cycle through."""
        return [
            (r, h)
            for h in _as_list(self.clients_per_canary)
            for r in _as_list(self.repeats)
            if h <= r
        ]


def _as_list(v: int | list[int]) -> list[int]:
    return list(v) if isinstance(v, list) else [v]


class Mnist1dConfig(_Section):
    """Arguments of ``mnist1d.data.make_dataset`` that we expose (the rest keep its defaults)."""

    num_samples: int = Field(5000, ge=100, description="examples generated (train + test)")
    train_split: float = Field(0.8, gt=0.0, lt=1.0, description="share used for training")


class BackdoorConfig(_Section):
    """A backdoor held by chosen clients (BadNets, Gu et al. 2017): a share of their examples
    carry a fixed trigger and the target label; unlearning must remove it with the client."""

    clients: list[int] = Field(default_factory=list, description="clients holding the backdoor")
    share: float = Field(0.5, gt=0.0, le=1.0, description="share of their examples poisoned")
    target: int = Field(0, ge=0, description="the label the trigger maps to")
    width: int = Field(4, ge=1, description="trigger: the last `width` input features")
    strength: float = Field(3.0, gt=0.0, description="trigger values +-strength (data std)")


class DataConfig(_Section):
    name: Literal[DATASETS] = Field("mnist1d", description="dataset: " + ", ".join(DATASETS))  # type: ignore[valid-type]
    data_dir: Path | None = Field(
        None, description="local folder with torchvision files (mnist/fashionmnist/cifar*)"
    )
    cache_dir: Path = Field(
        Path(".cache/fedmem"), description="where generated datasets and tables are cached"
    )
    num_train: int | None = Field(None, ge=1, description="use a random subset of the train set")
    num_test: int | None = Field(None, ge=1, description="use a random subset of the test set")
    mnist1d: Mnist1dConfig = Mnist1dConfig()
    noise: NoiseConfig = NoiseConfig()
    outliers: OutlierConfig = OutlierConfig()
    canaries: CanaryConfig = CanaryConfig()
    backdoor: BackdoorConfig = BackdoorConfig()

    @model_validator(mode="after")
    def _needs_dir(self) -> DataConfig:
        if self.name in ("mnist", "fashionmnist", "cifar10", "cifar100") and self.data_dir is None:
            raise ValueError(
                f"data.name={self.name} is read from local files: set data.data_dir to the folder "
                "that holds them (nothing is downloaded)"
            )
        if self.noise.rate + self.outliers.share >= 1.0:
            raise ValueError("noise.rate + outliers.share must stay below 1")
        return self


# ---------------------------------------------------------------------------------------------
# partition, model, train, federation, output
# ---------------------------------------------------------------------------------------------
class PartitionConfig(_Section):
    kind: Literal["iid", "dirichlet", "shards"] = Field(
        "dirichlet", description="iid, dirichlet (label skew by alpha), shards (k classes/client)"
    )
    alpha: float = Field(0.5, gt=0.0, description="Dirichlet concentration (smaller = more skew)")
    classes_per_client: int = Field(2, ge=1, description="shards: classes per client")
    min_size: int = Field(
        2, ge=1, description="dirichlet: resample until every client holds at least this many"
    )


class TiedDropoutConfig(_Section):
    """Example-tied dropout (Maini et al. 2023, Sec. 5) and its baselines on the hidden units
    (MLP) / channels (cnn1d, cnn): :mod:`fedmem.models.tied_dropout`."""

    kind: Literal["none", "example", "client", "standard", "fixed"] = Field(
        "none",
        description="none; example / client: memorization units tied to the example / client "
        "id; standard: ordinary dropout at the same keep share; fixed: a fixed sparse network "
        "of the same size",
    )
    p_gen: float = Field(0.4, gt=0.0, lt=1.0, description="share of units always on")
    p_mem: float = Field(
        0.1, gt=0.0, le=1.0, description="keep probability of each memorization unit"
    )


class ModelConfig(_Section):
    name: Literal[MODELS] = Field("mlp", description="model: " + ", ".join(MODELS))  # type: ignore[valid-type]
    hidden: int = Field(256, ge=1, description="mlp: width of the hidden layers")
    depth: int = Field(2, ge=1, description="mlp: number of hidden layers")
    channels: int = Field(32, ge=1, description="cnn / cnn1d / resnet9: base channel count")
    dropout: TiedDropoutConfig = TiedDropoutConfig()


class TrainConfig(_Section):
    """The one local training loop (central and every client)."""

    rounds: int = Field(20, ge=1, description="rounds (central: same example visits per round)")
    local_epochs: int = Field(1, ge=1, description="passes over the local data per round")
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0.0, description="learning rate (> 0)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd momentum")
    weight_decay: float = Field(0.0, ge=0.0)
    proximal_mu: float = Field(0.0, ge=0.0, description="FedProx proximal term mu (0 = off)")
    eval_batch_size: int = Field(4096, ge=1)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu", description="auto picks cuda when available"
    )
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto",
        description="torch threads of the central training loop: auto = 1 for mlp / cnn1d "
        "(parallel runs never collapse into OpenMP waits), torch's default for cnn / resnet9; "
        "null = torch's default (clients: federation.client_resources.num_cpus)",
    )
    on_divergence: Literal["stop", "continue"] = Field(
        "stop",
        description="when the weights or loss become non-finite: stop that model's run "
        "there (its result is kept and marked diverged) or continue to the last round",
    )


class CentralConfig(_Section):
    """What one round of the central run is matched to in the federated run.

    The comparison central vs federated isolates federation only when both runs train alike;
    these two knobs say how (recorded in summary.json and the final table's title).
    """

    match: Literal["visits", "steps"] = Field(
        "visits",
        description="visits: a central round passes over all rows train.local_epochs times "
        "(as many example visits as a federated round at full participation); steps: as many "
        "sequential optimizer steps as a client's local training (the mean over clients)",
    )
    optimizer: Literal["keep", "reset"] = Field(
        "keep",
        description="keep: optimizer state (momentum) carries across central rounds, as in "
        "ordinary training; reset: a fresh optimizer every round, as every client has",
    )


class ClientResources(_Section):
    num_cpus: float = Field(1.0, gt=0.0)
    num_gpus: float = Field(0.0, ge=0.0, description="fractional GPUs pack clients on one GPU")


class FederationConfig(_Section):
    enabled: bool = Field(True, description="also run the federated experiment")
    num_clients: int = Field(10, ge=1)
    strategy: str = Field("fedavg", description="server strategy name (see strategies/)")
    strategy_args: dict[str, float | int | bool] = Field(
        default_factory=dict, description="extra strategy arguments, e.g. {eta: 0.01}"
    )
    fraction_train: float = Field(1.0, gt=0.0, le=1.0, description="share of clients per round")
    min_train_clients: int = Field(
        1, ge=1, description="clients per round at least; a round with fewer successes is lost"
    )
    client_failure_rate: float = Field(0.0, ge=0.0, lt=1.0)
    client_resources: ClientResources = ClientResources()
    backend: Literal["ray", "local", "batched"] = Field(
        "ray",
        description="ray: Flower simulation engine on Ray; local: in-process, no Ray; batched: "
        "in-process, all clients of a round trained at once as stacked models (FedAvg family)",
    )
    ray_address: str | None = Field(None, description="join an existing Ray cluster (e.g. auto)")
    excluded_clients: list[int] = Field(
        default_factory=list,
        description="clients that never train (dropped from every round's sample; the central "
        "run leaves their rows out too): the reference of unlearning, retraining without them",
    )


class GradientGeometryConfig(_Section):
    """Per-layer clean-vs-mislabeled gradient geometry (Maini et al. 2023, Fig. 2)."""

    enabled: bool = Field(True, description="compute it after every `every` rounds")
    every: int = Field(1, ge=1, description="rounds between measurements")
    max_examples: int = Field(
        2048, ge=1, description="per group (clean / mislabeled), a fixed seeded subsample"
    )


class LabelGradientConfig(_Section):
    """Label-dependent vs label-independent gradient parts per layer, clean vs mislabeled
    (Stephenson et al. 2021, Eq. 25, Fig. A.1)."""

    enabled: bool = Field(False, description="compute it after every `every` rounds")
    every: int = Field(1, ge=1, description="rounds between measurements")
    max_examples: int = Field(
        1024, ge=2, description="per group; both groups get the same seeded number of rows"
    )


class MemorizationScoresConfig(_Section):
    """Feldman & Zhang (2020) memorization scores from an ensemble on random subsets."""

    enabled: bool = Field(False, description="train the ensemble after the runs")
    models: int = Field(128, ge=2, description="ensemble size K")
    subset: float = Field(0.7, gt=0.0, lt=1.0, description="share of rows (or clients) per model")
    level: Literal["example", "client", "both"] = Field(
        "example", description="subsets of examples, of whole clients, or both"
    )
    epochs: int | None = Field(
        None, ge=1, description="epochs per model (default: train.rounds x train.local_epochs)"
    )


class AnalysisConfig(_Section):
    track_examples: bool = Field(True, description="per-example trajectories -> examples.npz")
    memorization_share: float = Field(
        0.5, gt=0.0, lt=1.0, description="memorization onset: noisy_memorized exceeds this"
    )
    gradients: GradientGeometryConfig = GradientGeometryConfig()
    label_gradient: LabelGradientConfig = LabelGradientConfig()
    memorization_scores: MemorizationScoresConfig = MemorizationScoresConfig()


class PrivacyConfig(_Section):
    """Differential privacy: record-level DP-SGD (Opacus) and user-level DP-FedAvg."""

    record_level: bool = Field(False, description="DP-SGD in the training loop (central+clients)")
    noise_multiplier: float | None = Field(
        None, ge=0.0, description="DP-SGD noise multiplier (or set target_epsilon)"
    )
    target_epsilon: float | None = Field(
        None, description="epsilon over the whole run; the noise multiplier is derived from it"
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-example clipping norm")
    delta: float | None = Field(
        None, description="record-level delta (default 1/(10 n), n: see delta_convention)"
    )
    delta_convention: Literal["dataset", "holder"] = Field(
        "dataset",
        description="n of the default delta: dataset = all training examples, the same delta for "
        "the central run and every client (epsilons comparable); holder = each trainer's own "
        "examples (a client's delta is larger)",
    )
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant")
    grad_sample_mode: Literal["auto", "hooks", "functorch", "ew", "ghost"] = Field(
        "auto", description="Opacus per-sample gradient mode (auto: fastest correct one)"
    )
    user_level: bool = Field(False, description="DP-FedAvg at the server (clip + noise updates)")
    user_noise_multiplier: float = Field(1.0, ge=0.0, description="DP-FedAvg noise multiplier")
    user_clip_norm: float = Field(1.0, gt=0.0, description="DP-FedAvg client-update clip norm")
    user_delta: float | None = Field(None, description="default 1/(10 * num_clients)")

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise _KeyedError("privacy.target_epsilon", f"{self.target_epsilon}; must be > 0")
        if self.record_level and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise _KeyedError(
                "privacy.noise_multiplier",
                "set exactly one of privacy.noise_multiplier and privacy.target_epsilon",
            )
        for key, d in (("privacy.delta", self.delta), ("privacy.user_delta", self.user_delta)):
            if d is not None and not 0 < d < 1:
                raise _KeyedError(key, f"{d}; allowed: 0 < delta < 1")
        return self


class AuditAttackConfig(_Section):
    """How ``python -m fedmem.audit`` attacks a finished run (not part of the run's hash)."""

    shadows: int = Field(
        32, ge=2, description="shadow models per target for LiRA / RMIA (even: half hold each)"
    )
    fixed_variance: Literal["auto", "yes", "no"] = Field(
        "auto", description="LiRA with one pooled variance (auto: when shadows < 64, Carlini 2022)"
    )
    client_shadows: int = Field(
        16, ge=0, description="shadows with whole clients in or out (client-level LiRA; 0: off)"
    )
    epsilon_attack: Literal["loss", "lira_online", "lira_offline", "rmia"] = Field(
        "lira_online", description="attack whose scores give the one-run epsilon lower bound"
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1.0, description="confidence of the one-run epsilon lower bound"
    )

    @model_validator(mode="after")
    def _even(self) -> AuditAttackConfig:
        for key, k in (("shadows", self.shadows), ("client_shadows", self.client_shadows)):
            if k % 2:
                raise _KeyedError(
                    f"audit.attack.{key}",
                    f"{k}; must be even (every candidate is in exactly half the shadows)",
                )
        return self


class AuditConfig(_Section):
    """What a run keeps aside so that ``python -m fedmem.audit`` can attack it.

    Membership needs a ground truth that the attacker does not know: candidates that the seed
    includes in training with probability 1/2 (recorded in the ExampleTable's audit arrays).
    """

    pool: int = Field(
        0, ge=0, description="training examples made membership candidates, each kept w.p. 1/2"
    )
    canaries: int = Field(
        0, ge=0, description="audit canaries (random input+label), each inserted once w.p. 1/2"
    )
    heldout_clients: int = Field(
        0, ge=0, description="extra clients partitioned like the rest but never trained on"
    )
    attack: AuditAttackConfig = AuditAttackConfig()


class ELRConfig(_Section):
    """Early-learning regularization (Liu et al. 2020; :mod:`fedmem.methods.elr`)."""

    enabled: bool = Field(False, description="add ELR's term to the loss")
    lam: float = Field(3.0, gt=0.0, description="lambda, the weight of the ELR term")
    beta: float = Field(
        0.7, ge=0.0, lt=1.0, description="target momentum: t <- beta t + (1 - beta) p"
    )
    runs: Literal["both", "central", "federated"] = Field(
        "both", description="which runs train with ELR (federated: every client)"
    )


class ForgetGeneratorConfig(_Section):
    """Per-client dummy-gradient generators for unlearning ("Learn to Forget", Liu et al.
    2020; :mod:`fedmem.methods.forget_generator`): trained by every sampled client each round,
    kept in the client's state, used by ``python -m fedmem.unlearn --method generator``."""

    enabled: bool = Field(False, description="every client trains a generator (federated run)")
    layers: int = Field(1, ge=1, description="dummy gradients for the model's last N layers")
    hidden: int = Field(64, ge=1, description="the generator's hidden width")
    lr: float = Field(1e-3, gt=0.0, description="the generator's Adam learning rate")
    steps_per_round: int = Field(5, ge=0, description="generator steps per training round")
    step_size: float = Field(1.0, gt=0.0, description="SGD step that applies a dummy gradient")
    reference: int = Field(256, ge=2, description="public non-member test rows (same for all)")
    damage_bound: float = Field(
        0.01, ge=0.0, description="KL on the reference rows allowed before the penalty"
    )
    damage_weight: float = Field(10.0, ge=0.0, description="weight of the damage penalty")


class PluginsConfig(_Section):
    """Training plug-ins (:mod:`fedmem.methods`). Built-in ones get their own section here as
    they arrive; FedProx's term is ``train.proximal_mu``."""

    elr: ELRConfig = ELRConfig()
    forget_generator: ForgetGeneratorConfig = ForgetGeneratorConfig()
    external: list[str] = Field(
        default_factory=list,
        description="extra plug-ins as 'package.module:Class' (fedmem.methods.Plugin subclasses)",
    )


class CheckpointConfig(_Section):
    """Which rounds' models a run keeps (round 0 and the final round always)."""

    rounds: list[int] = Field(default_factory=list, description="rounds whose models are kept")
    every: int = Field(0, ge=0, description="also keep every k-th round (0: off)")
    client_updates: bool = Field(
        False, description="keep every round's client updates on the server (FedEraser)"
    )
    update_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="precision of the stored client updates"
    )
    resume_every: int = Field(
        1,
        ge=0,
        description="write the resume state every k rounds (0: only when a model is finished); "
        "a killed run redoes the rounds since",
    )

    @field_validator("rounds")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(r < 0 for r in v):
            raise ValueError(f"{v}: rounds must be >= 0")
        return sorted(set(v))


class OutputConfig(_Section):
    dir: Path = Field(Path("runs"), description="parent folder of run directories")
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$", description="run name prefix")


class ExperimentConfig(_Section):
    seed: int = Field(0, ge=0, description="root of every random number in the experiment")
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    central: CentralConfig = CentralConfig()
    federation: FederationConfig = FederationConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    audit: AuditConfig = AuditConfig()
    plugins: PluginsConfig = PluginsConfig()
    checkpoints: CheckpointConfig = CheckpointConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> ExperimentConfig:
        n = self.federation.num_clients
        if self.central.match == "steps" and self.privacy.record_level:
            raise _KeyedError(
                "central.match",
                "steps is not available with privacy.record_level (DP-SGD plans whole "
                "epochs of Poisson batches for its accountant); use central.match=visits",
            )
        can = self.data.canaries
        if can.count > 0 and can.num_clients > n:
            raise _KeyedError(
                "data.canaries.num_clients",
                f"{can.num_clients} canary clients but federation.num_clients={n}; allowed: 1..{n}",
            )
        if self.data.noise.client_rates:
            bad = [c for c in self.data.noise.client_rates if c >= n]
            if bad:
                raise _KeyedError(
                    "data.noise.client_rates",
                    f"client ids {bad} do not exist; allowed: 0..{n - 1}",
                )
        if self.federation.min_train_clients > n:
            raise _KeyedError(
                "federation.min_train_clients",
                f"{self.federation.min_train_clients} exceeds federation.num_clients={n}",
            )
        bad = [c for c in self.data.backdoor.clients if not 0 <= c < n]
        if bad or len(set(self.data.backdoor.clients)) != len(self.data.backdoor.clients):
            raise _KeyedError(
                "data.backdoor.clients", f"{self.data.backdoor.clients}: distinct ids in 0..{n - 1}"
            )
        gone = self.federation.excluded_clients
        if any(c < 0 or c >= n for c in gone) or len(set(gone)) != len(gone) or len(gone) >= n:
            raise _KeyedError(
                "federation.excluded_clients",
                f"{gone}: distinct client ids in 0..{n - 1}, fewer than all {n} clients",
            )
        if self.partition.kind == "shards" and self.partition.classes_per_client < 1:
            raise _KeyedError("partition.classes_per_client", "must be >= 1")
        if self.federation.backend == "batched":
            from fedmem.federation.batched_support import unsupported

            problem = unsupported(self)
            if problem is not None:
                raise _KeyedError(*problem)
        return self


class _KeyedError(ValueError):
    """A cross-section error that knows which dotted key it is about."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------------------------
# loading, overrides, hashing
# ---------------------------------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=0.1", "data.noise.rate=0.4"]`` into a nested dict (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        value = load_override_value(key, raw)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {part} is set to a value and also used as a section")
            node = child
        node[parts[-1]] = value
    return out


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = merge_dicts(merged[k], v)
        else:
            merged[k] = v
    return merged


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section that holds the key at ``loc`` (for unknown-key errors)."""
    model: type[BaseModel] | None = ExperimentConfig
    for part in loc[:-1]:
        if model is None:
            return []
        field = model.model_fields.get(str(part))
        ann = field.annotation if field is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return sorted(model.model_fields) if model is not None else []


def _one_line(err: ValidationError) -> str:
    # The deepest location first: for a union (``int | list[int]``) the member that got
    # furthest says most (``repeats.1`` is not an integer, rather than "not an int").
    e = max(err.errors(), key=lambda x: len(x["loc"]))
    loc = tuple(e["loc"])
    key = dotted_key(loc, ExperimentConfig)
    kind = e["type"]
    ctx = e.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        return f"{key}: unknown key; allowed here: {', '.join(allowed)}"
    if kind == "value_error":
        inner = ctx.get("error")
        if isinstance(inner, _KeyedError):
            return f"{inner.key}: {inner}"
        msg = str(inner) if inner is not None else e["msg"]
        return f"{key}: {msg}"
    given = e.get("input")
    given_s = "" if isinstance(given, dict) else f" (got {given!r})"
    msg = e["msg"][:1].lower() + e["msg"][1:]  # keep the case of patterns and type names
    return f"{key}: {msg}{given_s}"


def build(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a nested dict into an ExperimentConfig, or raise a one-line ConfigError."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err).replace("\r", " ").replace("\n", " ")) from None


def load(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    default_name: str | None = None,
) -> ExperimentConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides.

    ``default_name`` becomes ``output.name`` when neither the file nor the overrides set it.
    """
    raw: dict[str, Any] = read_config_file(Path(path)) if path is not None else {}
    raw = merge_dicts(raw, parse_overrides(overrides or []))
    if default_name is not None and "name" not in (raw.get("output") or {}):
        raw = merge_dicts(raw, {"output": {"name": default_name}})
    return build(raw)


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Resolved config as plain JSON-able data (paths as strings)."""
    return cfg.model_dump(mode="json")


# Keys that never change a run's results: where results go, where caches live, how a finished
# run is attacked afterwards.
NOT_HASHED = ("output", "data.cache_dir", "audit.attack")


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def non_default(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The fields of ``model`` whose value differs from their default, as nested plain data
    (sections compared field by field, recursively; keys in :data:`NOT_HASHED` left out)."""
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        key = f"{prefix}{name}"
        if key in NOT_HASHED:
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            sub = non_default(value, key + ".")
            if sub:
                out[name] = sub
            continue
        plain = _plain(value if not isinstance(value, Path) else str(value))
        default = field.get_default(call_default_factory=True)
        if plain != _plain(default if not isinstance(default, Path) else str(default)):
            out[name] = plain
    return out


def config_hash(cfg: ExperimentConfig, only: tuple[str, ...] | None = None) -> str:
    """sha256 (hex) of the config's non-default fields (:func:`non_default`).

    The one hash policy: the run directory (``<name>-<hash8>``) and the ExampleTable cache
    (``only=`` the keys the table depends on) both use it. Because fields equal to their
    defaults are left out, adding a config field with a default renames no existing run
    directory (open_lth's rule). ``only``: dotted keys to restrict the hash to.
    """
    d = non_default(cfg)
    if only is not None:
        picked: dict[str, Any] = {}
        for key in only:
            node: Any = d
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                picked[key] = node
        d = picked
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def describe_sections() -> str:
    """Help text listing every config section and its keys (for ``--help``)."""
    lines = ["config sections (override any key as section.key=value):"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            key = f"{prefix}{name}"
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".")
            else:
                default = field.default
                desc = f"  {field.description}" if field.description else ""
                lines.append(f"  {key} = {default!s}{desc}")

    walk(ExperimentConfig, "")
    return "\n".join(lines)
