#!/usr/bin/env bash
# grpc-health PORT [SERVICE] [HOST] [TIMEOUT_SECS]
#
# Container health check for the klein-serve images (docker HEALTHCHECK and compose): asks
# grpc.health.v1.Health/Check for SERVICE ("" = the whole server, "liveness" = the process) on
# HOST:PORT over cleartext HTTP/2 and exits 0 only when the answer is SERVING.
#
# Written in bash (/dev/tcp, printf, od) so that the images need no extra binary. The request is
# one fixed HTTP/2 exchange: connection preface, an empty SETTINGS frame, one HEADERS frame (HPACK
# without Huffman coding or indexing), one DATA frame carrying the HealthCheckRequest, then GOAWAY
# so that the server closes the connection once it has answered. The answer is SERVING exactly when
# the server sends the 7-byte gRPC message {status: SERVING} (00 00000002 08 01) as a DATA frame on
# stream 1. Kubernetes does not use this script: its probes speak gRPC natively.
set -u

port=${1:?usage: grpc-health PORT [SERVICE] [HOST] [TIMEOUT_SECS]}
service=${2:-}
host=${3:-127.0.0.1}
timeout_secs=${4:-3}

if ((${#service} > 120)); then
  echo "grpc-health: service name too long" >&2
  exit 2
fi

# Bytes of a string as lowercase hex.
hex_of() { printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n'; }
# A number as N big-endian bytes of hex.
be() { printf "%0$(($2 * 2))x" "$1"; }
# One HTTP/2 frame: type, flags, stream id, payload (hex).
frame() { printf '%s%s%s%s%s' "$(be $((${#4} / 2)) 3)" "$1" "$2" "$(be "$3" 4)" "$4"; }

path=/grpc.health.v1.Health/Check
authority="$host:$port"
headers="8386"                                                       # :method POST, :scheme http
headers+="04$(be ${#path} 1)$(hex_of "$path")"                       # :path
headers+="01$(be ${#authority} 1)$(hex_of "$authority")"             # :authority
headers+="0f10$(be 16 1)$(hex_of application/grpc)"                  # content-type (static 31)
headers+="0002$(hex_of te)08$(hex_of trailers)"                      # te: trailers
if [[ -n $service ]]; then
  message="0a$(be ${#service} 1)$(hex_of "$service")"               # HealthCheckRequest.service
else
  message=""
fi
grpc_message="00$(be $((${#message} / 2)) 4)$message"

request="$(hex_of 'PRI * HTTP/2.0')0d0a0d0a$(hex_of SM)0d0a0d0a"  # connection preface
request+="$(frame 04 00 0 "")"                                     # SETTINGS (defaults)
request+="$(frame 01 04 1 "$headers")"                             # HEADERS, END_HEADERS
request+="$(frame 00 01 1 "$grpc_message")"                        # DATA, END_STREAM
request+="$(frame 07 00 0 "0000000000000000")"                     # GOAWAY, NO_ERROR

{ exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || {
  echo "grpc-health: cannot connect to $host:$port" >&2
  exit 1
}
# shellcheck disable=SC2001  # every two hex digits become one \xHH escape
printf '%b' "$(sed 's/../\\x&/g' <<<"$request")" >&3

# DATA frame (type 0) of 7 bytes on stream 1 holding the message {status: SERVING}.
serving=' 00 00 07 00 [0-9a-f]{2} 00 00 00 01 00 00 00 00 02 08 01( |$)'
# HEADERS frame (type 1) with END_STREAM|END_HEADERS on stream 1: the trailers, the answer is over.
trailers=' 01 05 00 00 00 01( |$)'
answer=""
for ((i = 0; i < timeout_secs * 5; i++)); do
  # Read for 0.2 s at a time; cat's status 0 means the server closed the connection.
  chunk=$(timeout 0.2 cat <&3 | od -An -v -tx1; echo " rc${PIPESTATUS[0]}")
  answer+=" ${chunk% rc*}"
  answer=$(tr -s ' \n' '  ' <<<"$answer")
  if grep -Eq "$serving" <<<"$answer"; then
    exec 3<&-
    exit 0
  fi
  if grep -Eq "$trailers" <<<"$answer" || [[ ${chunk##* rc} == 0 ]]; then
    break
  fi
done
exec 3<&-
echo "grpc-health: $host:$port service \"$service\" is not SERVING" >&2
exit 1
