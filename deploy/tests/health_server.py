"""A grpc.health.v1 server (grpcio) for testing deploy/docker/grpc-health.sh.

Serves on 127.0.0.1:PORT with "" NOT_SERVING and "liveness" SERVING (like a klein service that is
still loading its model); a line "serve" on stdin flips "" to SERVING, "quit" stops. Prints
"ready PORT" once listening.
"""

import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"ready {port}", flush=True)
    for line in sys.stdin:
        if line.strip() == "serve":
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            print("serving", flush=True)
        elif line.strip() == "quit":
            break
    server.stop(grace=None)


if __name__ == "__main__":
    main()
