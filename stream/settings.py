"""Settings, read from ``ROADSTREAM_…`` environment variables and an optional file.

Precedence, highest first: keyword arguments, environment variables (nested sections
with a double underscore: ``ROADSTREAM_WORKER__BATCH_SIZE=64``), the config file named by
``ROADSTREAM_CONFIG`` (TOML or YAML), then the defaults below. ``load_settings`` takes an
``environ`` mapping so tests can pass plain dicts.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream.errors import ConfigError
from stream.names import DEFAULT_NAMESPACE

ENV_PREFIX = "ROADSTREAM_"
#: ``ROADSTREAM_…`` variables that are not settings (read by the CLI and the tests).
NOT_SETTINGS = frozenset(
    {"ROADSTREAM_CONFIG", "ROADSTREAM_LOG_FORMAT", "ROADSTREAM_TEST_REDIS_URL", "ROADSTREAM_TEST_REDIS_CLUSTER_URL"}
)
#: A model setting that names the model shipped in the package (``stages.shipped``).
SHIPPED = "shipped"
CONFIG_ENV = "ROADSTREAM_CONFIG"


class BrokerSettings(BaseModel):
    """Transport bounds shared by every stage."""

    model_config = ConfigDict(extra="forbid")

    #: An entry pending longer than this is taken over by another consumer.
    claim_idle_ms: int = 30_000
    #: Deliveries after which an entry goes to the dead-letter stream.
    max_deliveries: int = 5
    #: How long a dedupe key keeps a re-published output from a second copy.
    dedupe_ttl_s: int = 7 * 24 * 3600
    #: Partition lease time-to-live; renewed every third of it.
    lease_ttl_ms: int = 10_000
    #: A producer waits while the next hop's lag (undelivered + pending) passes this.
    max_lag: int = 5_000
    #: A producer waits while the frame blobs in flight pass this many bytes.
    max_blob_bytes: int = 512 * 1024 * 1024
    #: A producer waits while the server's ``used_memory`` passes this many bytes (0: no
    #: bound); keep it under Redis ``maxmemory`` so that writes are slowed, not refused.
    max_used_memory: int = Field(default=0, ge=0)
    #: Frame blobs expire after this.
    blob_ttl_s: int = 3600
    #: Once fuse has closed a frame's window (vera off) and the frame is no key frame, its
    #: blob expires after this instead: long enough for a detect worker that took a dead
    #: one's frames over to replay them (claim timeout plus lease), short of the full TTL.
    spent_blob_ttl_s: int = Field(default=120, ge=1)
    frame_partitions: int = 16
    fuse_partitions: int = 8
    #: Seconds a Redis command may wait for its reply before the server counts as
    #: unreachable. At full load a blob fetch queues behind many others: redis-py's
    #: default (none) hid dead servers, and short values cut healthy fetches.
    socket_timeout_s: float = 30.0
    socket_connect_timeout_s: float = 10.0
    #: Frame blobs per MGET; larger fetches are split (one round trip still).
    blob_fetch_keys: int = Field(default=64, ge=1)
    #: Replicas that must hold a worker's outputs (and ingest's frame blobs) before it
    #: acks their inputs: Redis replicates asynchronously, so a primary that dies right
    #: after a write may take it along when its replica is promoted. ``WAIT`` in the same
    #: round trip as the writes, on each node written (0: do not wait; 1 on a cluster with
    #: a replica per primary: ``docs/operating.md``).
    replica_acks: int = Field(default=0, ge=0)
    #: The longest one such wait lasts (a primary with no live replica costs this).
    replica_ack_timeout_ms: int = Field(default=100, ge=1)
    #: Entries kept on a stream that no group reads (segments while vera is off): its
    #: producer caps it at about this many, newest kept.
    ungrouped_cap: int = Field(default=10_000, ge=1)


class WorkerSettings(BaseModel):
    """Runtime of one worker process."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = 32
    max_wait_ms: int = 50
    concurrency: int = 1
    #: Batches read ahead of the one being handled. Their preparation (the detect stage's
    #: blob fetch, JPEG decode and GPU launch) runs concurrently, so one batch's fetch
    #: overlaps another's decode and the device always has work queued (on an H200, 4
    #: gave YOLO11n 3.8k frames/s where 1 and 2 gave 2.7-2.8k: README). 0: read a batch
    #: only when a processor is free, leaving the rest in the stream for other workers
    #: (what ``run`` gives its ingest processes: a job held ahead is a job no idle process gets).
    prefetch: int = Field(default=4, ge=0)
    #: Seconds to finish in-flight work after SIGTERM before cancelling it.
    grace_s: float = 10.0
    reclaim_interval_s: float = 5.0
    heartbeat_s: float = 5.0
    #: Port for /metrics, /live and /ready; 0 picks none.
    metrics_port: int = 0
    #: Interface they listen on: loopback unless a deployment opens it to its probes
    #: and scrapers (``deploy/`` sets 0.0.0.0 in containers).
    metrics_host: str = "127.0.0.1"
    #: Seconds a starting worker waits for an unreachable broker (retrying with a
    #: growing, logged delay) before it gives up: workers may start before Redis does.
    start_wait_s: float = 30.0
    #: Seconds between trims of the input streams (below what every group has
    #: acknowledged) and caps of ungrouped output streams; 0: never.
    trim_interval_s: float = 10.0


