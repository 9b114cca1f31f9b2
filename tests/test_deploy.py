"""deploy/: the container build file and the Kubernetes manifests, checked without a cluster or an engine.

No cluster and no container engine are available here, so what can be checked is checked offline: every
Kubernetes object against the Kubernetes JSON schemas that kubernetes-validate bundles (strict: a misspelt
field fails), the PodMonitor against the Prometheus Operator's CRD schema (vendored in tests/schemas/), and
the cross-references a typo would break without any schema noticing: the ConfigMaps' configs load with
expertd's own parser, and the probes, mounts, Secret, grace periods and the Containerfile's ENTRYPOINT agree
with them. The socket layout the manifests rely on (a socket directory expertd creates under a sticky
tmpfs, as a memory emptyDir is) is started for real.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from expertd.client import Client
from expertd.config import load_config
from expertd.errors import ConfigError

from conftest import EXAMPLES, Daemon, run_expertd, write_config
from users import as_user, local_user, needs_root

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
CONTAINERFILE = DEPLOY / "Containerfile"
PODMONITOR_SCHEMA = Path(__file__).resolve().parent / "schemas" / "podmonitor-v0.93.0.yaml"
# 1.29: the oldest Kubernetes the manifests claim (native sidecars); and the newest schemas bundled.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Seconds the pod's grace period keeps beyond preStop + graceful_timeout, for the kubelet's own signalling.
GRACE_MARGIN = 5
CONFIG_DIR = "/etc/expertd"  # where the ConfigMap is mounted, and the ENTRYPOINT's --config's directory
TOKEN = "t" * 32


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


MANIFESTS = sorted(KUBERNETES.glob("*.yaml"))
OBJECTS = [(path.name, doc) for path in MANIFESTS for doc in _documents(path)]
BUILTIN = [(name, doc) for name, doc in OBJECTS if doc["apiVersion"] != "monitoring.coreos.com/v1"]
DEPLOYMENTS = {path.name: doc for path in MANIFESTS for doc in _documents(path) if doc["kind"] == "Deployment"}


def _object_id(item: tuple[str, dict]) -> str:
    return f"{item[0]}:{item[1]['kind']}/{item[1]['metadata']['name']}"


def test_the_manifests_hold_both_shapes_and_the_podmonitor():
    kinds = sorted((name, doc["kind"]) for name, doc in OBJECTS)
    assert kinds == [("podmonitor.yaml", "PodMonitor"),
                     ("service.yaml", "ConfigMap"), ("service.yaml", "Deployment"),
                     ("service.yaml", "PodDisruptionBudget"), ("service.yaml", "Service"),
                     ("sidecar.yaml", "ConfigMap"), ("sidecar.yaml", "Deployment")]


# ------------------------------------------------------------------------------------------------ schemas
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("item", BUILTIN, ids=_object_id)
def test_every_kubernetes_object_validates_against_the_kubernetes_schemas(item, version):
    kubernetes_validate.validate(item[1], version, strict=True)


def test_a_misspelt_field_fails_the_kubernetes_schemas():
    """The check above would catch a typo: strict mode refuses a field the schema does not know."""
    deployment = copy.deepcopy(DEPLOYMENTS["service.yaml"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriodSecond"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def _strict(schema: object) -> object:
    """The CRD's schema, with unknown fields refused where it lists the fields (as kubectl's strict validation)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if ("properties" in strict and "additionalProperties" not in strict
            and not strict.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


def _podmonitor_validator() -> jsonschema.Draft4Validator:
    # OpenAPI v3's schema objects are close to JSON Schema draft 4 (what the API server's validation follows).
    return jsonschema.Draft4Validator(_strict(yaml.safe_load(PODMONITOR_SCHEMA.read_text())))


def test_the_podmonitor_validates_against_the_prometheus_operators_crd():
    [podmonitor] = [doc for _, doc in OBJECTS if doc["kind"] == "PodMonitor"]
    errors = [f"{'.'.join(map(str, error.path))}: {error.message}"
              for error in _podmonitor_validator().iter_errors(podmonitor)]
    assert errors == []


def test_a_misspelt_podmonitor_field_fails_the_crd_schema():
    [podmonitor] = [copy.deepcopy(doc) for _, doc in OBJECTS if doc["kind"] == "PodMonitor"]
    podmonitor["spec"]["podMetricsEndpoints"][0]["scrapeInterval"] = "30s"
    assert not _podmonitor_validator().is_valid(podmonitor)


def test_the_podmonitor_scrapes_the_named_port_of_both_shapes():
    [podmonitor] = [doc for _, doc in OBJECTS if doc["kind"] == "PodMonitor"]
    selector = podmonitor["spec"]["selector"]["matchLabels"]
    [endpoint] = podmonitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    for name, deployment in DEPLOYMENTS.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
        assert endpoint["port"] in {port["name"] for port in _expertd_container(deployment)["ports"]}, name


# ------------------------------------------------------------------------------- the configs in the pods
def _pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def _containers(deployment: dict) -> list[dict]:
    pod = _pod(deployment)
    return pod.get("initContainers", []) + pod["containers"]


def _expertd_container(deployment: dict) -> dict:
    [container] = [c for c in _containers(deployment) if c["name"] == "expertd"]
    return container


def _mounts(container: dict) -> dict[str, dict]:
    """mountPath -> the volumeMount."""
    return {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}


def _volume(deployment: dict, name: str) -> dict:
    [volume] = [v for v in _pod(deployment)["volumes"] if v["name"] == name]
    return volume


def _config_text(manifest: str) -> str:
    """The expertd.conf the Deployment's expertd container finds at the ENTRYPOINT's path (its ConfigMap)."""
    deployment = DEPLOYMENTS[manifest]
    mount = _mounts(_expertd_container(deployment))[CONFIG_DIR]
    config_map_name = _volume(deployment, mount["name"])["configMap"]["name"]
    [config_map] = [doc for name, doc in OBJECTS if doc["kind"] == "ConfigMap"
                    and doc["metadata"]["name"] == config_map_name and name == manifest]
    return config_map["data"]["expertd.conf"]


def _raw_setting(text: str, key: str) -> str:
    [value] = re.findall(rf"^{key}\s*=\s*(.*)$", text, re.MULTILINE)
    return value.strip()


def _load(text: str, directory: Path, **replace: str):
    """load_config on the text, with settings that name files of the pod (the token) pointed at local ones."""
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    replace.setdefault("token_file", str(token_file))
    for key, value in replace.items():
        text = re.sub(rf"^{key}\s*=.*$", f"{key} = {value}", text, count=1, flags=re.MULTILINE)
    path = directory / "expertd.conf"
    path.write_text(text)
    return load_config(str(path))


@pytest.fixture(params=sorted(DEPLOYMENTS))
def shape(request, tmp_path):
    """(manifest name, Deployment, its expertd container, its config as expertd loads it)."""
    deployment = DEPLOYMENTS[request.param]
    return request.param, deployment, _expertd_container(deployment), _load(_config_text(request.param), tmp_path)


def test_each_configmaps_config_loads_with_expertds_own_parser(shape):
    name, _, _, config = shape
    assert config.http_listen is not None and config.token == TOKEN, name
    assert set(config.experts) >= {"fib", "square"}


def test_a_configmap_config_with_a_misspelt_key_fails_to_load(tmp_path):
    text = _config_text("service.yaml").replace("graceful_timeout", "graceful_timeuot")
    with pytest.raises(ConfigError, match="graceful_timeuot: unknown setting"):
        _load(text, tmp_path)


def _pre_stop_seconds(container: dict) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def test_the_grace_period_outlasts_the_prestop_sleep_and_graceful_timeout_with_a_margin(shape):
    name, deployment, container, config = shape
    grace = _pod(deployment)["terminationGracePeriodSeconds"]
    assert config.graceful_timeout + _pre_stop_seconds(container) <= grace - GRACE_MARGIN, name


def test_the_probes_ask_health_on_the_port_http_listen_names_without_the_token(shape):
    name, _, container, config = shape
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    host, port = config.http_listen
    assert host == "0.0.0.0", f"{name}: the kubelet probes the pod's IP"
    assert config.public_health, f"{name}: probes carry no token"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], ports.get(get["port"], get["port"])) == ("/health", port), (name, probe)


