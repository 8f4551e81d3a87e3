"""Offline checks of everything under cluster/: launcher YAMLs, KubeRay manifests, README commands.

The launcher YAMLs go through Ray's own machinery (the JSON schema shipped in the wheel,
``prepare_config`` and ``validate_config`` as ``ray up`` calls them, and for the local provider the
whole ``_bootstrap_config``), then through the security rules of cluster/README.md. The KubeRay
manifests are checked for the fields KubeRay needs, resource consistency, pinned images, secrets
and exposure. Nothing here needs cloud credentials, a network or a Ray cluster.
"""

from __future__ import annotations

import contextlib
import copy
import io
import ipaddress
import json
import os
import re
import shlex
import tomllib
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = ("aws", "gcp", "local")
CLOUDS = ("aws", "gcp")
KUBERAY_CLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
KUBERAY_JOB = CLUSTER / "kuberay" / "rayjob.yaml"
AWS_SG_TEMPLATE = CLUSTER / "aws-security-group.cfn.yaml"

# Ports that must never be reachable from the internet: dashboard/job API, GCS, Ray client.
SENSITIVE_PORTS = (8265, 6379, 10001)
WORLD = ("0.0.0.0/0", "::/0")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# helpers


def load(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def launcher(name: str) -> dict:
    return load(CLUSTER / f"{name}.yaml")


def prepared(name: str) -> dict:
    """The config as `ray up` sees it after merging Ray's provider defaults."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(launcher(name)))


def pyproject_requirements() -> dict[str, Requirement]:
    with open(REPO / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {r.name.lower(): r for r in reqs}


def ray_start_invocations(commands: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """Every `ray start` in a list of shell command strings, as (env assignments, argv after
    `start`). Env assignments count when they prefix the command or are exported earlier in the
    same string."""
    found = []
    for command in commands:
        exported: dict[str, str] = {}
        for segment in re.split(r";|&&|\|\|", command):
            tokens = shlex.split(segment)
            if tokens[:1] == ["export"]:
                exported.update(t.split("=", 1) for t in tokens[1:] if "=" in t)
                continue
            env = dict(exported)
            while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
                key, value = tokens.pop(0).split("=", 1)
                env[key] = value
            if tokens[:2] == ["ray", "start"]:
                found.append((env, tokens[2:]))
    return found


def flag(argv: list[str], name: str) -> str | None:
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def effective_setup(config: dict, node_type: str) -> list[str]:
    """The setup commands Ray runs on a node of this type (after prepare_config): the head runs
    setup_commands + head_setup_commands; a worker type's own worker_setup_commands replace the
    merged global setup_commands + worker_setup_commands."""
    if node_type == config["head_node_type"]:
        return config["head_setup_commands"]
    return config["available_node_types"][node_type].get(
        "worker_setup_commands", config["worker_setup_commands"]
    )


def worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def open_to_world(rule: dict) -> bool:
    cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
    cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
    cidrs += [rule.get("CidrIp"), rule.get("CidrIpv6")]  # CloudFormation's flat form
    return any(c in WORLD for c in cidrs if isinstance(c, str))


def covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if low == -1:
        return True
    return int(low) <= port <= int(high)


def quantity(text) -> Decimal:
    """A Kubernetes resource quantity ("8", "500m", "32Gi", "1e3") as a number of base units."""
    text = str(text).strip()
    binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    decimal = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3,
               "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
    for suffix, factor in binary.items():
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * factor
    if text and text[-1] in decimal:
        return Decimal(text[:-1]) * Decimal(decimal[text[-1]])
    return Decimal(text)


def kuberay_groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group) for the head group and every worker group of a RayCluster spec."""
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return groups


def ray_container(group: dict) -> dict:
    # KubeRay treats the first container of the pod template as the Ray container.
    return group["template"]["spec"]["containers"][0]


def pretrain_cli(argv: list[str], where: str):
    """Parse jobs/pretrain.py arguments the way the job does; a bad flag fails with argparse's words."""
    from lapo_ray.config import PRETRAIN_PRESETS, PretrainConfig
    from lapo_ray.config.cli import parse_config

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            config, _ = parse_config(PretrainConfig, PRETRAIN_PRESETS, argv)
    except SystemExit:
        config = None
    if config is None:
        message = (err.getvalue().strip().splitlines() or ["argparse exited"])[-1]
        pytest.fail(f"{where}: jobs/pretrain.py rejects {shlex.join(argv)}\n  {message}")
    return config


# ----------------------------------------------------------------------------------------------
# launcher YAMLs: Ray's own validation


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_matches_ray_schema(name, ray_schema):
    errors = sorted(jsonschema.Draft7Validator(ray_schema).iter_errors(launcher(name)), key=str)
    assert not errors, f"cluster/{name}.yaml violates ray-schema.json:\n" + "\n".join(
        f"  at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_passes_ray_up_config_checks(name):
    from ray.autoscaler._private.util import validate_config

    config = prepared(name)
    validate_config(config)  # schema again, head_node_type, sum(min_workers) <= max_workers
    assert config["head_node_type"] in config["available_node_types"]
    assert launcher(name).get("idle_timeout_minutes", 0) > 0, f"{name}.yaml: set idle_timeout_minutes"


def test_local_launcher_bootstraps_offline():
    """The local provider needs no cloud API, so Ray's whole `ray up` config path can run here."""
    from ray.autoscaler._private.commands import _bootstrap_config

    config = _bootstrap_config(copy.deepcopy(launcher("local")), no_config_cache=True)
    (node_type,) = config["available_node_types"].values()
    n_ips = len(config["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == n_ips, (
        f"local.yaml: every listed worker should join (min=max={n_ips}), got {node_type}"
    )


# ----------------------------------------------------------------------------------------------
# launcher YAMLs: how Ray is started


@pytest.mark.parametrize("name", LAUNCHERS)
def test_dashboard_listens_on_loopback_only(name):
    config = launcher(name)
    heads = [argv for _, argv in ray_start_invocations(config["head_start_ray_commands"]) if "--head" in argv]
    assert len(heads) == 1, f"{name}.yaml: expected one `ray start --head` in head_start_ray_commands"
    host = flag(heads[0], "--dashboard-host")
    assert host == "127.0.0.1", (
        f"{name}.yaml: the head must start the dashboard with --dashboard-host=127.0.0.1 (reached "
        f"through `ray dashboard`'s SSH tunnel), found {host!r}"
    )
    assert flag(heads[0], "--autoscaling-config") == "~/ray_bootstrap_config.yaml", (
        f"{name}.yaml: without --autoscaling-config=~/ray_bootstrap_config.yaml the head runs no autoscaler"
    )
    everything = json.dumps(config)
    assert "0.0.0.0" not in everything, f"{name}.yaml binds or opens something on 0.0.0.0"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_token_auth_on_every_node(name):
    config = prepared(name)
    starts = ray_start_invocations(config["head_start_ray_commands"])
    starts += ray_start_invocations(config["worker_start_ray_commands"])
    assert len(starts) == 2, f"{name}.yaml: expected one head and one worker `ray start`, got {starts}"
    for env, argv in starts:
        assert env.get("RAY_AUTH_MODE") == "token", (
            f"{name}.yaml: `ray start {' '.join(argv)}` runs without RAY_AUTH_MODE=token; Ray 2.60 "
            "turns token auth on by default only for local ray.init() clusters"
        )
        assert env.get("RAY_TRAIN_ENABLE_STATE_TRACKING") == "1", (
            f"{name}.yaml: `ray start {' '.join(argv)}` leaves the dashboard's Train view empty"
        )
        autoscales = any(t.get("max_workers", 0) > t.get("min_workers", 0)
                         for t in config["available_node_types"].values()) and name != "local"
        assert (env.get("LAPO_AUTOSCALING") == "1") == autoscales, (
            f"{name}.yaml: LAPO_AUTOSCALING=1 belongs on autoscaling clusters only (it lifts lapo_ray's "
            "check that a stage fits the CPUs the cluster has now)"
        )
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", (
        f"{name}.yaml: every node needs the cluster token: mount ~/.ray/auth_token"
    )
    for node_type in config["available_node_types"]:
        setup = "\n".join(effective_setup(config, node_type))
        assert "export RAY_AUTH_MODE=token" in setup and "~/.bashrc" in setup, (
            f"{name}.yaml: node type {node_type!r} does not put RAY_AUTH_MODE=token in ~/.bashrc, so "
            "`ray status` / `ray job` on that node cannot talk to the cluster"
        )


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_node_installs_the_package_and_matching_torch(name):
    config = prepared(name)
    assert config["file_mounts"].get("~/lapo_ray") == ".", (
        f"{name}.yaml: the working tree must be mounted at ~/lapo_ray (`ray up` from the repo root)"
    )
    assert ".gitignore" in config.get("rsync_filter", []), f"{name}.yaml: sync would copy ignored data/"
    torch_spec = str(pyproject_requirements()["torch"].specifier)
    for node_type, spec in config["available_node_types"].items():
        setup = effective_setup(config, node_type)
        installs = [shlex.split(c) for c in setup if c.startswith("pip install")]
        assert any(t[-2:] == ["-e", "~/lapo_ray"] for t in installs), (
            f"{name}.yaml: node type {node_type!r} never runs `pip install -e ~/lapo_ray`: {setup}"
        )
        torch = [t for t in installs if any(a.startswith("torch") for a in t)]
        assert len(torch) == 1, f"{name}.yaml: node type {node_type!r} should install torch once: {setup}"
        (requirement,) = [Requirement(a) for a in torch[0] if a.startswith("torch")]
        assert str(requirement.specifier) == torch_spec, (
            f"{name}.yaml: node type {node_type!r} installs torch{requirement.specifier}, "
            f"pyproject.toml asks for torch{torch_spec}"
        )
        index = flag(torch[0], "--index-url") or ""
        wants_gpu = spec.get("resources", {}).get("GPU", 0) > 0
        assert index.startswith("https://download.pytorch.org/whl/"), (
            f"{name}.yaml: node type {node_type!r} must take torch from the PyTorch index, got {index!r}"
        )
        if wants_gpu:
            assert re.search(r"/whl/cu\d+$", index), f"{name}.yaml: GPU type {node_type!r} needs a CUDA torch: {index}"
        elif name != "local":  # local machines are unknown: CPU by default, with a comment for GPUs
            assert index.endswith("/whl/cpu"), f"{name}.yaml: CPU type {node_type!r} should take the CPU torch: {index}"


# ----------------------------------------------------------------------------------------------
# launcher YAMLs: node types and autoscaling


@pytest.mark.parametrize("name", CLOUDS)
def test_cloud_node_types_and_autoscaling(name):
    raw = launcher(name)
    config = prepared(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, (
        f"{name}.yaml: the head must advertise CPU: 0 so nothing heavy is scheduled on it, got {head['resources']}"
    )
    workers = worker_types(config)
    gpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    cpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) == 0}
    assert gpu_types, f"{name}.yaml: no worker type declares GPU resources (Ray Train needs one)"
    assert cpu_types, f"{name}.yaml: no CPU-only worker type for rollouts and Ray Data"
    for node_type, spec in workers.items():
        lo, hi = spec["min_workers"], spec["max_workers"]
        assert 0 <= lo <= hi, f"{name}.yaml: {node_type}: need 0 <= min_workers ({lo}) <= max_workers ({hi})"
        assert lo == 0 and hi > 0, f"{name}.yaml: {node_type} should autoscale from zero (min 0, max > 0)"
        assert spec["resources"].get("CPU", 0) > 0, f"{name}.yaml: {node_type} must declare its CPUs"
    total = sum(spec["max_workers"] for spec in workers.values())
    assert raw["max_workers"] >= total, (
        f"{name}.yaml: global max_workers {raw['max_workers']} caps the types' sum {total}"
    )


@pytest.mark.parametrize("name", CLOUDS)
def test_cloud_images_pin_the_client_ray_and_python(name):
    config = prepared(name)
    ray_pin = str(pyproject_requirements()["ray"].specifier)
    assert ray_pin == f"=={ray.__version__}", f"pyproject pins ray{ray_pin}, installed is {ray.__version__}"
    base = config["docker"]["image"]
    assert base == f"rayproject/ray:{ray.__version__}-py311-cpu", f"{name}.yaml: docker.image is {base!r}"
    for node_type, spec in worker_types(config).items():
        image = spec.get("docker", {}).get("worker_image", base)
        wants_gpu = spec["resources"].get("GPU", 0) > 0
        expected = f"rayproject/ray:{ray.__version__}-py311-{'gpu' if wants_gpu else 'cpu'}"
        assert image == expected, f"{name}.yaml: {node_type} runs {image!r}, expected {expected!r}"


# ----------------------------------------------------------------------------------------------
# AWS network security


def test_aws_nodes_never_get_rays_default_security_group():
    """Ray's default group (created when a node type has no SecurityGroupIds) always adds an SSH
    rule for 0.0.0.0/0, whatever provider.security_group says. Every node type must name ours."""
    config = launcher("aws")
    for node_type, spec in config["available_node_types"].items():
        node_config = spec["node_config"]
        assert node_config.get("SecurityGroupIds"), (
            f"aws.yaml: {node_type} has no SecurityGroupIds, so `ray up` would create a group with "
            "SSH open to 0.0.0.0/0; use the group of cluster/aws-security-group.cfn.yaml"
        )
        assert node_config.get("ImageId"), f"aws.yaml: {node_type} would fall back to Ray's old default AMI"
        assert node_config.get("MetadataOptions", {}).get("HttpTokens") == "required", (
            f"aws.yaml: {node_type} should require IMDSv2"
        )
    ids = {tuple(s["node_config"]["SecurityGroupIds"]) for s in config["available_node_types"].values()}
    assert len(ids) == 1, f"aws.yaml: all node types must share one security group (intra-cluster rule), got {ids}"
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    bad = [r for r in rules if open_to_world(r)]
    assert not bad, f"aws.yaml: provider.security_group opens ports to the world: {bad}"


def test_aws_security_group_template_admits_only_ssh_and_the_cluster():
    template = load(AWS_SG_TEMPLATE)
    groups = {k: r for k, r in template["Resources"].items() if r["Type"] == "AWS::EC2::SecurityGroup"}
    assert len(groups) == 1, f"expected one security group in {AWS_SG_TEMPLATE.name}, got {list(groups)}"
    (group_name,) = groups
    inline = groups[group_name]["Properties"].get("SecurityGroupIngress", [])
    separate = [
        r["Properties"] for r in template["Resources"].values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"
    ]
    rules = inline + separate
    assert rules, "the security group has no ingress rule at all"
    for rule in rules:
        assert not open_to_world(rule), f"ingress rule open to the internet: {rule}"
        for port in SENSITIVE_PORTS:
            if covers(rule, port):
                assert "SourceSecurityGroupId" in rule, (
                    f"port {port} is reachable by something other than the cluster's own group: {rule}"
                )
        if "SourceSecurityGroupId" in rule:
            assert rule["SourceSecurityGroupId"] == {"Fn::GetAtt": [group_name, "GroupId"]}, (
                f"intra-cluster rule must name the group itself: {rule}"
            )
        else:
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), (
                f"only SSH may come from outside the cluster: {rule}"
            )
            assert rule.get("CidrIp") == {"Ref": "SshCidr"}, f"SSH must come from the SshCidr parameter: {rule}"
    pattern = re.compile(template["Parameters"]["SshCidr"]["AllowedPattern"])
    assert "Default" not in template["Parameters"]["SshCidr"], "SshCidr must be chosen by the user"
    for cidr in ("0.0.0.0/0", "10.0.0.0/0", "1.2.3.4"):
        assert not pattern.fullmatch(cidr), f"SshCidr's AllowedPattern accepts {cidr!r}"
    for cidr in ("203.0.113.7/32", "10.0.0.0/8", "192.168.0.0/16"):
        assert pattern.fullmatch(cidr), f"SshCidr's AllowedPattern refuses {cidr!r}"
        ipaddress.ip_network(cidr)