class IngestSettings(BaseModel):
    """Decoding, sampling and publishing of footage."""

    model_config = ConfigDict(extra="forbid")

    #: ``pyav`` (CPU), ``decord``, ``nvdec`` (NVIDIA PyNvVideoCodec: decode, resize and
    #: JPEG-encode on the GPU; a clip NVDEC cannot take falls back to PyAV), or ``auto``
    #: (``roadstream run`` gives some ingest processes NVDEC on a GPU box with the library,
    #: the rest PyAV; a lone worker takes NVDEC when it can, else PyAV without a warning).
    decoder: str = "auto"
    #: ``ticks``: every frame is decoded and one taken per tick (``sample_fps``).
    #: ``keyframes``: only keyframes are decoded (about one a second on TeslaCam clips),
    #: each put on its nearest tick: a fast first pass.
    sample: Literal["ticks", "keyframes"] = "ticks"
    sample_fps: float = 5.0
    long_side: int = 640
    encoding: str = "jpeg"  # jpeg | raw
    jpeg_quality: int = 85
    decoder_threads: int = 0  # 0: the decoder's own choice
    #: Clips of one job decoded at once (PyAV threads, or NVDEC sessions). Above 1 a long
    #: drive's camera job uses more than one decoder's worth of cores. 0: one at a time in
    #: a bare worker; in ``roadstream run`` one per PyAV ingest process when it has a core
    #: (its plan on a GPU box), two when it has two or more, four per NVDEC one.
    parallel_clips: int = Field(default=0, ge=0)
    #: Niceness (an ``os.nice`` increment) a PyAV or decord ingest worker process adds to
    #: itself at start, so that detect, fuse and Redis get the cores first and ingest fills
    #: the rest. 0 leaves the priority alone. A process that decodes with NVDEC keeps its
    #: priority (its CPU work feeds the GPU decoder); ``auto`` and ``nvdec`` are resolved as
    #: the worker does (NVDEC when the library and CUDA are there, else PyAV; PyAV all the
    #: same for ``sample = keyframes`` and ``encoding = raw``). Only ``roadstream
    #: worker ingest`` applies it (``run``'s and ``supervise --processes``' children, deploy/),
    #: never a process that runs several stages (``run --workers 1``, ``supervise``).
    nice: int = Field(default=10, ge=0, le=19)
    #: The GPU an NVDEC ingest worker decodes on (``roadstream run`` spreads them).
    nvdec_device: str = "cuda:0"
    #: NVDEC decode sessions (camera jobs at once) in each NVDEC ingest process of
    #: ``roadstream run``: NVDEC's rate grows with sessions up to the GPU's decoder engines
    #: (bench/nvdec_bench.py on an H200: 1 session 740 frames/s, 4: 2,330, 8: 3,620).
    nvdec_sessions: int = Field(default=8, ge=1)
    #: NVDEC ingest processes per GPU under ``roadstream run`` (``decoder`` auto or nvdec).
    nvdec_processes: int = Field(default=1, ge=0)
    #: ``roadstream run`` on a GPU box with NVDEC: also start PyAV ingest processes on the
    #: other cores. With per-camera jobs they took the long drive's whole camera jobs and
    #: became the tail; with spans (``split = span``) no job is long, and on the H200 the
    #: run was faster with them (14.2x real time against 12.9x for NVDEC alone, one call).
    pyav_beside_nvdec: bool = True
    #: ``roadstream submit``'s jobs: ``drive``, one per drive; ``camera``, one per (drive,
    #: camera), so several ingest processes share a drive (each partition still gets its
    #: frames in order; the drive ends when all its jobs did); ``span``, per camera and, for
    #: a drive longer than ``span_s``, per span of minutes, so many processes share one long
    #: drive (spans publish in time order, ``workers.handlers.ingest_spans``). Split jobs:
    #: raise ``fuse.watermark_timeout_s`` to cover how far apart a drive's cameras may run.
    #: ``roadstream run`` splits by span whenever it has several ingest processes.
    split: Literal["span", "camera", "drive"] = "drive"
    #: Footage seconds per span job (``split = span``); whole minutes, at least this long.
    span_s: float = Field(default=120.0, gt=0)
    roots: list[str] = Field(default_factory=list)  # footage paths must lie under these


