"""The standard gRPC services every meshserve process answers: health (grpc.health.v1) and,
on the gateway, server reflection in both spellings clients use (v1 and v1alpha); and the
keepalive settings of the scheduler's step streams to its workers.

grpcio-reflection ships only v1alpha. v1 is the same protocol under a new package name (the
messages are field for field the same), so its descriptor is v1alpha's renamed, and v1 calls
are served by the v1alpha servicer: clients that ask for v1 (newer grpcurl) find it, and
clients that only speak v1alpha still do.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha
from grpc_reflection.v1alpha import reflection_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"

# Keepalive pings on the scheduler's step streams to its workers. A peer whose host went away
# (a cut link, a dead node) sends no FIN, so without them a step would wait on TCP's
# retransmissions for many minutes. A ping unanswered for KEEPALIVE_TIMEOUT_MS, sent after
# KEEPALIVE_TIME_MS without reads, fails the stream: the scheduler's engine fails and the replica
# leaves the registry (its requests fail over); a worker's stream from a vanished scheduler ends,
# and the next scheduler is served.
KEEPALIVE_TIME_MS = 1000
KEEPALIVE_TIMEOUT_MS = 2000
CLIENT_KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
                            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                            ("grpc.keepalive_permit_without_calls", 1),
                            ("grpc.http2.max_pings_without_data", 0)]
SERVER_KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
                            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                            ("grpc.keepalive_permit_without_calls", 1),
                            ("grpc.http2.min_recv_ping_interval_without_data_ms",
                             KEEPALIVE_TIME_MS // 2),
                            ("grpc.http2.max_ping_strikes", 0)]


async def add_health(server: grpc.aio.Server, service_names: list[str],
                     serving: bool = True) -> health.aio.HealthServicer:
    """The health service, saying `serving` for the server ("") and each of service_names."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await set_health(servicer, ["", *service_names], serving)
    return servicer


async def set_health(servicer: health.aio.HealthServicer, service_names: list[str],
                     serving: bool) -> None:
    for name in service_names:
        await servicer.set(name, SERVING if serving else NOT_SERVING)


def add_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Server reflection v1 and v1alpha, listing service_names, health and both of themselves."""
    _register_v1_descriptor()
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha.ServerReflectionRequest.FromString,
            response_serializer=v1alpha.ServerReflectionResponse.SerializeToString)}),))


def _register_v1_descriptor() -> None:
    """Adds grpc/reflection/v1/reflection.proto to the default pool (once): v1alpha's file with
    the v1 package, so reflection can describe its own v1 service."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    proto.options.Clear()  # v1alpha's Java package and deprecation
    pool.Add(proto)