def test_gcp_nodes_use_the_dedicated_subnet_and_tag():
    config = launcher("gcp")
    for node_type, spec in config["available_node_types"].items():
        node_config = spec["node_config"]
        interfaces = node_config.get("networkInterfaces", [])
        assert interfaces and all("subnetworks/lapo-ray-subnet" in i.get("subnetwork", "") for i in interfaces), (
            f"gcp.yaml: {node_type} must sit in lapo-ray-subnet (the default network opens SSH/RDP to the world)"
        )
        assert "lapo-ray" in node_config.get("tags", {}).get("items", []), (
            f"gcp.yaml: {node_type} lacks the network tag the firewall rules target"
        )
        if spec["resources"].get("GPU", 0):
            assert node_config.get("scheduling", {}).get("onHostMaintenance") == "TERMINATE", (
                f"gcp.yaml: GPU type {node_type} must set scheduling.onHostMaintenance: TERMINATE"
            )


# ----------------------------------------------------------------------------------------------
# no secrets in cluster/


def test_no_secret_values_in_cluster_files():
    files = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
    assert files, "cluster/ is empty"
    assignment = re.compile(r"\b([A-Z][A-Z0-9_]*(?:KEY|TOKEN|SECRET|PASSWORD)[A-Z0-9_]*)=(?![\"']?\$)([^\s\"'}]+)")
    for path in files:
        text = path.read_text()
        rel = path.relative_to(REPO)
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{rel}: looks like an AWS access key id"
        assert "PRIVATE KEY-----" not in text, f"{rel}: contains a private key"
        for match in assignment.finditer(text):
            pytest.fail(f"{rel}: {match.group(1)} is given a literal value ({match.group(0)!r}); "
                        "take secrets from the environment or a secret store")