class DetectSettings(BaseModel):
    """Detector, batching and temporal windows."""

    model_config = ConfigDict(extra="forbid")

    #: A ``.pt`` file, an ultralytics model name in its weights folder, a model yaml, or
    #: ``shipped``: the package's ``stages/models/cones_yolo11n.pt``, which every way of
    #: running the detect stage (``run``, ``worker detect``, ``supervise``, deploy/) uses
    #: unless the settings name another.
    model: str = SHIPPED
    #: A detector built from a model yaml has random weights and detects nothing useful:
    #: the detect stage refuses one unless this is true (tests and benchmarks set it).
    allow_random_weights: bool = False
    #: ``auto``: the first GPU when torch sees one, else the CPU (as ultralytics does);
    #: or a torch device (``cpu``, ``cuda:1``). ``roadstream run`` gives each of several
    #: detect processes a GPU of its own.
    device: str = "auto"
    imgsz: int = 640
    #: Pad each batch to the smallest stride-multiple rectangle instead of imgsz × imgsz.
    rect: bool = True
    half: bool = True
    conf: float = 0.25
    iou: float = 0.45
    max_det: int = 100
    #: On CUDA, pad each batch with blank frames up to a multiple of this many (the
    #: detector's and the scorer's), so the models see few batch shapes: each costs
    #: seconds when first seen (cuDNN's plans, the CUDA graph capture: 2.3-4.6 s on an
    #: H200, bench/detect_startup.py) and is captured once. The default, the batch size,
    #: makes one shape per frame size; the padding's GPU time is small beside that on a
    #: GPU the small models leave mostly idle. Never past the worker's ``batch_size``.
    #: 1 pads nothing.
    pad_batch_to: int = Field(default=32, ge=1)
    #: On CUDA, let cuDNN time every convolution algorithm for each new batch shape
    #: (``torch.backends.cudnn.benchmark``). Off by default: on an H200 it made a new
    #: shape cost about 6 s instead of 2.5-3 (bench/detect_startup.py) and delayed the
    #: first detection of a ``roadstream run`` from 35 s to 52 s, and the small models
    #: leave the GPU mostly idle anyway.
    cudnn_benchmark: bool = False
    #: On CUDA, run the detector's and the scorer's forward passes as captured CUDA graphs
    #: per input shape (one launch instead of hundreds: the launches, not the GPU, bound
    #: small models).
    cuda_graphs: bool = True
    #: Where JPEGs are decoded: ``gpu`` (nvJPEG on the detector's device, one batched call)
    #: or ``cpu`` (libjpeg-turbo in ``decode_threads`` threads, then one upload per batch).
    #: Measured on an H200 (README): ``cpu`` lifted the device path alone from 5.9k to 6.2k
    #: frames/s (YOLO11n, 4 processes) and slowed a single worker, whose event loop then
    #: shares the cores (3.8k to 2.1k). It costs about 0.9 ms of a core per 640×360 frame
    #: (on the 2-core dev machine).
    decode: Literal["gpu", "cpu"] = "gpu"
    #: Threads decoding JPEGs when ``decode`` is ``cpu`` (per worker process).
    decode_threads: int = Field(default=4, ge=1)
    #: Model class name -> roadwork object type; classes not named are ignored.
    #: Names match in any case, with spaces, underscores and hyphens alike.
    classes: dict[str, str] = Field(
        default_factory=lambda: {
            "cone": "cone",
            "traffic cone": "cone",
            "drum": "drum",
            "barrel": "drum",
            "barrier": "barrier",
            "jersey barrier": "barrier",
            "barricade": "barricade",
            "vertical panel": "vertical_panel",
            "tubular marker": "tubular_marker",
            "delineator": "tubular_marker",
            "arrow board": "arrow_board",
            "message board": "message_board",
            "temporary sign": "temporary_sign",
            "roadwork sign": "temporary_sign",
            "work sign": "temporary_sign",
            "work vehicle": "work_vehicle",
            "worker": "worker",
            "police officer": "worker",
            "equipment": "equipment",
        }
    )
    #: Layer whose pooled output is the frame descriptor; -1: the last backbone layer.
    descriptor_layer: int = -1
    #: Roadwork frame scorer weights (``stages.scorer``) run on the detector's decoded
    #: frames; ``shipped`` (the default) is the package's ``stages/models/scorer.pt``;
    #: "" runs none.
    scorer: str = SHIPPED
    #: The temporal windows' frame descriptor: the detector's pooled backbone features,
    #: or the scorer's (needs ``scorer``).
    descriptor: Literal["detector", "scorer"] = "detector"
    window_s: float = 10.0
    stride_s: float = 5.0
    #: A frame is kept when its cosine similarity to the window's last kept frame is below this.
    similarity_threshold: float = 0.9
    #: Detections kept per key frame (top-k by score weighted by box size).
    per_frame_budget: int = 5


