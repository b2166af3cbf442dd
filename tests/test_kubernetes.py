"""deploy/: the Kubernetes manifests, the PrometheusRule, the fleet rules, the runbooks.

- The kustomize base renders (`kubectl kustomize`; without kubectl, a small loader of the
  resources it lists), and every manifest validates: the built-in kinds against Kubernetes'
  own schemas (kubernetes-validate, strict: an unknown or misspelt field fails) for the oldest
  release the DaemonSet supports (1.30: `appArmorProfile`) and the newest it knows; the
  Prometheus Operator's kinds against models generated from its CRDs
  (cloudcoil-models-prometheus-operator), strictly too: what the models do not know is reported.
- The DaemonSet asks for exactly what the code and the systemd unit need (capabilities, the
  folders the configuration reads), every host folder read-only.
- The PrometheusRule is what scripts/gen_prometheus_rule.py makes of deploy/prometheus/, the
  ConfigMap's file says what systemd/tcprio.yaml says, fleet.yml passes promtool, and every
  alert's runbook_url points at a section of docs/runbooks.md.

The dashboard's queries run against a real Prometheus in tests/test_dashboard.py.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tcprio.kernel import bcc_support, helper_cache, namespaces, privileges

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
RULES_DIR = ROOT / "deploy" / "prometheus"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
# appArmorProfile (the DaemonSet needs it unconfined) is a field from 1.30 on.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
BUILT_IN_GROUPS = {"v1", "apps/v1"}
OPERATOR_GROUP = "monitoring.coreos.com/v1"
PROMTOOL = shutil.which("promtool")
KUBECTL = shutil.which("kubectl")


# --- rendering ---------------------------------------------------------------------------------


def load_base() -> list[dict]:
    """What `kubectl kustomize` makes of the base, for the parts it uses: the resources, the
    configMapGenerator (without the name's hash) and the labels added to every resource."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((BASE / name).read_text()) if d)
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (BASE / f).read_text() for f in generator["files"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": generator["name"]}, "data": data})  # fmt: skip
    for entry in kustomization.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(entry["pairs"])
            template = doc.get("spec", {}).get("template")
            if entry.get("includeTemplates") and template:
                template["metadata"].setdefault("labels", {}).update(entry["pairs"])
    return docs


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    if KUBECTL is None:
        return load_base()
    out = subprocess.run(
        [KUBECTL, "kustomize", str(BASE)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def test_the_base_renders_every_resource_once(rendered):
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(
        ["ServiceAccount", "ConfigMap", "Service", "DaemonSet", "PodMonitor", "PrometheusRule"]
    )
    for doc in rendered:
        assert "namespace" not in doc["metadata"], "the base leaves the namespace to an overlay"
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "tcprio"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed: the loader alone is used")
def test_the_loader_agrees_with_kustomize(rendered):
    """The fallback renders the same objects (less the ConfigMap's hashed name)."""

    def key(doc: dict) -> tuple[str, str]:
        return doc["kind"], re.sub(r"-[a-z0-9]{10}$", "", doc["metadata"]["name"])

    loaded = {key(d): d for d in load_base()}
    for doc in rendered:
        mine = loaded[key(doc)]
        if doc["kind"] == "ConfigMap":
            assert mine["data"] == doc["data"]
        elif doc["kind"] != "DaemonSet":  # its ConfigMap reference carries the hash
            assert mine == doc, doc["kind"]


def test_a_config_change_rolls_the_daemonset(rendered):
    """The DaemonSet mounts the generated ConfigMap by its hashed name: a new config, a new
    name, a rollout (the daemon reloads on SIGHUP, which nothing sends in a pod)."""
    if KUBECTL is None:
        pytest.skip("kubectl not installed: the loader does not hash names")
    name = one(rendered, "ConfigMap")["metadata"]["name"]
    assert re.fullmatch(r"tcprio-config-[a-z0-9]{10}", name)
    volumes = one(rendered, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": name}} in volumes


# --- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_built_in_kinds_validate_against_the_kubernetes_schemas(rendered, version):
    built_in = [d for d in rendered if d["apiVersion"] in BUILT_IN_GROUPS]
    assert len(built_in) == 4
    for doc in built_in:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_is_strict(rendered):
    """A misspelt field fails: the check above would catch one in the manifests."""
    daemonset = copy.deepcopy(one(rendered, "DaemonSet"))
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSIONS[-1], strict=True)


def _operator_model(kind: str):
    from cloudcoil.models.prometheus_operator import v1  # a 2 MB module: import when used

    return getattr(v1, kind)


def _validate_operator_kind(doc: dict) -> None:
    """Against the CRD's schema (types, patterns, required fields), then strictly: whatever the
    model does not know is dropped by its dump, so the round trip shows it."""
    model = _operator_model(doc["kind"]).model_validate(doc)
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


@pytest.mark.parametrize("kind", ["PodMonitor", "PrometheusRule"])
def test_operator_kinds_validate_against_the_crd_models(rendered, kind):
    doc = one(rendered, kind)
    assert doc["apiVersion"] == OPERATOR_GROUP
    _validate_operator_kind(doc)


def test_the_operator_check_is_strict(rendered):
    podmonitor = one(rendered, "PodMonitor")
    misspelt = copy.deepcopy(podmonitor)
    misspelt["spec"]["podMetricsEndpoints"][0]["relabellings"] = []
    with pytest.raises(AssertionError):
        _validate_operator_kind(misspelt)
    bad_interval = copy.deepcopy(podmonitor)
    bad_interval["spec"]["podMetricsEndpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(ValueError):  # pydantic's ValidationError
        _validate_operator_kind(bad_interval)


def test_the_podmonitor_scrapes_the_daemonset_as_job_tcprio(rendered):
    monitor = one(rendered, "PodMonitor")["spec"]
    pod = one(rendered, "DaemonSet")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    # job="tcprio": TcprioExporterDown and the fleet rules look for up{job="tcprio"}
    assert labels[monitor["jobLabel"]] == "tcprio"
    ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} <= ports
    relabel = monitor["podMetricsEndpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node",
            "action": "replace"} in relabel  # fmt: skip
    assert not monitor["podMetricsEndpoints"][0].get("honorLabels")


def test_the_service_is_headless_with_a_metrics_port(rendered):
    service = one(rendered, "Service")["spec"]
    assert service["clusterIP"] == "None"
    assert [p["name"] for p in service["ports"]] == ["metrics"]
    labels = one(rendered, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()


# --- what the DaemonSet asks for ------------------------------------------------------------


@pytest.fixture(scope="module")
def pod(rendered) -> dict:
    return one(rendered, "DaemonSet")["spec"]["template"]["spec"]


def _unit_capabilities() -> set[str]:
    unit = (ROOT / "systemd" / "tcprio.service").read_text()
    line = re.search(r"^CapabilityBoundingSet=(.*)$", unit, re.M)
    assert line
    return {c.removeprefix("CAP_") for c in line.group(1).split()}


def test_the_pod_has_the_units_capabilities_and_nothing_more(pod):
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    assert pod["automountServiceAccountToken"] is False
    security = pod["containers"][0]["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    added = set(security["capabilities"]["add"])
    assert added == _unit_capabilities()
    checked = {name.removeprefix("CAP_") for name, _ in privileges.REQUIRED_CAPABILITIES.values()}
    assert checked <= added, "tcprio's own check before a scan would refuse to run"
    assert security["readOnlyRootFilesystem"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["appArmorProfile"] == {"type": "Unconfined"}


def test_it_runs_on_every_node(pod):
    assert {"operator": "Exists"} in pod["tolerations"]
    assert all(set(t) == {"operator"} for t in pod["tolerations"]), "no key/effect: every taint"


def _mounts(pod: dict) -> dict[str, tuple[dict, dict]]:
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in pod["containers"][0]["volumeMounts"]}


def test_host_folders_are_read_only_and_only_the_pods_own_are_writable(pod):
    for path, (mount, volume) in _mounts(pod).items():
        if "hostPath" in volume:
            assert mount.get("readOnly") is True, path
            assert volume["hostPath"]["path"] == path, "the code reads the host's own paths"
        elif mount.get("readOnly") is not True:
            assert "emptyDir" in volume, path


def test_the_pod_mounts_every_folder_the_configuration_reads(pod):
    mounted = _mounts(pod)
    config = yaml.safe_load((BASE / "tcprio.yaml").read_text())
    wanted = [
        *config["containers"]["containerd_bundle_dirs"],
        *config["containers"]["crio_bundle_dirs"],
        *{str(Path(f).parent) for f in config["datadog"]["config_files"]},
        str(namespaces.NAMED_NETNS_DIRS[0]),  # /run/netns; /var/run is a link to /run
        "/lib/modules", "/usr/src",  # the live probe's kernel headers (BCC)
    ]  # fmt: skip
    for path in wanted:
        assert path in mounted, path
    # namespaces bind-mounted later, and bundles' root file systems, follow the host
    for path in ["/run/netns", *config["containers"]["containerd_bundle_dirs"]]:
        assert mounted[path][0]["mountPropagation"] == "HostToContainer", path
    # never the runtime's socket folder itself
    assert "/run/containerd" not in mounted and "/run/containers" not in mounted
    # the writable places the daemon uses
    writable = {p for p, (m, v) in mounted.items() if "emptyDir" in v}
    assert str(helper_cache.CACHE_DIR) in writable
    assert str(bcc_support.DEFAULT_CACHE.parent) in writable
    assert {"/tmp", "/var/tmp"} <= writable


def test_probes_and_port(pod):
    container = pod["containers"][0]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9842, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "the unit's start time"
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}


def test_the_command_line_is_one_tcprio_accepts(pod):
    container = pod["containers"][0]
    command = [*container["command"], *container["args"]]
    assert command[:2] == ["tcprio", "serve"]
    help_text = subprocess.run(
        [sys.executable, "-m", "tcprio", "serve", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for arg in command[2:]:
        flag = arg.split("=", 1)[0]
        assert re.search(rf"(^|\s){re.escape(flag)}[\s=]", help_text), flag
    assert "--config=/etc/tcprio/tcprio.yaml" in command
    assert any(a.endswith(":9842") for a in command)
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert "/etc/tcprio" in mounts


def test_the_configmap_says_what_the_systemd_config_says():
    """deploy/kubernetes/tcprio.yaml is systemd/tcprio.yaml's defaults: copy that file over
    it (keeping its first comment) when the defaults change."""
    ours = yaml.safe_load((BASE / "tcprio.yaml").read_text())
    theirs = yaml.safe_load((ROOT / "systemd" / "tcprio.yaml").read_text())
    assert ours == theirs


def test_the_config_file_is_one_the_daemon_accepts(tmp_path):
    from tcprio.service.config import load_config

    config = load_config(BASE / "tcprio.yaml")
    assert config.listen_address == "0.0.0.0:9842"


# --- rules -------------------------------------------------------------------------------------


def test_the_prometheusrule_is_generated_from_the_rule_files():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_prometheus_rule.py"), "--check"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rule = yaml.safe_load((BASE / "prometheusrule.yaml").read_text())
    groups = [
        g
        for name in ("alerts.yml", "fleet.yml")
        for g in yaml.safe_load((RULES_DIR / name).read_text())["groups"]
    ]
    assert rule["spec"]["groups"] == groups


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_fleet_rules_pass_promtool_check():
    out = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES_DIR / "fleet.yml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rules = yaml.safe_load((RULES_DIR / "fleet.yml").read_text())["groups"][0]["rules"]
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout, out.stdout


def test_fleet_rules_follow_the_naming_convention():
    """level:metric:operations, the level naming exactly the labels the result keeps."""
    rules = yaml.safe_load((RULES_DIR / "fleet.yml").read_text())["groups"][0]["rules"]
    for rule in rules:
        level, metric, _operation = rule["record"].split(":")
        assert metric.startswith("tcprio_"), rule["record"]
        grouping = re.search(r"^\w+ by \(([^)]*)\)", rule["expr"])
        assert grouping, rule["expr"]
        labels = [label.strip() for label in grouping.group(1).split(",")]
        assert "_".join(labels) == level, rule["record"]


# --- runbooks ----------------------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _alerts() -> list[dict]:
    document = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    return [r for g in document["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_has_a_runbook_section():
    anchors = {
        github_anchor(m.group(1)) for m in re.finditer(r"^## (.+)$", RUNBOOKS.read_text(), re.M)
    }
    for alert in _alerts():
        assert alert["alert"].lower() in anchors, alert["alert"]


def test_every_runbook_url_points_at_its_section():
    anchors = {
        github_anchor(m.group(1)) for m in re.finditer(r"^## (.+)$", RUNBOOKS.read_text(), re.M)
    }
    prefix = "https://github.com/tcprio/tcprio/blob/main/docs/runbooks.md#"
    missing = [a["alert"] for a in _alerts() if "runbook_url" not in a.get("annotations", {})]
    assert missing == [], "alerts without a runbook_url"
    for alert in _alerts():
        url = alert["annotations"]["runbook_url"]
        assert url.startswith(prefix), url
        anchor = url.removeprefix(prefix)
        assert anchor == alert["alert"].lower() and anchor in anchors, url


def test_every_runbook_section_says_how_to_confirm_with_tcprio_scan():
    sections = re.split(r"^## ", RUNBOOKS.read_text(), flags=re.M)[1:]
    names = {a["alert"] for a in _alerts()}
    assert {s.split("\n", 1)[0].strip() for s in sections} >= names
    scan_help = subprocess.run(
        [sys.executable, "-m", "tcprio", "scan", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for section in sections:
        title = section.split("\n", 1)[0].strip()
        if title not in names:
            continue
        assert "tcprio scan" in section, title
        for flag in re.findall(r"tcprio scan[^`\n]*", section):
            for option in re.findall(r"(--[a-z-]+)", flag):
                assert option in scan_help, f"{title}: {option} is no flag of tcprio scan"