# ----------------------------------------------------------------------------------------------
# KubeRay


KUBERAY_SPECS = ("RayCluster", "RayJob")


def kuberay_spec(kind: str) -> tuple[str, dict]:
    """(label for messages, RayCluster spec) of raycluster.yaml or of rayjob.yaml's rayClusterSpec."""
    if kind == "RayCluster":
        return "raycluster.yaml", load(KUBERAY_CLUSTER)["spec"]
    return "rayjob.yaml rayClusterSpec", load(KUBERAY_JOB)["spec"]["rayClusterSpec"]


@pytest.mark.parametrize(
    "path, kind", [(KUBERAY_CLUSTER, "RayCluster"), (KUBERAY_JOB, "RayJob")], ids=["RayCluster", "RayJob"]
)
def test_kuberay_manifest_kind_and_name(path, kind):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path.name}: expected a single manifest, got {len(docs)}"
    doc = docs[0]
    assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: apiVersion {doc['apiVersion']!r}, KubeRay serves ray.io/v1"
    assert doc["kind"] == kind
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", name), (
        f"{path.name}: {name!r} is not a short DNS-1035 label"
    )


@pytest.mark.parametrize("kind", KUBERAY_SPECS)
def test_kuberay_cluster_spec_structure(kind):
    label, spec = kuberay_spec(kind)
    assert spec.get("rayVersion") == ray.__version__, f"{label}: rayVersion must be {ray.__version__}"
    assert spec.get("enableInTreeAutoscaling") is True, f"{label}: enableInTreeAutoscaling must be true"
    assert spec.get("autoscalerOptions", {}).get("idleTimeoutSeconds", 0) > 0, (
        f"{label}: set autoscalerOptions.idleTimeoutSeconds"
    )
    assert spec.get("authOptions", {}).get("mode") == "token", f"{label}: authOptions.mode must be token"
    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams"), dict), f"{label}: headGroupSpec.rayStartParams is required"
    head_names = [c["name"] for c in head["template"]["spec"]["containers"]]
    assert head_names[:1] == ["ray-head"], f"{label}: the head's first container must be ray-head, got {head_names}"
    assert spec["workerGroupSpecs"], f"{label}: no worker groups"
    for group in spec["workerGroupSpecs"]:
        missing = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} - set(group)
        assert not missing, f"{label}: worker group {group.get('groupName')!r} lacks {sorted(missing)}"
        lo, hi, now = group["minReplicas"], group["maxReplicas"], group.get("replicas", group["minReplicas"])
        assert 0 <= lo <= now <= hi and hi > 0, (
            f"{label}: {group['groupName']}: need 0 <= min {lo} <= replicas {now} <= max {hi}"
        )
    for name, group in kuberay_groups(spec):
        for key, value in group["rayStartParams"].items():
            assert isinstance(value, str), f"{label}: {name}.rayStartParams[{key!r}] must be a string, got {value!r}"
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert {"cpu-workers", "gpu-workers"} <= set(names), f"{label}: expected cpu-workers and gpu-workers, got {names}"


