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
