"""Consistency checks of rendered klein-serve deployments that no schema can express.

    check_manifests.py k8s OVERLAY_NAME RENDERED.yaml   (output of `kubectl kustomize`)
    check_manifests.py compose NAME CONFIG.json         (output of `docker compose config --format json`)

Kubernetes: every klein service container (one that sets KLEIN_LISTEN) has its environment
resolved the way the kubelet does it (envFrom ConfigMaps, then env in order with $(VAR)
references to variables defined before). Then:
- GPU budgets: over the containers on CUDA, sum(copies on one GPU x KLEIN_GPU_MEMORY_BUDGET) +
  the reserve <= the GPU size the overlay declares (annotations klein.dev/gpu-memory-bytes and
  klein.dev/gpu-reserved-bytes on a ConfigMap). A budget is the whole device memory of its
  process, CUDA context included (MPS charges the context to the limit: measured, see
  deploy/README.md); the reserve is what no per-process limit covers (the MPS server, the
  driver). A Deployment whose pods avoid each other per node (required anti-affinity) has one
  copy per GPU, otherwise all its replicas share it.
- MPS: CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, where set, equals KLEIN_GPU_MEMORY_BUDGET; a DRA
  ResourceClaim's MPS defaultPinnedDeviceMemoryLimit is at least every budget (clients can only
  lower it).
- GPU Deployments never surge (maxSurge 0): a second copy would not fit the GPU during a rollout.
- Shutdown: terminationGracePeriodSeconds >= preStop sleep + KLEIN_DRAIN_TIMEOUT_SECS + 5.
- Probes: native gRPC on the KLEIN_LISTEN port; readiness and startup ask "", liveness asks
  "liveness"; ports named grpc and metrics match KLEIN_LISTEN and KLEIN_METRICS_LISTEN.
- Security: non-root, read-only root filesystem, weights mounted read-only.
- The gateway's stage addresses name headless Services of this render, on their grpc port.
Compose: the same budget sum and MPS equality over the services on CUDA, against x-klein.
Exits 1 with one line per problem.
"""

import json
import re
import sys

import yaml

# Units of the services' byte sizes (klein-runtime bytesize.rs: k/M/G/T decimal, *iB binary).
BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
              "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
              "tib": 2**40}
# Units of Kubernetes quantities.
QUANTITY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10,
                  "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
MIB = 2**20
STAGES = {"KLEIN_ENCODER_ADDRS", "KLEIN_DENOISER_ADDRS", "KLEIN_VAE_ADDRS"}

problems = []


def fail(msg):
    problems.append(msg)


def byte_size(text):
    """KLEIN_GPU_MEMORY_BUDGET as the service parses it."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in BYTE_UNITS:
        raise ValueError(f"not a byte size: {text!r}")
    return round(float(m.group(1)) * BYTE_UNITS[m.group(2).lower()])


def quantity(text):
    m = re.fullmatch(r"([0-9]+)([A-Za-z]*)", str(text))
    if not m or m.group(2) not in QUANTITY_UNITS:
        raise ValueError(f"not a quantity: {text!r}")
    return int(m.group(1)) * QUANTITY_UNITS[m.group(2)]


def mps_limit(text):
    """CUDA_MPS_PINNED_DEVICE_MEM_LIMIT "0=NNNNM": MPS reads M as MiB and G as GiB."""
    m = re.fullmatch(r"0=([0-9]+)([MG])", text)
    if not m:
        raise ValueError(f"expected 0=<n>M or 0=<n>G, got {text!r}")
    return int(m.group(1)) * (MIB if m.group(2) == "M" else 1024 * MIB)


def expand(value, env):
    """Kubernetes $(VAR) expansion: defined variables only, $$ escapes."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


