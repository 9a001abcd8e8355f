//! A connection flood cannot hurt a protected VM. `ferryd` runs under a
//! soft descriptor limit of 1024, as many hosts set it; a client opens
//! 1,100 idle connections over TCP and the Unix socket, past the server's
//! cap of 256. The connections over the cap are closed at once (no
//! greeting), so they cannot eat the descriptors the write path needs: on
//! a connection established before the flood a WRITE and a FLUSH succeed,
//! the VM stays `Protected` and a recovery point carries the write. Once the
//! flood goes away, new clients get in again.

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ferry::harness::nbd::NbdClient;
use ferry::harness::{random_disk, Daemon, MIB};
use ferry_engine::nbd::NbdLimits;

const FLOOD: usize = 1100;
/// How long a flood connection may take to be greeted or closed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the server's first bytes: `true` for the greeting, `false` when
/// the server closed the connection without one.
fn greeted(mut s: impl Read, what: &str) -> bool {
    let mut g = [0u8; 18];
    match s.read_exact(&mut g) {
        Ok(()) => {
            assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT", "{what}: a greeting");
            true
        }
        Err(e) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => false,
        Err(e) => panic!("{what}: neither greeted nor closed within {ANSWER_TIMEOUT:?}: {e}"),
    }
}

#[test]
fn a_connection_flood_past_the_cap_leaves_a_protected_vm_working() {
    let cap = NbdLimits::default().max_connections;
    // A handshake timeout longer than the test: no slot frees on its own meanwhile.
    let mut d =
        Daemon::builder().nofile(1024).args(&["--nbd-listen", "127.0.0.1:0", "--nbd-handshake-timeout", "10m"]).start();
    let disk = d.disks().join("a.img");
    random_disk(&disk, 16 * MIB);
    let disk_arg = format!("a={}", disk.display());
    d.ctl_json(&["protect", "vm1", "--disk", &disk_arg, "--frequency", "1h"]);
    d.wait_state("vm1", "Protected", Duration::from_secs(120));
    let mut guest = NbdClient::open(&d.socket, "vm1/a");

    let tcp = d.nbd_tcp.expect("NBD over TCP was asked for");
    // Greeted connections stay open, idle in the handshake, holding a slot.
    let (mut held_tcp, mut held_unix) = (Vec::new(), Vec::new());
    let mut closed = 0;
    for i in 0..FLOOD {
        if i % 2 == 0 {
            let s = TcpStream::connect(tcp).expect("TCP connect");
            s.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
            if greeted(&s, "TCP") {
                held_tcp.push(s);
                continue;
            }
        } else {
            let s = UnixStream::connect(&d.socket).expect("Unix connect");
            s.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
            if greeted(&s, "Unix") {
                held_unix.push(s);
                continue;
            }
        }
        closed += 1;
    }
    let held = held_tcp.len() + held_unix.len();
    eprintln!("flood: {held} held ({} over TCP), {closed} closed at accept", held_tcp.len());
    assert_eq!(held, cap - 1, "the guest's connection and {} flood ones fill the cap of {cap}", cap - 1);
    assert_eq!(closed, FLOOD - (cap - 1));

    // The guest's established connection still writes and flushes.
    let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    guest.write(4 * MIB, &data).expect("WRITE during the flood");
    guest.flush().expect("FLUSH during the flood");
    assert_eq!(guest.read(4 * MIB, data.len() as u64).expect("READ during the flood"), data);
    d.assert_healthy();
    assert_eq!(d.state("vm1"), "Protected", "{:#}", d.show("vm1"));
    let seq = d.replicate_now("vm1");
    assert!(seq >= 2, "a recovery point with the write: {seq}");
    assert_eq!(d.state("vm1"), "Protected");

    // The flood leaves: its slots come back, and a new client gets in.
    drop((held_tcp, held_unix));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut late = loop {
        match NbdClient::connect(&d.socket, "vm1/a") {
            Ok(Ok(c)) => break c,
            Ok(Err(kind)) => panic!("export refused after the flood: reply {kind:#x}"),
            // Closed at accept: the server has not seen every flood connection go yet.
            Err(e) => {
                assert!(Instant::now() < deadline, "no slot came back within 30 s of the flood leaving: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(late.read(4 * MIB, data.len() as u64).expect("READ after the flood"), data);
    d.assert_healthy();
}
