"""A generic gRPC client with no generated code, as grpcurl or Postman are.

It learns ferryd's services from server reflection v1alpha (grpcio-reflection's
ProtoReflectionDescriptorDatabase, which asks over v1alpha only), then calls
RPCs by name with JSON requests.

    grpc_reflection_client.py HOST:PORT [SERVICE/METHOD=JSON ...]

Prints one JSON line with the services and each service's methods, then one
JSON line per call: {"call", "ok": response} or {"call", "code", "message"}.
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    target, calls = sys.argv[1], sys.argv[2:]
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        db = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(db)
        services = sorted(db.get_services())
        methods = {
            s: sorted(m.name for m in pool.FindServiceByName(s).methods)
            for s in services
            if not s.startswith("grpc.reflection.")
        }
        print(json.dumps({"services": services, "methods": methods}), flush=True)
        for call in calls:
            name, request_json = call.split("=", 1)
            service, method_name = name.rsplit("/", 1)
            method = pool.FindServiceByName(service).FindMethodByName(method_name)
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            stub = channel.unary_unary(
                f"/{service}/{method_name}",
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            request = json_format.Parse(request_json, request_class())
            try:
                response = stub(request, timeout=30)
                out = {"call": name, "ok": json_format.MessageToDict(response)}
            except grpc.RpcError as e:
                out = {"call": name, "code": e.code().name, "message": e.details()}
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