def test_the_startup_probe_waits_as_long_as_expertd_may_take_to_start(shape):
    name, _, container, config = shape
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= config.reload_timeout + config.boot_timeout, name


def test_the_token_file_is_the_mounted_secrets_key(shape):
    name, deployment, container, _ = shape
    token_file = PurePosixPath(_raw_setting(_config_text(name), "token_file"))
    mount = _mounts(container)[str(token_file.parent)]
    secret = _volume(deployment, mount["name"])["secret"]
    assert "subPath" not in mount, f"{name}: a subPath mount never sees the Secret's updates"
    assert {item["path"]: item["key"] for item in secret["items"]}[token_file.name] == "token", name
    assert secret["secretName"] == "expertd-token"


def test_every_directory_expertd_writes_is_a_writable_volume_under_the_read_only_root(shape):
    name, _, container, config = shape
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {path for path, mount in _mounts(container).items() if not mount.get("readOnly")}
    for directory in (os.path.dirname(config.socket), config.model_cache, "/tmp"):
        assert any(directory == path or directory.startswith(path + "/") for path in writable), (name, directory)


def test_the_socket_is_in_a_directory_expertd_creates_on_a_memory_emptydir(shape):
    """A memory emptyDir is a sticky tmpfs (accepted above the socket); a disk one (mode 0777) would be refused."""
    name, deployment, container, config = shape
    socket_directory = PurePosixPath(config.socket).parent
    mount = _mounts(container)[str(socket_directory.parent)]
    assert _volume(deployment, mount["name"])["emptyDir"]["medium"] == "Memory", name