@pytest.mark.parametrize("kind", KUBERAY_SPECS)
def test_kuberay_resources_match_ray_start_params(kind):
    label, spec = kuberay_spec(kind)
    head_params = spec["headGroupSpec"]["rayStartParams"]
    assert head_params.get("num-cpus") == "0", f"{label}: the head must run with num-cpus '0' (coordination only)"
    for name, group in kuberay_groups(spec):
        container = ray_container(group)
        resources = container.get("resources", {})
        limits, requests = resources.get("limits", {}), resources.get("requests", {})
        assert limits.get("cpu") and limits.get("memory"), f"{label}: {name} needs cpu and memory limits"
        for key in set(limits) | set(requests):
            assert quantity(limits.get(key, 0)) == quantity(requests.get(key, 0)), (
                f"{label}: {name}: requests.{key}={requests.get(key)} != limits.{key}={limits.get(key)} "
                "(KubeRay recommends equal requests and limits)"
            )
        params = group["rayStartParams"]
        gpus = quantity(limits.get("nvidia.com/gpu", 0))
        assert quantity(params.get("num-gpus", "0")) == gpus, (
            f"{label}: {name}: num-gpus {params.get('num-gpus')!r} but the container gets {gpus} nvidia.com/gpu"
        )
        if name == "head":
            continue
        cpus = quantity(limits["cpu"])
        assert quantity(params.get("num-cpus", limits["cpu"])) == cpus, (
            f"{label}: {name}: num-cpus {params.get('num-cpus')!r} but the container is limited to {limits['cpu']} CPUs"
        )
        if "memory" in params:
            assert quantity(params["memory"]) <= quantity(limits["memory"]), (
                f"{label}: {name}: Ray memory above the limit"
            )
        assert quantity(limits["memory"]) >= cpus * 2 * 2**30, f"{label}: {name}: under 2 GiB of memory per CPU"
        if name.startswith("gpu"):
            assert gpus >= 1, f"{label}: {name} declares no nvidia.com/gpu"