class VlmSettings(BaseModel):
    """Vision-language model for the vera and vlm stages; none configured by default."""

    model_config = ConfigDict(extra="forbid")

    backend: str = ""  # "" (off) | transformers | vllm | openai
    model: str = ""
    base_url: str = ""
    max_concurrency: int = 4
    timeout_s: float = 60.0
    questions: str = ""  # file of learned guiding questions
    #: Processor name or path when it differs from the model's (transformers).
    processor: str = ""
    device: str = "cpu"  # transformers: cpu | cuda | cuda:N | auto
    dtype: str = "auto"  # transformers: auto | float32 | bfloat16 | float16
    #: Prompts per forward pass (transformers) or per engine call (vllm).
    batch_size: int = 8
    #: Generations tried before a JSON answer that does not validate is dead-lettered.
    json_attempts: int = 3
    max_new_tokens: int = 256
    #: HTTP retries (with exponential backoff) of a failed or timed-out request (openai).
    max_retries: int = 3
    api_key: str = ""  # openai: sent as a bearer token when set
    #: Top log-probabilities asked for to read P(yes) (openai, vllm; vLLM caps it at 20).
    top_logprobs: int = 20
    #: Images per prompt at most (vllm's limit_mm_per_prompt; key frames beyond are thinned).
    max_images: int = 8
    #: Extra keyword arguments of vllm.LLM (gpu_memory_utilization, max_model_len, …).
    engine_args: dict[str, Any] = Field(default_factory=dict)
    #: VERA scene-context smoothing: share of a drive's segments averaged per segment,
    #: and the softmax temperature on their cosine similarity (fuse applies it).
    scene_top_fraction: float = 0.15
    scene_temperature: float = 10.0
    #: VERA temporal smoothing: Gaussian kernel length and sigma, in segments.
    temporal_size: int = 15
    temporal_sigma: float = 10.0


#: Neighbouring cameras whose image edges see the same road: ``[cam_a, edge_a, cam_b, edge_b]``.
DEFAULT_OVERLAPS: list[list[str]] = [
    ["front", "left", "left_pillar", "right"],
    ["front", "right", "right_pillar", "left"],
    ["left_pillar", "left", "left_repeater", "right"],
    ["right_pillar", "right", "right_repeater", "left"],
    ["left_repeater", "left", "back", "right"],
    ["right_repeater", "right", "back", "left"],
]

#: Logistic coefficients over the window features (``stages.fuse.FEATURES``); ``bias`` is
#: the intercept. Hand-set defaults; ``roadstream eval --fit`` calibrates them.
DEFAULT_COEFFICIENTS: dict[str, float] = {
    "bias": -2.0,
    "objects": 1.5,
    "types": 0.5,
    "prob_max": 3.0,
    "prob_mean": 2.0,
    "anomaly": 3.0,
    "cameras": 1.0,
    "vlm": 6.0,
}