def test_the_sidecars_application_mounts_the_socket_where_expertd_creates_it():
    deployment = DEPLOYMENTS["sidecar.yaml"]
    config_text = _config_text("sidecar.yaml")
    socket = _raw_setting(config_text, "socket")
    expertd = _expertd_container(deployment)
    [app] = [c for c in _containers(deployment) if c["name"] != "expertd"]
    expertd_mount = _mounts(expertd)[str(PurePosixPath(socket).parent.parent)]
    app_mount = _mounts(app)[str(PurePosixPath(socket).parent.parent)]
    assert app_mount["name"] == expertd_mount["name"]
    assert {env["name"]: env["value"] for env in app["env"]}["EXPERTD_SOCKET"] == socket
    # The application reaches the socket through the group both containers share: the pod's fsGroup.
    assert int(_raw_setting(config_text, "socket_group")) == _pod(deployment)["securityContext"]["fsGroup"]
    assert app["securityContext"]["runAsUser"] != expertd["securityContext"]["runAsUser"]
    assert expertd["restartPolicy"] == "Always", "a native sidecar: started before the app, stopped after it"
    assert "startupProbe" in expertd, "the application starts once expertd's startupProbe passes"


@pytest.mark.parametrize("manifest", sorted(DEPLOYMENTS))
def test_every_container_runs_as_a_non_root_user_with_a_tight_security_context(manifest):
    deployment = DEPLOYMENTS[manifest]
    pod_context = _pod(deployment).get("securityContext", {})
    assert pod_context["runAsNonRoot"] is True
    assert pod_context["seccompProfile"]["type"] == "RuntimeDefault"
    for container in _containers(deployment):
        context = {**pod_context, **container["securityContext"]}
        assert context["runAsNonRoot"] is True, container["name"]
        assert context.get("runAsUser", 10001) != 0, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in context["capabilities"], container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]