@pytest.mark.parametrize("kind", KUBERAY_SPECS)
def test_kuberay_images_pin_ray(kind):
    label, spec = kuberay_spec(kind)
    for name, group in kuberay_groups(spec):
        for container in group["template"]["spec"]["containers"]:
            image = container["image"]
            assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py311-(cpu|gpu)", image), (
                f"{label}: {name}/{container['name']} runs {image!r}; "
                f"pin rayproject/ray:{ray.__version__}-py311-cpu|gpu"
            )
            gpus = quantity(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            assert image.endswith("-gpu") == (gpus > 0), f"{label}: {name} image {image!r} vs {gpus} GPUs"


@pytest.mark.parametrize("kind", KUBERAY_SPECS)
def test_kuberay_containers_track_train_state_and_autoscale(kind):
    label, spec = kuberay_spec(kind)
    assert spec.get("enableInTreeAutoscaling") is True
    for name, group in kuberay_groups(spec):
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_TRAIN_ENABLE_STATE_TRACKING") == "1", f"{label}: {name} leaves the Train view empty"
            assert env.get("LAPO_AUTOSCALING") == "1", f"{label}: {name} autoscales but lacks LAPO_AUTOSCALING=1"


@pytest.mark.parametrize("kind", KUBERAY_SPECS)
def test_kuberay_secrets_only_by_reference(kind):
    label, spec = kuberay_spec(kind)
    seen = 0
    for name, group in kuberay_groups(spec):
        pod = group["template"]["spec"]
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            for env in container.get("env", []):
                if SECRET_NAME.search(env["name"]):
                    seen += 1
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (
                        f"{label}: {name}/{container['name']} sets {env['name']} without valueFrom.secretKeyRef"
                    )
    for env in spec.get("autoscalerOptions", {}).get("env", []):
        assert not (SECRET_NAME.search(env["name"]) and "value" in env), (
            f"{label}: autoscaler env {env['name']} is a literal"
        )
    assert seen, f"{label}: expected WANDB_API_KEY from a Secret on the Ray containers"


@pytest.mark.parametrize("kind", KUBERAY_SPECS)
def test_kuberay_nothing_exposed_outside_the_cluster(kind):
    label, spec = kuberay_spec(kind)
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{label}: head serviceType must stay ClusterIP"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", (
        f"{label}: headService must not be LoadBalancer/NodePort"
    )
    assert not head.get("enableIngress"), f"{label}: no Ingress for the dashboard"
    for name, group in kuberay_groups(spec):
        pod = group["template"]["spec"]
        assert not pod.get("hostNetwork"), f"{label}: {name} must not use hostNetwork"
        for container in pod["containers"]:
            for port in container.get("ports", []):
                assert "hostPort" not in port, f"{label}: {name} publishes {port} on the node"
    # Inside the pod the dashboard must listen on the pod IP (KubeRay's operator, autoscaler and
    # RayJob submitter call it through the Service); the Service above keeps it in-cluster.
    assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") == "0.0.0.0", (
        f"{label}: KubeRay reaches the dashboard on the pod IP; 127.0.0.1 breaks RayJob and the operator"
    )
    for path in (KUBERAY_CLUSTER, KUBERAY_JOB):
        assert "LoadBalancer" not in re.sub(r"#.*", "", path.read_text()), f"{path.name} mentions a LoadBalancer"