class FuseSettings(BaseModel):
    """Windows and verdicts."""

    model_config = ConfigDict(extra="forbid")

    window_s: float = 2.0
    #: Windows close on the drive's progress (every camera's watermark or end marker). Only
    #: when no entry of a drive arrived for this long, and for ``stall_lag_factor`` times the
    #: pipeline's observed lag, are the cameras it still waits for given up as gone.
    watermark_timeout_s: float = 30.0
    stall_lag_factor: float = 3.0
    escalate_low: float = 0.4
    escalate_high: float = 0.6
    vlm_timeout_s: float = 60.0
    #: A window is roadwork when its confidence reaches this.
    threshold: float = 0.5
    overlaps: list[list[str]] = Field(default_factory=lambda: [list(o) for o in DEFAULT_OVERLAPS])
    #: Share of the image width, at each side, that a neighbouring camera also sees.
    edge_fraction: float = 0.3
    coefficients: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_COEFFICIENTS))
    #: JSON file of fitted coefficients (``roadstream eval --fit``); wins over ``coefficients``.
    calibration: str = ""
    #: How long fuse keeps a drive's checkpoint (published windows, anomaly history).
    checkpoint_ttl_s: int = 7 * 24 * 3600


class Settings(BaseModel):
    """All of roadstream's settings."""

    model_config = ConfigDict(extra="forbid")

    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = DEFAULT_NAMESPACE
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    detect: DetectSettings = Field(default_factory=DetectSettings)
    vlm: VlmSettings = Field(default_factory=VlmSettings)
    fuse: FuseSettings = Field(default_factory=FuseSettings)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into nested dicts.

    Raises:
        ConfigError: the file is missing or does not parse.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        message = f"config file {path}: {exc.strerror or exc}"
        raise ConfigError(message) from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        message = f"config file {path}: does not parse: {exc}"
        raise ConfigError(message) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        message = f"config file {path}: expected a mapping at the top"
        raise ConfigError(message)
    return data


def unknown_keys(tree: Mapping[str, Any], model: type[BaseModel] | None = None) -> list[str]:
    """Dotted paths of ``tree`` that name no setting (mapping-valued settings hold any key)."""
    model = model or Settings
    unknown = []
    for key, value in tree.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(str(key))
            continue
        inner = field.annotation
        if isinstance(value, Mapping) and isinstance(inner, type) and issubclass(inner, BaseModel):
            unknown += [f"{key}.{path}" for path in unknown_keys(value, inner)]
    return unknown


def _refuse_unknown(tree: Mapping[str, Any], where: str) -> None:
    unknown = unknown_keys(tree)
    if unknown:
        names = ", ".join(unknown)
        message = f"{where}: unknown setting{'s' if len(unknown) > 1 else ''} {names} (see stream/settings.py)"
        raise ConfigError(message)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        single: dict[str, Any] = {}
        for part in reversed(path):
            single = {part: single or value}
        if unknown_keys(single):
            message = f"environment: {name} is no setting (ROADSTREAM_SECTION__KEY, see stream/settings.py)"
            raise ConfigError(message)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(value)
    return tree


def _parse_env_value(value: str) -> Any:
    # Lists arrive as JSON/YAML ("[a, b]"); everything else stays a string for pydantic.
    if value.startswith("["):
        return yaml.safe_load(value)
    return value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings from defaults, a config file, the environment and overrides.

    Parameters:
        environ: the environment to read; ``os.environ`` by default.
        config_file: a TOML or YAML file; ``$ROADSTREAM_CONFIG`` by default.
        **overrides: nested dicts or values that win over everything else.

    Returns:
        Validated settings.

    Raises:
        ConfigError: a file or a value is invalid; the message names the setting.
    """
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(CONFIG_ENV)
    data = read_config_file(config_file) if config_file else {}
    _refuse_unknown(data, f"config file {config_file}")
    env = _env_overrides(environ)
    given = {k: v for k, v in overrides.items() if v is not None}
    _refuse_unknown(given, "settings given (--set)")
    data = _merge(data, env)
    data = _merge(data, given)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        message = f"invalid settings: {problems}"
        raise ConfigError(message) from exc