def resolve_env(container, configmaps, where):
    env = {}
    for source in container.get("envFrom", []):
        name = source.get("configMapRef", {}).get("name")
        if name not in configmaps:
            fail(f"{where}: envFrom ConfigMap {name!r} is not in the render")
            continue
        env.update({k: str(v) for k, v in configmaps[name].get("data", {}).items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(str(var["value"]), env)
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            data = configmaps.get(ref["name"], {}).get("data", {})
            if ref["key"] not in data:
                fail(f"{where}: {var['name']} refers to missing {ref['name']}/{ref['key']}")
                continue
            env[var["name"]] = str(data[ref["key"]])
    for name, value in env.items():
        if re.search(r"\$\([A-Za-z_]", value):
            fail(f"{where}: {name}={value!r} has an unresolved reference")
    return env


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def check_probes(c, env, where):
    port = port_of(env["KLEIN_LISTEN"])
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if ports.get("grpc") != port:
        fail(f"{where}: port 'grpc' is {ports.get('grpc')}, KLEIN_LISTEN says {port}")
    if "KLEIN_METRICS_LISTEN" in env and ports.get("metrics") != port_of(env["KLEIN_METRICS_LISTEN"]):
        fail(f"{where}: port 'metrics' does not match KLEIN_METRICS_LISTEN")
    for kind, service in (("startupProbe", ""), ("readinessProbe", ""), ("livenessProbe", "liveness")):
        grpc = c.get(kind, {}).get("grpc")
        if not grpc:
            fail(f"{where}: {kind} is not a gRPC probe")
        elif grpc.get("port") != port or grpc.get("service", "") != service:
            fail(f"{where}: {kind} should ask service {service!r} on port {port}, asks {grpc}")


def check_pod(spec, c, env, where):
    drain = int(env.get("KLEIN_DRAIN_TIMEOUT_SECS", "30"))
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace < pre_stop + drain + 5:
        fail(f"{where}: terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain {drain} + 5")
    pod_sc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        fail(f"{where}: not runAsNonRoot")
    if not sc.get("readOnlyRootFilesystem"):
        fail(f"{where}: root filesystem is writable")
    claims = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    for mount in c.get("volumeMounts", []):
        if mount["name"] in claims and not mount.get("readOnly"):
            fail(f"{where}: volume {mount['name']} (weights) is mounted writable")


def one_copy_per_node(spec):
    terms = (spec.get("affinity", {}).get("podAntiAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", []))
    return any(t.get("topologyKey") == "kubernetes.io/hostname"
               and "app.kubernetes.io/component" in t.get("matchLabelKeys", []) for t in terms)


def check_budgets(name, gpu_containers, gpu_bytes, reserved_bytes, extra=""):
    """gpu_containers: (label, copies, budget_bytes)."""
    if not gpu_containers:
        print(f"{name}: no GPU containers (CPU deployment)")
        return
    if gpu_bytes is None or reserved_bytes is None:
        fail(f"{name}: GPU containers but no klein.dev/gpu-memory-bytes and "
             f"klein.dev/gpu-reserved-bytes declaration")
        return
    total = reserved_bytes + sum(copies * budget for _, copies, budget in gpu_containers)
    parts = ", ".join(f"{label} {copies}x{budget // MIB}"
                      for label, copies, budget in gpu_containers)
    parts += f" + reserve {reserved_bytes // MIB}"
    verdict = "fits" if total <= gpu_bytes else "DOES NOT FIT"
    print(f"{name}: {parts} = {total // MIB} MiB of {gpu_bytes // MIB} MiB GPU: {verdict} "
          f"({(gpu_bytes - total) // MIB} MiB spare){extra}")
    if total > gpu_bytes:
        fail(f"{name}: GPU budgets + reserve {total // MIB} MiB exceed the declared "
             f"{gpu_bytes // MIB} MiB")


def check_k8s(name, path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    gpu_bytes = reserved_bytes = None
    for cm in configmaps.values():
        ann = cm["metadata"].get("annotations", {})
        if "klein.dev/gpu-memory-bytes" in ann:
            gpu_bytes = int(ann["klein.dev/gpu-memory-bytes"])
            reserved = ann.get("klein.dev/gpu-reserved-bytes")
            reserved_bytes = None if reserved is None else int(reserved)
    claim_limits = {}
    for d in docs:
        if d["kind"] == "ResourceClaim":
            for cfg in d["spec"]["devices"].get("config", []):
                mps = cfg.get("opaque", {}).get("parameters", {}).get("sharing", {}).get("mpsConfig", {})
                if "defaultPinnedDeviceMemoryLimit" in mps:
                    claim_limits[d["metadata"]["name"]] = quantity(mps["defaultPinnedDeviceMemoryLimit"])
    gpu_containers, mps_checked = [], 0
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"]:
            where = f"{name}: {d['metadata']['name']}/{c['name']}"
            env = resolve_env(c, configmaps, where)
            if "KLEIN_LISTEN" not in env:
                continue
            check_probes(c, env, where)
            check_pod(spec, c, env, where)
            for var in STAGES & env.keys():
                for url in json.loads(env[var]):
                    m = re.fullmatch(r"http://([a-z0-9-]+):([0-9]+)", url)
                    svc = services.get(m.group(1)) if m else None
                    if not svc:
                        fail(f"{where}: {var} {url} is not a Service of this render")
                    elif svc["spec"].get("clusterIP") != "None":
                        fail(f"{where}: {var} {url} is not a headless Service")
                    elif not any(p["name"] == "grpc" and p["port"] == int(m.group(2))
                                 for p in svc["spec"]["ports"]):
                        fail(f"{where}: {var} {url} is not the Service's grpc port")
            if not env.get("KLEIN_DEVICE", "cpu").startswith("cuda"):
                continue
            budget = byte_size(env["KLEIN_GPU_MEMORY_BUDGET"])
            if "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in env:
                mps_checked += 1
                if mps_limit(env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]) != budget:
                    fail(f"{where}: CUDA_MPS_PINNED_DEVICE_MEM_LIMIT "
                         f"{env['CUDA_MPS_PINNED_DEVICE_MEM_LIMIT']} != KLEIN_GPU_MEMORY_BUDGET "
                         f"{env['KLEIN_GPU_MEMORY_BUDGET']}")
            for claim in spec.get("resourceClaims", []):
                limit = claim_limits.get(claim.get("resourceClaimName"))
                if limit is not None and limit < budget:
                    fail(f"{where}: budget {budget // MIB} MiB is above the claim's MPS default "
                         f"limit {limit // MIB} MiB")
            surge = d["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge")
            if d["spec"].get("strategy", {}).get("type") != "Recreate" and surge not in (0, "0%"):
                fail(f"{where}: a GPU Deployment must not surge (maxSurge {surge})")
            copies = 1 if one_copy_per_node(spec) else d["spec"].get("replicas", 1)
            gpu_containers.append((c["name"], copies, budget))
    extra = f"; MPS limit = budget for {mps_checked}" if mps_checked else ""
    check_budgets(name, gpu_containers, gpu_bytes, reserved_bytes, extra)


def check_compose(name, path):
    with open(path) as f:
        config = json.load(f)
    declared = config.get("x-klein", {})
    gpu_containers, mps_checked = [], 0
    for svc_name, svc in sorted(config["services"].items()):
        env = svc.get("environment") or {}
        if not str(env.get("KLEIN_DEVICE", "cpu")).startswith("cuda"):
            continue
        budget = byte_size(env["KLEIN_GPU_MEMORY_BUDGET"])
        if "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in env:
            mps_checked += 1
            if mps_limit(env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]) != budget:
                fail(f"{name}: {svc_name}: MPS limit != KLEIN_GPU_MEMORY_BUDGET")
        if not svc.get("read_only") or str(svc.get("user", "0")).split(":")[0] in ("", "0", "root"):
            fail(f"{name}: {svc_name}: must run read-only as a non-root user")
        gpu_containers.append((svc_name, 1, budget))
    extra = f"; MPS limit = budget for {mps_checked}" if mps_checked else ""
    check_budgets(name, gpu_containers, declared.get("gpu-memory-bytes"),
                  declared.get("gpu-reserved-bytes"), extra)


def main():
    mode, name, path = sys.argv[1:4]
    try:
        (check_k8s if mode == "k8s" else check_compose)(name, path)
    except (KeyError, ValueError, TypeError) as err:
        fail(f"{name}: cannot check {path}: {type(err).__name__}: {err}")
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