def test_rayjob_runs_pretrain_with_valid_flags_and_cleans_up():
    job = load(KUBERAY_JOB)["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/pretrain.py"], (
        f"rayjob.yaml: entrypoint must run jobs/pretrain.py, got {argv[:2]}"
    )
    assert (REPO / "jobs" / "pretrain.py").is_file(), "jobs/pretrain.py is missing"
    config = pretrain_cli(argv[2:], "rayjob.yaml entrypoint")
    gpu_group = next(g for g in job["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers")
    gpu_slots = gpu_group["maxReplicas"] * int(quantity(gpu_group["rayStartParams"]["num-gpus"]))
    for stage in (config.stage1, config.stage2):
        assert stage.use_gpu, "rayjob.yaml: the GPU cluster should train with --stageN.use-gpu true"
        assert stage.num_workers <= gpu_slots, (
            f"rayjob.yaml: {stage.num_workers} Train workers, {gpu_slots} GPUs at most"
        )
    assert job.get("shutdownAfterJobFinishes") is True, "rayjob.yaml: shutdownAfterJobFinishes must be true"
    ttl = job.get("ttlSecondsAfterFinished")
    assert isinstance(ttl, int) and ttl >= 0, f"rayjob.yaml: ttlSecondsAfterFinished must be an int >= 0, got {ttl!r}"
    assert load(KUBERAY_JOB)["spec"]["rayClusterSpec"] == load(KUBERAY_CLUSTER)["spec"], (
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec; keep them identical"
    )


def test_rayjob_runtime_env_is_valid_and_matches_pyproject():
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(load(KUBERAY_JOB)["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own validation: field names, URI forms, pip options
    working_dir = runtime_env.get("working_dir", "")
    assert re.match(r"(https|s3|gs)://.+\.zip$", working_dir), (
        f"rayjob.yaml: working_dir must be a remote .zip the cluster can download, got {working_dir!r}"
    )
    packages = runtime_env["pip"]["packages"] if isinstance(runtime_env["pip"], dict) else runtime_env["pip"]
    in_job = {r.name.lower(): str(r.specifier) for r in map(Requirement, packages)}
    wanted = {name: str(r.specifier) for name, r in pyproject_requirements().items() if name != "ray"}
    assert in_job == wanted, (
        "rayjob.yaml runtimeEnvYAML pip packages differ from pyproject.toml dependencies (ray excepted):\n"
        f"  only in the RayJob: {sorted(set(in_job.items()) - set(wanted.items()))}\n"
        f"  only in pyproject:  {sorted(set(wanted.items()) - set(in_job.items()))}"
    )


# ----------------------------------------------------------------------------------------------
# README


def test_readme_pretrain_commands_parse():
    text = (CLUSTER / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            if "jobs/pretrain.py" in line:
                commands.append(line.split("#", 1)[0])
    assert commands, "cluster/README.md shows no jobs/pretrain.py command"
    for command in commands:
        argv = shlex.split(command)
        config = pretrain_cli(argv[argv.index("jobs/pretrain.py") + 1:], "cluster/README.md")
        assert config.corpus.startswith(("s3://", "gs://")), f"README: {command.strip()!r} should read a cloud corpus"
    for name in LAUNCHERS + ("kuberay/raycluster", "kuberay/rayjob"):
        assert f"cluster/{name}.yaml" in text, f"cluster/README.md never mentions cluster/{name}.yaml"