def test_the_service_routes_to_the_http_port_and_a_disruption_budget_keeps_one_replica():
    objects = {doc["kind"]: doc for name, doc in OBJECTS if name == "service.yaml"}
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] == "expertd-http"
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= objects["PodDisruptionBudget"]["spec"]["minAvailable"] < deployment["spec"]["replicas"]


# ----------------------------------------------------------------------------------------- Containerfile
def _stages() -> list[list[tuple[str, str]]]:
    """The Containerfile's stages, each a list of (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def _final_stage() -> list[tuple[str, str]]:
    return _stages()[-1]


def test_the_containerfile_builds_in_one_stage_and_runs_from_a_slim_one():
    stages = _stages()
    assert len(stages) == 2
    assert stages[0][0][1].endswith(" AS build")
    assert "-slim" in _final_stage()[0][1]


def test_both_stages_are_the_same_python_so_that_the_venv_runs_where_it_is_copied():
    build, runtime = (stage[0][1].split()[0] for stage in _stages())
    assert build.replace("-${DEBIAN}", "") == runtime.replace("-slim-${DEBIAN}", "")
    assert "${PYTHON_VERSION}" in build and "${DEBIAN}" in build and "${DEBIAN}" in runtime


def test_the_final_stage_runs_as_a_fixed_non_root_user():
    users = [arguments for instruction, arguments in _final_stage() if instruction == "USER"]
    assert users, "no USER: the image would run as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) != 0, "numeric, so that runAsNonRoot can verify it"
    for deployment in DEPLOYMENTS.values():
        assert _pod(deployment)["securityContext"]["fsGroup"] == int(group)
        assert {**_pod(deployment)["securityContext"], **_expertd_container(deployment)["securityContext"]
                }.get("runAsUser", int(user)) == int(user)


def test_the_final_stage_copies_only_the_venv_the_experts_and_the_config():
    copies = [shlex.split(arguments) for instruction, arguments in _final_stage() if instruction in ("COPY", "ADD")]
    assert all(instruction != "ADD" for instruction, _ in _final_stage())
    built = sorted(tuple(args[1:]) for args in copies if args[0] == "--from=build")
    assert built == [("/opt/expertd", "/opt/expertd"), ("/srv/experts", "/srv/experts")]
    from_context = [args for args in copies if not args[0].startswith("--from=")]
    assert from_context == [["deploy/expertd.conf", f"{CONFIG_DIR}/expertd.conf"]]


def test_the_final_stage_installs_no_compiler_nor_package():
    runs = " ".join(arguments for instruction, arguments in _final_stage() if instruction == "RUN")
    for word in ("apt-get", "apt ", "pip", "gcc", "g++", "build-essential", "make", "dev "):
        assert word not in runs, word


def test_the_entrypoint_reads_the_config_where_the_configmap_is_mounted():
    [entrypoint] = [json.loads(arguments) for instruction, arguments in _final_stage() if instruction == "ENTRYPOINT"]
    [command] = [json.loads(arguments) for instruction, arguments in _final_stage() if instruction == "CMD"]
    # expertd is the command and the config its default arguments, so that `docker run IMAGE ARGS` (Firefly's
    # form: -b ... funcs.square) replaces the config rather than adds to it (expertd refuses both at once).
    assert entrypoint == ["/opt/expertd/bin/expertd"]
    assert command == ["--config", f"{CONFIG_DIR}/expertd.conf"]
    for name, deployment in DEPLOYMENTS.items():
        mount = _mounts(_expertd_container(deployment))[CONFIG_DIR]
        assert mount.get("readOnly") is True and "subPath" not in mount, name
        assert "items" not in _volume(deployment, mount["name"])["configMap"], f"{name}: keys are file names"
        assert _config_text(name).startswith("[expertd]")  # (the ConfigMap's key expertd.conf, under that mount)
        assert "command" not in _expertd_container(deployment), f"{name}: the image's ENTRYPOINT is what runs"
    assert ("STOPSIGNAL", "SIGTERM") in _final_stage()


def test_the_venv_is_made_at_the_path_the_entrypoint_runs():
    build = " ".join(arguments for instruction, arguments in _stages()[0] if instruction == "RUN")
    assert "python -m venv /opt/expertd" in build
    assert '"${EXPERTS}"' in build or "${EXPERTS}" in build
    assert "requirements.txt" in build, "the experts' own requirements"


def test_the_images_own_config_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTD_TOKEN", TOKEN)
    config = load_config(str(DEPLOY / "expertd.conf"))
    assert config.token == TOKEN and config.http_listen == ("0.0.0.0", 8000)
    assert config.socket == "/run/expertd/socket/expertd.sock"
    environment = [arguments for instruction, arguments in _final_stage() if instruction == "ENV"]
    assert f"EXPERTD_SOCKET={config.socket}" in " ".join(environment), "kubectl exec ... expertctl finds it"
    assert ("EXPOSE", str(config.http_listen[1])) in _final_stage()


def test_the_build_context_leaves_out_venvs_caches_and_the_history():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "bench/.venv-firefly", "bench/models", "**/__pycache__"} <= ignored


# ----------------------------------------------------------------------------- the socket layout, for real
def _call_fib_as(uid: int, gid: int, groups: tuple[int, ...], socket: Path) -> str:
    client = Client(str(socket))  # (made before the fork: the child keeps what root imported)
    return as_user(uid, gid, lambda: client.call("fib", 5), groups=groups)


@needs_root
def test_the_sidecars_socket_layout_serves_the_application_through_the_pods_group(short_dir):
    """The pod, for real but for the kubelet: a memory emptyDir's root, expertd's own directory under it, the
    socket given the fsGroup, and an application of another uid that has the fsGroup as a supplementary group.
    """
    _, fs_group = local_user("xd-alice")  # (any group that is not the application's own)
    app_uid, app_gid = local_user("xd-bob")
    shared = short_dir / "run"
    shared.mkdir()
    os.chown(shared, 0, fs_group)
    os.chmod(shared, 0o3777)  # a memory emptyDir with fsGroup: root's, sticky, setgid, writable by all
    os.chmod(short_dir, 0o755)
    socket = shared / "socket" / "expertd.sock"
    config = write_config(short_dir, {"fib": "fibs:fib"}, socket_group=fs_group, socket_mode="0660")
    daemon = Daemon(config, socket, workers=1).start()
    try:
        assert _call_fib_as(app_uid, app_gid, (app_gid, fs_group), socket) == "8"
        # Without the pod's group the socket's mode keeps the caller out: the group is what lets it in.
        assert "ConnectError: permission denied" in _call_fib_as(app_uid, app_gid, (app_gid,), socket)
        assert stat.S_IMODE(os.lstat(shared / "socket").st_mode) & 0o022 == 0
    finally:
        daemon.stop()


def test_a_socket_under_a_disk_emptydir_is_refused_with_one_line(short_dir):
    """A disk emptyDir's root (mode 0777, not sticky): whoever can write it could swap the socket."""
    shared = short_dir / "run"
    shared.mkdir()
    os.chmod(shared, 0o2777)
    config = write_config(short_dir, {"fib": "fibs:fib"})
    done = run_expertd("--config", str(config), "--socket", str(shared / "socket" / "expertd.sock"))
    assert done.returncode != 0
    assert f"{shared} is writable by every user" in done.stderr


# ------------------------------------------------------------------------------------------ expertd --check
@pytest.mark.parametrize("manifest", sorted(DEPLOYMENTS))
def test_expertd_check_passes_on_the_deploy_config_with_the_shipped_examples(manifest, tmp_path):
    """What a deploy runs: the ConfigMap's config and the experts the image carries (examples/ by default)."""
    text = _config_text(manifest)
    _load(text, tmp_path, pythonpath=str(EXAMPLES), model_cache=str(tmp_path / "models"))
    done = run_expertd("--config", str(tmp_path / "expertd.conf"), "--check", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "OK, 4 experts" in done.stderr + done.stdout
