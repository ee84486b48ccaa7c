"""The deployment files: Kubernetes manifests (kustomize), KEDA scalers, compose, Dockerfiles.

The overlays are rendered with the real kustomize (``kustomize build`` or ``kubectl
kustomize``) and every object is validated offline: core kinds against the Kubernetes
OpenAPI schemas that the ``kubernetes-validate`` package ships, KEDA's kinds against the
trimmed CRD schemas vendored in ``deploy/k8s/schemas/``. Unknown fields are errors in both
(the API server would silently prune them). Then the checks that matter to roadstream:
every stage runs, GPU stages get GPUs, scalers watch the right stream and group, settings
are real settings, and the Redis config and credentials really work on a real server.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, get_origin
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from pydantic import BaseModel
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_servers import REDIS_SERVER, RedisServer

from stages import shipped
from stream import names
from stream.settings import ENV_PREFIX, Settings, load_settings
from workers import metrics
from workers.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ["base", "overlays/vllm-server", "overlays/external-redis", "overlays/redis-cluster"]
#: Kubernetes version whose schemas the core objects must satisfy.
KUBERNETES_VERSION = "1.31.0"
CPU_STAGES = {names.INGEST, names.FUSE}
GPU_STAGES = {names.DETECT, names.VERA, names.VLM}
GPU = "nvidia.com/gpu"
STAGE_LABEL = "app.kubernetes.io/component"
#: Which partition count bounds each partitioned stage's replicas.
PARTITION_SETTING = {
    names.DETECT: "ROADSTREAM_BROKER__FRAME_PARTITIONS",
    names.FUSE: "ROADSTREAM_BROKER__FUSE_PARTITIONS",
}


# -- rendering and schemas -------------------------------------------------------------


def kustomize_command() -> list[str] | None:
    """``kustomize build`` if installed, else ``kubectl kustomize``, else ``None``."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects of one kustomization, rendered by kustomize."""
    command = kustomize_command()
    if command is None:
        message = "neither kustomize nor kubectl is installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run(
        [*command, str(K8S / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kustomize failed on {overlay}:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """Objects of a kind (and name)."""
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """The one object of a kind and name; fails the test when it is not there."""
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _closed(schema: Any) -> Any:
    # Structural schemas prune unknown fields without a word; in a test they are errors.
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_closed(item) for item in schema]
    return schema


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> validator, from the vendored KEDA CRDs."""
    validators = {}
    for path in sorted((K8S / "schemas").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            validators[key] = jsonschema.Draft7Validator(_closed(version["schema"]["openAPIV3Schema"]))
    return validators


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Why an object is invalid (empty when it is valid)."""
    where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
    validator = crd_validators().get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if validator is not None:
        return [f"{where}: {'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {'/'.join(map(str, exc.path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: no schema for it ({exc})"]
    return []


# -- helpers over rendered objects -----------------------------------------------------


def settings_map(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The shared settings ConfigMap."""
    return one(objects, "ConfigMap", "roadstream-settings")["data"]


def worker_container(deployment: dict[str, Any]) -> dict[str, Any]:
    """The one container of a stage's pod."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def stage_deployment(objects: tuple[dict[str, Any], ...], stage: str) -> dict[str, Any]:
    """The Deployment of a stage."""
    return one(objects, "Deployment", f"roadstream-{stage}")


def plain_env(objects: tuple[dict[str, Any], ...], stage: str) -> dict[str, str]:
    """A stage's environment: the ConfigMap, then its own literal values."""
    env = dict(settings_map(objects))
    env.update(
        {
            e["name"]: e["value"]
            for e in worker_container(stage_deployment(objects, stage))["env"]
            if "value" in e
        }
    )
    return env


def gpus(container: dict[str, Any]) -> tuple[str | None, str | None]:
    """A container's GPU request and limit."""
    resources = container.get("resources", {})
    return resources.get("requests", {}).get(GPU), resources.get("limits", {}).get(GPU)


def unknown_settings(env: dict[str, str]) -> list[str]:
    """``ROADSTREAM_…`` names that are no field of ``Settings`` (typos are silently ignored)."""
    return [
        name
        for name in env
        if name.startswith(ENV_PREFIX)
        and name != "ROADSTREAM_CONFIG"
        and not _is_setting(Settings, name[len(ENV_PREFIX) :].lower().split("__"))
    ]


def _is_setting(model: type[BaseModel], path: list[str]) -> bool:
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    rest, annotation = path[1:], field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return bool(rest) and _is_setting(annotation, rest)
    # A dict-valued setting takes any key below it; any other leaf takes none.
    return not rest or get_origin(annotation) is dict


def parses_as_worker_command(args: list[str]) -> str:
    """The stage of ``roadstream worker ARGS``; click raises on an argument it does not take."""
    with cli.make_context("roadstream", ["worker", *args], resilient_parsing=False) as root:
        name, command, rest = cli.resolve_command(root, ["worker", *args])
        with command.make_context(name, rest, parent=root) as context:
            return context.params["stage"]


def secret_data(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The Redis Secret's string data."""
    return one(objects, "Secret", "roadstream-redis")["stringData"]


# -- Kubernetes manifests --------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_objects_valid_against_their_schemas(overlay: str) -> None:
    """Every rendered object validates: core kinds strictly, KEDA kinds against the CRDs."""
    # Given the rendered overlay
    objects = render(overlay)
    # When each object is validated; Then none has an error, and no (kind, name) repeats
    errors = [error for obj in objects for error in schema_errors(obj)]
    assert errors == []
    ids = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(ids) == len(set(ids))


def test_schema_validation_rejects_unknown_fields_and_wrong_types() -> None:
    """Guard: the validation above can fail (strict core schemas, closed CRD schemas)."""
    objects = render("base")
    # Given a Deployment with a misspelt field, and a scaler whose metadata holds a number
    deployment = copy.deepcopy(stage_deployment(objects, names.DETECT))
    worker_container(deployment)["imagePullPolicyy"] = "Always"
    scaler = copy.deepcopy(one(objects, "ScaledObject", "roadstream-vera"))
    scaler["spec"]["triggers"][0]["metadata"]["lagCount"] = 20
    typo = copy.deepcopy(scaler)
    typo["spec"]["maxReplicas"] = 3
    # When / Then each is reported
    assert schema_errors(deployment)
    assert schema_errors(scaler)
    assert schema_errors(typo)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_stage_runs_its_worker_from_the_right_image(overlay: str) -> None:
    """One Deployment per stage, ``roadstream worker STAGE``, CPU or GPU image as it needs."""
    objects = render(overlay)
    for stage in names.STAGES:
        # Given the stage's container
        container = worker_container(stage_deployment(objects, stage))
        # Then the image's entrypoint (roadstream worker) gets the stage as its argument
        assert container["args"] == [stage]
        assert parses_as_worker_command(container["args"]) == stage
        image = "roadstream-gpu" if stage in GPU_STAGES else "roadstream-cpu"
        assert container["image"].split(":")[0].endswith(image)
    assert {
        d["metadata"]["labels"][STAGE_LABEL]
        for d in find(objects, "Deployment")
        if STAGE_LABEL in d["metadata"]["labels"]
    } == set(names.STAGES)


def test_gpu_stages_request_gpus_and_cpu_stages_do_not() -> None:
    """In-process VLMs (base): detect, vera and vlm each request and limit one GPU."""
    objects = render("base")
    for stage in names.STAGES:
        requested = gpus(worker_container(stage_deployment(objects, stage)))
        assert requested == (("1", "1") if stage in GPU_STAGES else (None, None)), stage


def test_with_a_vllm_server_the_gpus_move_from_vera_and_vlm_to_the_server() -> None:
    """vllm-server overlay: vera/vlm are HTTP clients; detect and the server hold the GPUs."""
    objects = render("overlays/vllm-server")
    server = one(objects, "Deployment", "vllm")
    assert gpus(worker_container(server)) == ("1", "1")
    assert gpus(worker_container(stage_deployment(objects, names.DETECT))) == ("1", "1")
    for stage in (names.VERA, names.VLM):
        assert gpus(worker_container(stage_deployment(objects, stage))) == (None, None)


def test_vlm_clients_call_the_vllm_service_for_the_model_it_serves() -> None:
    """The backend URL names the vLLM Service and port; model and image limits agree."""
    objects = render("overlays/vllm-server")
    args = worker_container(one(objects, "Deployment", "vllm"))["args"]
    served = args[args.index("--served-model-name") + 1]
    image_limit = yaml.safe_load(args[args.index("--limit-mm-per-prompt") + 1])["image"]
    service = one(objects, "Service", "vllm")
    for stage in (names.VERA, names.VLM):
        env = plain_env(objects, stage)
        assert env["ROADSTREAM_VLM__BACKEND"] == "openai"
        url = urlsplit(env["ROADSTREAM_VLM__BASE_URL"])
        assert (url.hostname, url.port) == ("vllm", service["spec"]["ports"][0]["port"])
        assert env["ROADSTREAM_VLM__MODEL"] == served
        assert int(env["ROADSTREAM_VLM__MAX_IMAGES"]) <= image_limit


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_serve_probes_and_metrics_on_the_configured_port(overlay: str) -> None:
    """Liveness on /live, readiness on /ready, scraped /metrics: all on the metrics port."""
    objects = render(overlay)
    port = int(settings_map(objects)["ROADSTREAM_WORKER__METRICS_PORT"])
    for stage in names.STAGES:
        deployment = stage_deployment(objects, stage)
        container = worker_container(deployment)
        assert [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"] == [port]
        assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_in_manifests_are_real_settings_with_valid_values(overlay: str) -> None:
    """Every ROADSTREAM_… name is a field of Settings, and each stage's values validate."""
    objects = render(overlay)
    for stage in names.STAGES:
        env = plain_env(objects, stage)
        assert unknown_settings(env) == [], stage
        load_settings(environ=env)  # raises ConfigError naming a bad value


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_url_and_scaler_credentials_come_from_the_secret(overlay: str) -> None:
    """Workers read ROADSTREAM_REDIS_URL from the Secret; KEDA's auth names its keys."""
    objects = render(overlay)
    secret = secret_data(objects)
    for stage in names.STAGES:
        env = {e["name"]: e for e in worker_container(stage_deployment(objects, stage))["env"]}
        assert env["ROADSTREAM_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "roadstream-redis",
            "key": "url",
        }
    auth = one(objects, "TriggerAuthentication", "roadstream-redis")
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == "roadstream-redis" and ref["key"] in secret
    url = urlsplit(secret["url"])
    assert (url.username, url.password) == (secret["username"], secret["password"])
    assert f"{url.hostname}:{url.port}" == secret["address"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_stage_is_scaled_by_one_scaled_object_on_its_own_input(overlay: str) -> None:
    """Streams scaler on the stage's stream and group (single hops), Prometheus lag otherwise."""
    objects = render(overlay)
    namespace = settings_map(objects)["ROADSTREAM_NAMESPACE"]
    by_stage: dict[str, dict[str, Any]] = {}
    for scaler in find(objects, "ScaledObject"):
        target = one(objects, "Deployment", scaler["spec"]["scaleTargetRef"]["name"])
        stage = target["metadata"]["labels"].get(STAGE_LABEL)
        if stage is None:
            continue  # the vLLM server's own scaler
        assert stage not in by_stage, f"two ScaledObjects for {stage}"
        by_stage[stage] = scaler
        spec = scaler["spec"]
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        (hop, *_) = names.STAGE_INPUTS[stage]
        if hop in names.PARTITIONED_HOPS:
            check_lag_query(spec, stage, int(settings_map(objects)[PARTITION_SETTING[stage]]))
        else:
            check_streams_triggers(spec, stage, names.stream_name(hop, ns=namespace), overlay)
    assert set(by_stage) == set(names.STAGES)


def check_streams_triggers(spec: dict[str, Any], stage: str, stream: str, overlay: str) -> None:
    """Redis Streams triggers: the stage's stream and group, lagCount among them, TLS as the URL."""
    triggers = spec["triggers"]
    kind = "redis-cluster-streams" if overlay.endswith("redis-cluster") else "redis-streams"
    assert {t["type"] for t in triggers} == {kind}
    for trigger in triggers:
        assert (trigger["metadata"]["stream"], trigger["metadata"]["consumerGroup"]) == (stream, stage)
        assert trigger["authenticationRef"]["name"] == "roadstream-redis"
        assert trigger["metadata"]["enableTLS"] == ("true" if overlay.endswith("external-redis") else "false")
    assert any(int(t["metadata"].get("lagCount", 0)) > 0 for t in triggers)


def check_lag_query(spec: dict[str, Any], stage: str, partitions: int) -> None:
    """Prometheus trigger on the group's summed lag; never more replicas than partitions."""
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert f'roadstream_group_lag{{group="{stage}"}}' in trigger["metadata"]["query"]
    assert trigger["metadata"]["query"].startswith("sum(")
    assert 1 <= spec["minReplicaCount"] and spec["maxReplicaCount"] <= partitions


def test_lag_queries_use_the_metric_the_workers_export() -> None:
    """The runtime's gauge is the one the queries name, labelled by group and stream."""
    assert metrics.GROUP_LAG._name == "roadstream_group_lag"
    assert {"group", "stream"} <= set(metrics.GROUP_LAG._labelnames)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_a_disruption_budget(overlay: str) -> None:
    """Each Deployment and StatefulSet is selected by exactly one PodDisruptionBudget."""
    objects = render(overlay)
    budgets = find(objects, "PodDisruptionBudget")
    for workload in find(objects, "Deployment") + find(objects, "StatefulSet"):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, workload["metadata"]["name"]


def test_external_redis_overlay_drops_the_in_cluster_redis() -> None:
    """With an external Redis there is no StatefulSet, and the URL is TLS."""
    objects = render("overlays/external-redis")
    assert find(objects, "StatefulSet") == [] and find(objects, "Service", "redis") == []
    assert secret_data(objects)["url"].startswith("rediss://")
    assert "users.acl" not in secret_data(objects)


def test_redis_cluster_overlay_replaces_the_redis_by_six_cluster_nodes_with_replica_acks() -> None:
    """Six AOF, noeviction cluster nodes, a Job that joins them with a replica each, the
    URL a cluster URL, outputs waited on a replica, and KEDA's cluster scaler."""
    objects = render("overlays/redis-cluster")
    assert find(objects, "StatefulSet", "redis") == [] and find(objects, "Service", "redis") == []
    assert one(objects, "StatefulSet", "redis-cluster")["spec"]["replicas"] == 6
    conf = [line.strip() for line in one(objects, "ConfigMap", "redis-cluster-config")["data"]["redis.conf"].splitlines()]
    assert {"cluster-enabled yes", "appendonly yes", "maxmemory-policy noeviction"} <= set(conf)
    job = one(objects, "Job", "redis-cluster-create")["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "--cluster create" in job and "--cluster-replicas 1" in job and "0 1 2 3 4 5" in job
    assert secret_data(objects)["url"].startswith("redis+cluster://")
    assert load_settings(environ=settings_map(objects)).broker.replica_acks == 1
    auth = one(objects, "TriggerAuthentication", "roadstream-redis")["spec"]["secretTargetRef"]
    assert auth[0]["parameter"] == "addresses"


@pytest.mark.redis
@pytest.mark.skipif(REDIS_SERVER is None or shutil.which("redis-cli") is None, reason="needs redis-server and redis-cli")
async def test_redis_cluster_overlay_config_and_secret_form_a_cluster_the_workers_use(tmp_path: Path) -> None:
    """The overlay's redis.conf, ACL and replication auth on six local nodes: the replicas
    sync (masterauth works), and a broker on the Secret's URL publishes and reads."""
    from redis_servers import RedisClusterServers

    from brokers.connect import connect

    objects = render("overlays/redis-cluster")
    secret = secret_data(objects)
    acl = tmp_path / "users.acl"
    acl.write_text(secret["users.acl"])
    local_only = ("dir ", "aclfile ", "include ", "cluster-config-file ")
    conf = [line for line in one(objects, "ConfigMap", "redis-cluster-config")["data"]["redis.conf"].splitlines()
            if line.strip() and not line.strip().startswith(("#", *local_only))]  # fmt: skip
    conf += [*secret["replication.conf"].splitlines(), "cluster-announce-hostname 127.0.0.1"]
    with RedisClusterServers(tmp_path / "cluster", acl_file=acl, username=secret["username"],
                             password=secret["password"], extra_config=conf) as cluster:  # fmt: skip
        cluster.start()
        url = urlsplit(secret["url"])
        local = f"{url.scheme}://{url.username}:{url.password}@127.0.0.1:{cluster.nodes[0].port}"
        broker, blobs = connect(local, namespace="rs")
        stream = names.stream_name(names.FRAMES, 3, "rs")
        await broker.publish(stream, b"x", dedupe_key="k")
        entries = await broker.read("detect", "c", [stream], count=10, block_ms=0)
        await broker.close()
        await blobs.close()
    assert [e.data for e in entries] == [b"x"]


# -- the in-cluster Redis, for real ----------------------------------------------------


def redis_conf_lines(objects: tuple[dict[str, Any], ...]) -> list[str]:
    """The redis.conf of the StatefulSet, line by line."""
    text = one(objects, "ConfigMap", "redis-config")["data"]["redis.conf"]
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_in_cluster_redis_keeps_an_aof_on_its_volume_and_never_evicts() -> None:
    """AOF on, noeviction, and the data dir is the PVC the StatefulSet mounts."""
    objects = render("base")
    conf = redis_conf_lines(objects)
    assert "appendonly yes" in conf and "maxmemory-policy noeviction" in conf
    statefulset = one(objects, "StatefulSet", "redis")
    mounts = {m["name"]: m["mountPath"] for m in worker_container(statefulset)["volumeMounts"]}
    claims = [c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]]
    data_dir = next(line.split()[1] for line in conf if line.startswith("dir "))
    assert [name for name, path in mounts.items() if path == data_dir] == claims


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_in_cluster_redis_config_and_acl_accept_the_worker_url_only(tmp_path: Path) -> None:
    """A real redis-server with the rendered redis.conf and users.acl: the Secret's URL works,
    no password is refused, and the user is held to the deployment's key namespace."""
    # Given the rendered config, with the pod's paths swapped for the test's
    objects = render("base")
    secret = secret_data(objects)
    acl = tmp_path / "users.acl"
    acl.write_text(secret["users.acl"])
    conf = [line for line in redis_conf_lines(objects) if not line.startswith(("dir ", "aclfile "))]
    server = RedisServer(
        tmp_path / "redis",
        password=secret["password"],
        username=secret["username"],
        acl_file=acl,
        extra_config=conf,
    )
    with server:
        namespace = settings_map(objects)["ROADSTREAM_NAMESPACE"]
        url = urlsplit(secret["url"])
        local = url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{server.port}").geturl()
        with redis.Redis.from_url(local, decode_responses=True) as client:
            # Then the worker URL reads and writes its namespace, and AOF is on
            assert client.xadd(f"{namespace}:jobs", {"k": "v"})
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.set("elsewhere", "x")
        with (
            pytest.raises(redis.exceptions.AuthenticationError),
            redis.Redis(port=server.port, retry=Retry(NoBackoff(), 0)) as anon,
        ):
            anon.ping()


# -- compose and Dockerfiles -----------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    """deploy/compose.yaml, anchors and merge keys resolved."""
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def dockerfile(path: Path) -> str:
    """A Dockerfile's text with line continuations joined."""
    return path.read_text().replace("\\\n", " ")


def test_compose_brings_up_redis_with_aof_vllm_and_every_stage() -> None:
    """Services for Redis (AOF, noeviction), vLLM and each stage; dependencies exist."""
    services = compose()["services"]
    assert {"redis", "vllm", *names.STAGES} <= services.keys()
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "/data" in " ".join(services["redis"]["volumes"])
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= services.keys(), name


def test_compose_stages_run_their_worker_against_the_redis_service() -> None:
    """``roadstream worker STAGE --redis redis://redis:6379`` from the right image."""
    services = compose()["services"]
    for stage in names.STAGES:
        service = services[stage]
        assert service["command"] == [stage, "--redis", "redis://redis:6379"]
        assert parses_as_worker_command(service["command"]) == stage
        wanted = "Dockerfile.gpu" if stage in GPU_STAGES else "Dockerfile.cpu"
        assert Path(service["build"]["dockerfile"]).name == wanted
        path = (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve()
        assert 'ENTRYPOINT ["roadstream", "worker"]' in dockerfile(path)
        assert unknown_settings(service["environment"]) == [], stage
        load_settings(environ=service["environment"])


def test_compose_gives_gpus_to_detect_and_vllm_and_points_vlm_stages_at_it() -> None:
    """GPU reservations where models run; vera/vlm use the OpenAI backend on the vllm service."""
    services = compose()["services"]
    for name in ("detect", "vllm"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    command = services["vllm"]["command"]
    model = command[command.index("--model") + 1]
    image_limit = yaml.safe_load(command[command.index("--limit-mm-per-prompt") + 1])["image"]
    for stage in (names.VERA, names.VLM):
        env = services[stage]["environment"]
        assert env["ROADSTREAM_VLM__BACKEND"] == "openai"
        assert urlsplit(env["ROADSTREAM_VLM__BASE_URL"]).hostname == "vllm"
        assert env["ROADSTREAM_VLM__MODEL"] == model
        assert int(env["ROADSTREAM_VLM__MAX_IMAGES"]) <= image_limit
        assert "vllm" in services[stage]["depends_on"]


@pytest.mark.parametrize(
    ("name", "extras"), [("Dockerfile.cpu", set()), ("Dockerfile.gpu", {"detect", "vlm", "scorer"})]
)
def test_dockerfiles_copy_existing_paths_and_install_real_extras(name: str, extras: set[str]) -> None:
    """Every COPY source is in the repo; the image installs the package with the extras it needs."""
    text = dockerfile(DEPLOY / "docker" / name)
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.MULTILINE):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repository"
    (spec,) = re.findall(r"pip install \"?\.(\[[^\]]*\])?\"?", text)
    assert set(filter(None, spec.strip("[]").split(","))) == extras
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extras <= set(project.get("optional-dependencies", {}))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_in_pods_open_the_metrics_port_beyond_loopback(overlay: str) -> None:
    """Probes and Prometheus reach the pod's IP: the workers' default (127.0.0.1) is lifted."""
    objects = render(overlay)
    for stage in names.STAGES:
        env = plain_env(objects, stage)
        assert load_settings(environ=env).worker.metrics_host == "0.0.0.0", stage


def test_compose_workers_open_the_metrics_port_beyond_loopback() -> None:
    services = compose()["services"]
    for stage in names.STAGES:
        env = services[stage]["environment"]
        assert env["ROADSTREAM_WORKER__METRICS_HOST"] == "0.0.0.0", stage


def compose_merged(*files: str) -> dict[str, Any]:
    """Compose files merged as ``docker compose -f A -f B`` does for what ours use: maps
    merged key by key, ``ports``/``volumes`` lists added to, other values replaced."""

    def merge(base: Any, over: Any, key: str = "") -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {k: merge(base.get(k), v, k) if k in base else v for k, v in over.items()} | {
                k: v for k, v in base.items() if k not in over
            }
        if isinstance(base, list) and isinstance(over, list) and key in ("ports", "volumes"):
            return base + [item for item in over if item not in base]
        return over

    merged: dict[str, Any] = {}
    for name in files:
        merged = merge(merged, yaml.safe_load((DEPLOY / name).read_text()))
    return merged


def test_compose_cluster_file_runs_every_stage_on_a_six_node_cluster() -> None:
    """compose.yaml + compose.cluster.yaml: six AOF, noeviction cluster nodes on volumes of
    their own, joined with a replica each before any worker starts; the workers on the
    cluster URL with replica acks."""
    merged = compose_merged("compose.yaml", "compose.cluster.yaml")
    services = merged["services"]
    nodes = ["redis", *(f"redis-{i}" for i in range(2, 7))]
    for node in nodes:
        command = services[node]["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
        assert command[command.index("--appendonly") + 1] == "yes"
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    volumes = [services[n]["volumes"][-1].split(":")[0] for n in nodes]
    assert len(set(volumes)) == 6 and set(volumes) <= merged["volumes"].keys()
    create = services["redis-cluster-create"]
    assert set(create["depends_on"]) == set(nodes)
    script = create["entrypoint"][-1]
    assert "--cluster-replicas 1" in script and all(n in script for n in nodes)
    for stage in names.STAGES:
        service = services[stage]
        assert service["command"] == [stage, "--redis", "redis+cluster://redis:6379"]
        assert parses_as_worker_command(service["command"]) == stage
        assert service["depends_on"]["redis-cluster-create"] == {"condition": "service_completed_successfully"}
        environment = {k: _compose_default(str(v)) for k, v in service["environment"].items()}
        assert unknown_settings(environment) == [], stage
        assert load_settings(environ=environment).broker.replica_acks == 1
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= services.keys(), name


def _compose_default(value: str) -> str:
    """``${NAME:-default}`` as compose resolves it when NAME is unset."""
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return match.group(1) if match else value


@pytest.mark.parametrize("where", ["compose", *OVERLAYS])
def test_detect_runs_the_shipped_models_in_every_deployment(where: str) -> None:
    # Given the detect stage's environment in compose and each kustomize overlay
    if where == "compose":
        env = {k: _compose_default(str(v)) for k, v in compose()["services"]["detect"]["environment"].items()}
    else:
        objects = render(where)
        env = plain_env(objects, names.DETECT)
    # When its settings are read and the shipped models resolved
    detect = shipped.resolve(load_settings(environ=env).detect)
    # Then the detector and the scorer are the files shipped in the package
    assert Path(detect.model) == shipped.DETECTOR and Path(detect.scorer) == shipped.SCORER
    assert not detect.allow_random_weights
