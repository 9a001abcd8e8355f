//! The gRPC surface of a real `ferryd`: health, reflection, and status codes
//! for bad input, over loopback.

use std::time::Duration;

use ferry::harness::Daemon;
use ferry_proto::v1 as pb;
use ferry_proto::v1::ferry_client::FerryClient;
use tonic::Code;

#[tokio::test]
async fn health_reflection_and_bad_input_statuses() {
    let d = Daemon::builder().log("warn").start();
    let channel = tonic::transport::Endpoint::from_shared(d.endpoint.clone())
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest { service: "ferry.v1.Ferry".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().expect("one reflection answer");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer: {resp:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"ferry.v1.Ferry") && names.contains(&"grpc.health.v1.Health"), "{names:?}");

    let mut c = FerryClient::new(channel);
    let protect = |name: &str, disk: &str, path: &str, freq: &str| pb::ProtectVmRequest {
        name: name.into(),
        disks: vec![pb::DiskSpec { name: disk.into(), path: path.into() }],
        frequency: freq.into(),
        upload_workers: 0,
    };
    // Each refusal names the field and the value it refuses.
    let cases = [
        (protect("../x", "a", "/tmp/a.img", "30s"), Code::InvalidArgument, r#"invalid vm name: "../x" "#),
        (protect("vm", "a/b", "/tmp/a.img", "30s"), Code::InvalidArgument, r#"invalid disk name: "a/b" "#),
        (
            protect("vm", "a", "relative.img", "30s"),
            Code::InvalidArgument,
            "invalid disk path: relative.img must be absolute",
        ),
        (protect("vm", "a", "/tmp/a.img", "0s"), Code::InvalidArgument, "invalid frequency: 0ns "),
        (
            protect("vm", "a", "/tmp/a.img", "often"),
            Code::InvalidArgument,
            r#"invalid frequency: "often" is not a duration"#,
        ),
        (
            protect("vm", "a", "/nonexistent/ferry/a.img", "30s"),
            Code::NotFound,
            "disk file not found: /nonexistent/ferry/a.img",
        ),
        (
            pb::ProtectVmRequest { upload_workers: 33, ..protect("vm", "a", "/tmp/a.img", "30s") },
            Code::InvalidArgument,
            "invalid upload_workers: 33 is outside 1..=32",
        ),
    ];
    for (req, code, want) in cases {
        let s = c.protect_vm(req.clone()).await.unwrap_err();
        assert_eq!(s.code(), code, "{req:?}: {s:?}");
        assert!(s.message().starts_with(want), "{req:?}: {:?} does not start with {want:?}", s.message());
    }
    let s = c.get_vm(pb::VmRef { name: "nope".into() }).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .test_failover(pb::TestFailoverRequest { vm: "nope".into(), recovery_point: 0, out_dir: "/tmp/x".into() })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    assert!(c.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner().vms.is_empty(), "nothing was created");
}

/// A generic client (Python grpcio with grpcio-reflection, which speaks
/// reflection v1alpha only, as Postman and older grpcurl do) finds every
/// RPC of `ferry.v1.Ferry` and calls them by name, with no generated code:
/// answers and refusals as a generated client gets them.
#[test]
fn a_generic_python_client_finds_and_calls_every_rpc_by_reflection_v1alpha() {
    let python = ferry::harness::installed_tool("grpc/bin/python", "scripts/install-grpc-clients.sh");
    let d = Daemon::builder().log("warn").start();
    let target = d.endpoint.trim_start_matches("http://").to_string();
    let client = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/grpc_reflection_client.py");
    let mut cmd = std::process::Command::new(python);
    cmd.arg(client).arg(&target).args([
        "ferry.v1.Ferry/ListVms={}",
        "ferry.v1.Ferry/GetThrottle={}",
        r#"ferry.v1.Ferry/GetVm={"name": "nope"}"#,
        r#"ferry.v1.Ferry/ProtectVm={"name": "../x", "disks": [{"name": "a", "path": "/tmp/a.img"}], "frequency": "30s"}"#,
        "grpc.health.v1.Health/Check={\"service\": \"ferry.v1.Ferry\"}",
    ]);
    let out = ferry::harness::run(&mut cmd, Duration::from_secs(120));
    assert!(out.ok(), "the Python client failed:\n{}", out.text());
    let lines: Vec<serde_json::Value> =
        out.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(lines.len(), 6, "{}", out.stdout);

    // Every RPC the proto declares is found through reflection v1alpha.
    let declared: Vec<String> = ferry_proto_rpcs();
    let found: Vec<String> = serde_json::from_value(lines[0]["methods"]["ferry.v1.Ferry"].clone()).unwrap();
    assert_eq!(found, declared, "{}", lines[0]);
    let services = lines[0]["services"].to_string();
    assert!(services.contains("grpc.health.v1.Health") && services.contains("grpc.reflection.v1alpha"), "{services}");

    assert_eq!(lines[1]["ok"], serde_json::json!({}), "no VMs: an empty list: {}", lines[1]);
    assert!(lines[2]["ok"].is_object(), "{}", lines[2]);
    assert_eq!(lines[3]["code"], "NOT_FOUND", "{}", lines[3]);
    assert_eq!(lines[4]["code"], "INVALID_ARGUMENT", "{}", lines[4]);
    assert!(lines[4]["message"].as_str().unwrap().contains("invalid vm name"), "{}", lines[4]);
    assert_eq!(lines[5]["ok"]["status"], "SERVING", "{}", lines[5]);
}

/// The RPC names `ferry.v1.Ferry` declares in proto/, sorted.
fn ferry_proto_rpcs() -> Vec<String> {
    let proto =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proto/proto/ferry/v1/ferry.proto")).unwrap();
    let mut rpcs: Vec<String> = proto
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l.split('(').next().unwrap().trim().to_string())
        .collect();
    rpcs.sort();
    assert!(rpcs.len() >= 10, "{rpcs:?}");
    rpcs
}
